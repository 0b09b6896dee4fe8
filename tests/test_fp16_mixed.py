"""``--trainer.precision 16-mixed`` on a CPU: fp16 autocast with a GradScaler (not the bf16 that
Lightning would substitute), a finite and falling loss, and a noise schedule that stays fp32."""

import logging

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from diffusion_apps.cli import DiffusionCLI
from tests.conftest import CONFIGS
from tests.test_precision import said

TINY = CONFIGS / "tiny" / "ddpm.yaml"
STEPS = 40


class Record(Callback):
    """Every step's loss (and loss scale, if ``scaled``), and the dtypes the UNet's output conv
    computed in."""

    def __init__(self, scaled: bool = True) -> None:
        self.scaled, self.losses, self.scales, self.out_dtypes = scaled, [], [], set()

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.unet.out_conv.register_forward_hook(
            lambda module, args, out: self.out_dtypes.add(out.dtype)
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if self.scaled:
            self.scales.append(trainer.precision_plugin.scaler.get_scale())


def tiny_cli(precision: str, *args: str) -> DiffusionCLI:
    return DiffusionCLI(
        ["--config", str(TINY), "--trainer.precision", precision,
         "--trainer.limit_val_batches", "0", *args],
        run=False,
    )  # fmt: skip


def fit(cli: DiffusionCLI, record: Callback) -> None:
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_16_mixed_trains_on_the_cpu_with_a_grad_scaler_as_fp32_does(in_tmp, caplog, capfd):
    """The same seed, batches, t and noise in fp32 and in 16-mixed: the losses agree to 1e-3
    (3.7e-5 measured; bf16-mixed's 2.6e-4), every weight moves and stays finite."""
    with caplog.at_level(logging.INFO):
        cli = tiny_cli("16-mixed", "--trainer.max_steps", str(STEPS))
    assert "precision 16-mixed: as configured: fp16 autocast and a GradScaler" in said(
        caplog, capfd
    )
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision) and plugin.precision == "16-mixed"
    assert isinstance(plugin.scaler, torch.amp.GradScaler) and plugin.scaler.is_enabled()
    model, record = cli.model, Record()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(cli, record)
    fp32 = Record(scaled=False)
    fit(tiny_cli("32-true", "--trainer.max_steps", str(STEPS)), fp32)

    assert record.out_dtypes == {torch.float16} and fp32.out_dtypes == {torch.float32}
    losses, reference = torch.tensor(record.losses), torch.tensor(fp32.losses)
    assert losses.shape == (STEPS,) and torch.isfinite(losses).all()
    assert reference[-10:].mean() < 0.95 * reference[:10].mean()  # 1.0 at the zero output
    torch.testing.assert_close(losses, reference, rtol=0, atol=1e-3)
    assert 1.0 <= plugin.scaler.get_scale() < float("inf") and min(record.scales) >= 1.0
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, start[name]), name
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev"):
        assert getattr(model.schedule, name).dtype == torch.float32, name


def test_the_saved_config_runs_16_mixed_again(in_tmp):
    """The config a run saves holds the plugin and no precision; parsed again, it is fp16 with
    a scaler (the precision left unset, not filled by the hardware: Lightning would refuse
    both)."""
    cli = tiny_cli("16-mixed", "--trainer.max_steps", "1")
    fit(cli, Record())
    saved = in_tmp / "runs/tiny_ddpm/version_0/config.yaml"
    again = DiffusionCLI(["--config", str(saved)], run=False).trainer.precision_plugin
    assert isinstance(again, MixedPrecision) and again.precision == "16-mixed"
    assert isinstance(again.scaler, torch.amp.GradScaler)


def test_an_fp16_overflow_is_left_to_the_grad_scaler(in_tmp):
    """A scale of 2^40 overflows fp16 at once: the scaler skips steps until it fits."""
    cli = tiny_cli("16-mixed", "--trainer.max_steps", "3")
    cli.trainer.precision_plugin.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    fit(cli, Record())
    assert cli.trainer.precision_plugin.scaler.get_scale() < 2.0**40
