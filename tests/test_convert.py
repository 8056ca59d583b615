"""Converting models: SpatialLayer.from_linear, st.plan_conversion and st.convert on an MLP,
nn.TransformerEncoder and tiny Hugging Face Llama and Bert models built from configs."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spatium_torch as st


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_copies_weight_and_bias_and_computes_on_their_quantization(bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 12, bias=bias)
    layer = st.SpatialLayer.from_linear(linear, bits=8, region_bits=4)
    assert torch.equal(layer.weight.detach(), linear.weight.detach())
    assert (layer.bias is None) == (not bias)
    if bias:
        assert torch.equal(layer.bias.detach(), linear.bias.detach())
    x = torch.randn(5, 48)
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=2e-2)  # 8-bit codes


def test_from_linear_keeps_dtype_sparsity_and_frozen_parameters():
    linear = nn.Linear(64, 8).to(torch.bfloat16).requires_grad_(False).eval()
    layer = st.SpatialLayer.from_linear(linear, region_bits=3, density=0.5)
    assert layer.weight.dtype == torch.bfloat16 and not layer.weight.requires_grad
    assert not layer.training
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    outside = ~layer.block_mask()
    assert outside.any() and not layer.weight.detach()[outside].any()
    with pytest.raises(TypeError, match="nn.Linear"):
        st.SpatialLayer.from_linear(nn.Conv1d(1, 1, 1))
    with pytest.raises(TypeError, match="bias"):
        st.SpatialLayer.from_linear(nn.Linear(4, 4), bias=False)
    with pytest.raises(ValueError, match="meta"):
        st.SpatialLayer.from_linear(nn.Linear(4, 4, device="meta"))


def test_convert_an_mlp_keeps_the_head_and_reports(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    x = torch.randn(8, 16)
    before = model(x)
    with caplog.at_level(logging.INFO, logger="spatium_torch"):
        assert st.convert(model, bits=8, region_bits=3) is model
    assert [type(m).__name__ for m in model] == [
        "SpatialLayer", "ReLU", "SpatialLayer", "ReLU", "Linear",
    ]  # fmt: skip
    assert "2 nn.Linear converted" in caplog.text and "kept 4: the output head" in caplog.text
    torch.testing.assert_close(model(x), before, rtol=0, atol=5e-2)
    assert [(c.name, c.converted) for c in st.plan_conversion(model, keep_output=False)] == [
        ("4", True)
    ]
    again = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    plan = st.plan_conversion(again, include=["0", "2"], exclude=["2"], keep_output=False)
    assert [(c.converted, c.reason) for c in plan] == [
        (True, ""), (False, "not in include"), (False, "in exclude"),
    ]  # fmt: skip


def test_a_failed_convert_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="bits"):
        st.convert(model, bits=3)
    assert all(type(m) is nn.Linear for m in model)


def test_convert_a_transformer_encoder_then_freeze_and_run_in_eval():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2)
    assert model.use_nested_tensor
    plan = {c.name: c for c in st.plan_conversion(model, keep_output=False)}
    assert plan["layers.0.self_attn.out_proj"].reason.startswith("its parent MultiheadAttention")
    st.convert(model, bits=2, keep_output=False)
    assert not model.use_nested_tensor  # its nested path reads the layers' weights
    linear1 = model.layers[0].linear1
    assert isinstance(linear1, st.SpatialLayer)
    assert type(model.layers[0].self_attn.out_proj) is not st.SpatialLayer
    x = torch.rand(2, 5, 32)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    model.eval()
    calls = []
    linear1.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        eager = model(x, src_key_padding_mask=mask)
    # torch's fast path would have read linear1.weight (the latent fp32 weight) instead.
    assert len(calls) == 1
    st.freeze(model)
    with torch.no_grad():
        frozen = model(x, src_key_padding_mask=mask)
        torch.testing.assert_close(frozen, eager)
        assert model(x).shape == x.shape


def test_spatial_layers_put_in_by_hand_keep_the_encoder_layer_off_its_fast_path():
    # torch's TransformerEncoderLayer computes with linear1/linear2's `weight` itself in eval
    # without gradients unless one of its modules has hooks; the layers carry one (on their
    # store), so their own forward runs: quantized weights, and no crash on a frozen layer.
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    model.linear1 = st.SpatialLayer.from_linear(model.linear1, bits=2)
    model.linear2 = st.SpatialLayer.from_linear(model.linear2, bits=2)
    x = torch.rand(2, 5, 32)

    def run(fast_path):
        previous = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(fast_path)
        try:
            with torch.no_grad():
                return model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(previous)

    by_modules = run(fast_path=False)
    torch.testing.assert_close(run(fast_path=True), by_modules)
    st.freeze(model)
    torch.testing.assert_close(run(fast_path=True), by_modules)


def tiny(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_convert_tiny_hugging_face_models(kind):
    model = tiny(kind)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
    plan = {c.name: c for c in st.plan_conversion(model)}
    st.convert(model, bits=8)
    converted = [n for n, m in model.named_modules() if isinstance(m, st.SpatialLayer)]
    assert converted == [n for n, c in plan.items() if c.converted] and len(converted) >= 12
    if kind == "llama":
        assert plan["lm_head"].reason == "its weight is tied to model.embed_tokens.weight"
        assert type(model.lm_head) is nn.Linear
    else:
        assert plan["classifier"].reason.startswith("the output head")
    with torch.no_grad():
        after = model(ids).logits
        torch.testing.assert_close(after, before, rtol=0, atol=0.05)  # 8-bit codes
        st.freeze(model)
        torch.testing.assert_close(model(ids).logits, after)
    if kind == "llama":
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 11)
    # Frozen, the converted layers count their stores, not fp32 weights. (At these tiny widths
    # the int64 input and neuron positions cost about as much as the 8-bit codes.)
    assert model.get_memory_footprint() < tiny(kind).get_memory_footprint()


@pytest.mark.parametrize("frozen", [False, True])
def test_a_converted_llama_round_trips_through_save_pretrained(frozen, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_model, save_model

    # Two conversions with their own settings: both are recorded in the config.
    model = st.convert(tiny("llama"), bits=4, codebook="nf4", include=["*.mlp.*"])
    st.convert(model, bits=8, region_bits=4, include=["*.self_attn.*"])
    assert [(len(c["layers"]), c["bits"]) for c in model.config.spatium_conversions] == [
        (6, 4),
        (8, 8),
    ]
    if frozen:
        st.freeze(model)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    fresh = st.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    assert not fresh.training
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # tied again
    assert fresh.model.layers[0].self_attn.q_proj.region_bits == 4
    assert fresh.model.layers[0].mlp.up_proj.codebook == "nf4"
    assert fresh.config.spatium_conversions == model.config.spatium_conversions
    assert all(m.frozen == frozen for m in fresh.modules() if isinstance(m, st.SpatialLayer))
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    # The concrete class works as well as the auto class.
    concrete = st.from_pretrained(transformers.LlamaForCausalLM, tmp_path)
    with torch.no_grad():
        assert torch.equal(concrete(ids).logits, expected)
    # safetensors' own save_model / load_model (shared tensors handled by safetensors) into a
    # model converted alike by hand.
    save_model(model, tmp_path / "plain.safetensors")
    again = st.convert(tiny("llama"), bits=4, codebook="nf4", include=["*.mlp.*"])
    st.convert(again, bits=8, region_bits=4, include=["*.self_attn.*"])
    if frozen:
        st.freeze(again)
    load_model(again, tmp_path / "plain.safetensors")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, expected)


def test_from_pretrained_explains_what_it_cannot_load(tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="config.json"):
        st.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    plain = tiny("llama")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="records no spatium_torch conversion"):
        st.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "plain")
    converted = st.convert(tiny("llama"), bits=4)
    converted.save_pretrained(tmp_path / "converted", safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        st.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "converted")
    # Options that JSON cannot hold are not recorded, and convert says so.
    model = tiny("llama")
    with caplog.at_level(logging.WARNING, logger="spatium_torch"):
        st.convert(
            model, include=["*.mlp.down_proj"], input_positions=torch.arange(192).view(64, 3)
        )
    assert "cannot record" in caplog.text
    assert not getattr(model.config, "spatium_conversions", None)


def test_from_pretrained_refuses_weights_that_do_not_fit(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    model = st.convert(tiny("llama"), bits=4)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.norm.weight"]
    state["extra"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing \['model.norm.weight'\], unexpected \['extra'\]"
    ):
        st.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
