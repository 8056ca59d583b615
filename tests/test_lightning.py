"""Lightning: a growing model trains, checkpoints, loads with ``load_from_checkpoint`` and
resumes ``fit`` at its grown widths (``st.match_widths`` in ``on_load_checkpoint``), with the
growth controller's schedule going on where it stopped (its state in the checkpoint)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spatium_torch as st

pl = pytest.importorskip("pytorch_lightning")


class GrowingModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            st.SpatialLayer(20, 8, region_bits=3),
            nn.ReLU(),
            st.SpatialLayer(8, 6, region_bits=2),
            nn.Tanh(),
            nn.Linear(6, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, index: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    controller_state = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        self.controller = st.GrowthController(
            self.net, optimizer, grow_every=2, growth_threshold=0.0, max_split_fraction=0.5
        )
        if self.controller_state is not None:  # resuming: the schedule goes on
            self.controller.load_state_dict(self.controller_state)
        return optimizer

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["growth_controller"] = self.controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before the weights load and the optimizer is built: resize, and keep the controller's
        # state for configure_optimizers.
        st.match_widths(self, checkpoint["state_dict"])
        self.controller_state = checkpoint.get("growth_controller")


def trainer(steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_a_grown_lightning_checkpoint_loads_and_resumes(tmp_path):
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.rand(64, 20, generator=generator), torch.rand(64, 2, generator=generator)
    )
    loader = DataLoader(data, batch_size=16)
    module = GrowingModule()
    first = trainer(4)
    first.fit(module, loader)
    widths = (module.net[0].out_features, module.net[2].out_features)
    assert widths[0] > 8 and widths[1] > 6
    path = tmp_path / "grown.ckpt"
    first.save_checkpoint(path)

    loaded = GrowingModule.load_from_checkpoint(path).eval()
    assert (loaded.net[0].out_features, loaded.net[2].out_features) == widths
    x = data.tensors[0][:8]
    with torch.no_grad():
        assert torch.equal(loaded(x), module.eval()(x))

    resumed = GrowingModule()
    trainer(8).fit(resumed, loader, ckpt_path=path)
    assert resumed.net[0].out_features > widths[0]  # growth went on from the checkpoint
    assert resumed.net[4].in_features == resumed.net[2].out_features
    # The controller counted on from step 4 (its state is in the checkpoint): the resumed run
    # makes the events of an uninterrupted one.
    straight = GrowingModule()
    trainer(8).fit(straight, loader)

    def log(module):
        return [(e.step, e.layer, e.split, e.widths) for e in module.controller.events]

    assert resumed.controller.steps == straight.controller.steps == 8
    assert log(resumed) == log(straight) and log(straight)[-1][0] == 8
    assert len(log(straight)) > len(log(module))
