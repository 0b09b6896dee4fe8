"""The learning-rate schedule of every method: warm-up, then constant or decayed to 0."""

import math

import lightning as L
import pytest
import torch

from diffusion_apps.methods.base import DiffusionMethod

LR, WARMUP, STEPS = 1e-2, 3, 11


class Regression(DiffusionMethod):
    def __init__(self, **kw) -> None:
        super().__init__(lr=LR, warmup_steps=WARMUP, **kw)
        self.net = torch.nn.Linear(2, 1)
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(self.optimizers().param_groups[0]["lr"])
        return self.net(batch).square().mean()


def lrs_of_a_run(schedule: str, **trainer) -> list[float]:
    """The lr of each optimizer step of a real Trainer run."""
    model = Regression(lr_schedule=schedule)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **trainer)  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=4))
    return model.seen


@pytest.mark.parametrize(
    "schedule, decay",
    [
        ("constant", lambda u: 1.0),
        ("cosine", lambda u: (1 + math.cos(math.pi * u)) / 2),
        ("linear", lambda u: 1 - u),
    ],
)
def test_lr_warms_up_then_decays_to_zero_at_the_last_step(schedule, decay):
    expected = []
    for s in range(STEPS):
        u = max(0, s - WARMUP) / (STEPS - WARMUP)
        expected.append(LR * min(1, (s + 1) / WARMUP) * decay(u))
    assert lrs_of_a_run(schedule, max_steps=STEPS) == pytest.approx(expected, abs=1e-12)


def test_the_decay_ends_where_max_epochs_ends_the_run():
    lrs = lrs_of_a_run("linear", max_epochs=2)  # 16 batches an epoch: the last step is 31
    assert len(lrs) == 32 and lrs[-1] == pytest.approx(LR * (1 - 28 / 29))


def test_a_decay_without_a_last_step_is_refused():
    with pytest.raises(ValueError, match="lr_schedule='cosine' .* set trainer.max_steps"):
        lrs_of_a_run("cosine", max_steps=-1, max_epochs=-1)


def test_an_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="lr_schedule must be one of .* got 'cosin'"):
        Regression(lr_schedule="cosin")
