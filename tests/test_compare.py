"""`spatium-torch compare`: end to end in a temporary folder, determinism, table, bad options."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import spatium_torch
from spatium_torch import cli, compare

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """Train as `compare` does: on one thread (two wait on each other on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def console_script():
    script = Path(sys.executable).with_name("spatium-torch")
    return str(script) if script.exists() else shutil.which("spatium-torch")


def test_compare_runs_end_to_end(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [console_script(), "compare", "--epochs", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    names = [spec.name for spec in compare.model_specs([8, 4, 2, 1])]
    assert len(names) == 7  # nn.Linear, four widths, sparse, growth
    for name in names:
        assert name in done.stdout
    for column in compare.COLUMNS:
        assert column in done.stdout
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(names)  # the header and one row a model
    assert rows[1].startswith("| nn.Linear | ") and "(1.000x)" in rows[1]
    pictures = [*compare.FILES, "growth_history.png"]
    for name in pictures:
        data = (out / name).read_bytes()
        assert data[:8] == PNG
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 300 and height > 200
        assert f"]({name})" in report


def test_training_is_deterministic_for_a_seed():
    data = compare.load_data("digits")
    spec = next(s for s in compare.model_specs([2]) if "density" in s.name)
    runs = [compare.train(spec, data, epochs=2, seed=seed, hidden=32) for seed in (5, 5, 6)]
    first, again, other = runs
    assert (first.curve, first.losses, first.accuracy, first.weight_bytes) == (
        again.curve,
        again.losses,
        again.accuracy,
        again.weight_bytes,
    )
    assert first.losses != other.losses


def test_growth_model_changes_width_and_logs_events():
    data = compare.load_data("digits")
    spec = next(s for s in compare.model_specs([4]) if s.growth)
    result = compare.train(spec, data, epochs=3, seed=0, hidden=64)
    kinds = {event.kind for event in result.history.events}
    assert "rewire" in kinds
    assert result.history.records
    width = result.model[0].out_features
    assert result.notes == [f"64-{width}-10"]
    assert width <= 64


def result(name, accuracy, nbytes, seconds, latency):
    spec = compare.Spec(name, lambda data, hidden: nn.Identity())
    return compare.Result(
        spec, accuracy, nbytes, seconds, {1: latency, 256: 40 * latency}, [], [], nn.Identity()
    )


def test_table_ratios_against_nn_linear():
    rows = compare.table_rows(
        [result("nn.Linear", 0.95, 40_000, 2.0, 10.0), result("small", 0.9025, 5_000, 3.0, 25.0)]
    )
    assert rows[0] == [
        "nn.Linear",
        "95.0% (1.000x)",
        "40,000",
        "1.0x",
        "2.00 (1.0x)",
        "10.0 us (1.0x)",
        "400.0 us (1.0x)",
    ]
    assert rows[1] == [
        "small",
        "90.2% (0.950x)",
        "5,000",
        "8.0x",
        "3.00 (1.5x)",
        "25.0 us (2.5x)",
        "1.00 ms (2.5x)",
    ]


@pytest.mark.parametrize("dataset", ["iris", "wine", "breast_cancer"])
def test_other_data_sets_load_standardised(dataset):
    data = compare.load_data(dataset)
    assert data.image is None and data.classes >= 2
    assert torch.allclose(data.x_train.mean(0), torch.zeros(data.features), atol=1e-4)
    assert len(data.x_test) * 3 == pytest.approx(len(data.x_train), rel=0.05)


def test_mnist1d_is_generated_offline_the_same_every_time():
    pytest.importorskip("mnist1d")
    data = compare.load_data("mnist1d")
    assert (data.features, data.classes) == (40, 10)
    assert (len(data.x_train), len(data.x_test)) == (4000, 1000)
    assert torch.equal(data.x_train, compare.load_data("mnist1d").x_train)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--bits", "3"], "argument --bits: invalid choice: 3"),
        (["compare", "--epochs", "0"], "argument --epochs: must be a positive integer"),
        (["compare", "--epochs", "two"], "argument --epochs: not an integer: 'two'"),
        (["compare", "--seed", "-1"], "argument --seed: must be an integer in [0, 2**63)"),
        (["compare", "--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
        (["compare", "--colour"], "unrecognized arguments: --colour"),
        ([], "the following arguments are required: COMMAND"),
        (["plot"], "argument COMMAND: invalid choice: 'plot'"),
    ],
)
def test_bad_options_exit_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_not_be_a_file(tmp_path, capsys):
    path = tmp_path / "report.md"
    path.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--out", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --out: '{path}' exists and is not a folder" in err


def test_module_entry_point_reports_bad_options():
    done = subprocess.run(
        [sys.executable, "-m", "spatium_torch.compare", "--bits", "16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "usage: python -m spatium_torch.compare" in done.stderr
    assert "invalid choice: 16" in done.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"spatium-torch {spatium_torch.__version__} (torch {torch.__version__})")


def test_without_the_viz_extra_compare_says_what_to_install(monkeypatch, capsys):
    for name in [n for n in sys.modules if n.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "spatium_torch.compare")
    monkeypatch.delattr(spatium_torch, "compare")
    assert cli.main(["compare", "--epochs", "2"]) == 1
    assert "needs matplotlib: pip install 'spatium-torch[viz]'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
