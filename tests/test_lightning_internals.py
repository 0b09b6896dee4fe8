"""diffusion_apps.lightning_internals: each adapter still works with the installed Lightning, and
no other module of the package touches a Lightning private name.

Each test below fails if Lightning changes the private name an adapter relies on, or what it
does. End to end elsewhere: a resume from another method's checkpoint is refused
(tests/test_bad_input.py::test_resume_from_another_method), ``last`` is written at the final
step (tests/test_resume.py) and on SIGTERM (tests/test_stopping.py), and the LDM autoencoder
trains under DDP (tests/test_ddp.py).
"""

import ast
import copy
import importlib
import logging
import os
from pathlib import Path

import lightning
import pytest
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import DDPStrategy

from diffusion_apps import lightning_internals as internals
from diffusion_apps.cli import DiffusionCLI
from diffusion_apps.methods.base import DiffusionMethod
from tests.conftest import CONFIGS, run_cli_in

TINY = str(CONFIGS / "tiny/ddpm.yaml")
PACKAGE = Path(internals.__file__).parent
LIGHTNING = Path(lightning.__file__).parent
RESUMED_LR = 1e-5  # the tiny config trains at the default 2e-4


# LightningCLI: keep the configured model on --ckpt_path


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """``fit --ckpt_path last`` of the tiny DDPM: 2 steps, then on to 3 with another ``lr``.
    Returns the resumed run's CLI, the checkpoint it resumed from and the one it wrote."""
    root = tmp_path_factory.mktemp("resume")
    last = root / "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
    run_cli_in(root, ["fit", "--config", TINY, "--trainer.max_steps", "2"])
    first = torch.load(last, weights_only=True)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        args = ["fit", "--config", TINY, "--trainer.max_steps", "3", "--ckpt_path", "last"]
        cli = DiffusionCLI(args=[*args, "--model.init_args.lr", str(RESUMED_LR)])
    finally:
        os.chdir(cwd)
    return cli, first, torch.load(last, weights_only=True)


def test_resume_with_another_lr_keeps_the_configured_model(resumed):
    cli, first, then = resumed
    assert first["hyper_parameters"]["lr"] == 2e-4 and then["global_step"] == 3
    assert cli.model.lr == cli.model.hparams["lr"] == RESUMED_LR
    assert then["hyper_parameters"]["lr"] == RESUMED_LR
    assert cli._ckpt_path_hparams_skipped  # LightningCLI called the override


def test_lightning_would_rebuild_the_model_from_the_checkpoint(resumed, tmp_path):
    """What the override prevents still happens without it: Lightning's ``_parse_ckpt_path``
    puts the checkpoint's ``lr`` back in the config. Once it no longer does, the override (and
    KeepConfiguredModel) can go."""
    cli, first, _ = resumed
    torch.save(first, tmp_path / "first.ckpt")
    config = cli.config
    cli.config = config.clone()
    try:
        cli.config.fit.ckpt_path = str(tmp_path / "first.ckpt")
        LightningCLI._parse_ckpt_path(cli)
        model = cli.config.fit.model
    finally:
        cli.config = config
    assert model.class_path == "diffusion_apps.methods.DDPM"
    assert {**vars(model.init_args), **model.get("dict_kwargs", {})}["lr"] == 2e-4


def test_resume_with_another_lr_trains_at_that_lr(resumed):
    """The resumed step trains at the new lr, not the checkpoint's (Lightning restores the
    optimizer's and the scheduler's lr after ``on_load_checkpoint``, which rescales them)."""
    cli, first, then = resumed
    assert first["optimizer_states"][0]["param_groups"][0]["lr"] == 2e-4  # warmed up at step 2
    # train/lr: the optimizer's lr in the resumed training_step, logged by DDPM
    assert cli.trainer.callback_metrics["train/lr"].item() == pytest.approx(RESUMED_LR)
    group = cli.trainer.optimizers[0].param_groups[0]
    assert group["lr"] == group["initial_lr"] == RESUMED_LR
    assert then["optimizer_states"][0]["param_groups"][0]["lr"] == RESUMED_LR
    assert then["lr_schedulers"][0]["base_lrs"] == [RESUMED_LR]


class Linear(DiffusionMethod):
    def __init__(self, lr: float, warmup_steps: int = 0) -> None:
        super().__init__(lr=lr, warmup_steps=warmup_steps)
        self.net = torch.nn.Linear(2, 1)


def optimizer_and_scheduler(module: DiffusionMethod, checkpoint: dict | None = None):
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    if checkpoint is not None:  # what Lightning restores, after on_load_checkpoint
        opt.load_state_dict(checkpoint["optimizer_states"][0])
        sched.load_state_dict(checkpoint["lr_schedulers"][0])
    return opt, sched


def warm_up_checkpoint(steps: int) -> dict:
    """The optimizer and scheduler states after ``steps`` of 4 warm-up steps at lr 2e-4."""
    opt, sched = optimizer_and_scheduler(Linear(2e-4, warmup_steps=4))
    for _ in range(steps):
        opt.step()
        sched.step()
    return {"optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()]}


def test_resume_with_another_lr_keeps_the_warm_up_fraction(caplog):
    checkpoint = warm_up_checkpoint(steps=1)  # at lr 2e-4 · 2/4
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        module = Linear(RESUMED_LR, warmup_steps=4)
        module.on_load_checkpoint(checkpoint)
    assert "resuming with lr 1e-05 (the checkpoint trained at 0.0002)" in caplog.text
    opt, sched = optimizer_and_scheduler(module, checkpoint)
    assert opt.param_groups[0]["initial_lr"] == sched.base_lrs[0] == RESUMED_LR
    assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0] == pytest.approx(RESUMED_LR / 2)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(RESUMED_LR * 3 / 4)


def test_resume_with_the_same_lr_changes_nothing(caplog):
    checkpoint = warm_up_checkpoint(steps=1)
    before = copy.deepcopy(checkpoint)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        Linear(2e-4, warmup_steps=4).on_load_checkpoint(checkpoint)
    assert "resuming with lr" not in caplog.text
    groups = [state["param_groups"] for state in checkpoint["optimizer_states"]]
    assert groups == [state["param_groups"] for state in before["optimizer_states"]]
    assert checkpoint["lr_schedulers"] == before["lr_schedulers"]


def test_keep_configured_model_fails_loudly_when_lightning_changes(monkeypatch):
    monkeypatch.delattr(LightningCLI, "_parse_ckpt_path")
    with pytest.raises(internals.LightningChanged, match=r"LightningCLI\._parse_ckpt_path"):
        DiffusionCLI(args=["--config", TINY], run=False)


def test_keep_configured_model_fails_loudly_when_its_override_is_not_called():
    class NotCalled(DiffusionCLI):  # as if LightningCLI called something else
        def _parse_ckpt_path(self) -> None:
            pass

    with pytest.raises(internals.LightningChanged, match="no longer calls _parse_ckpt_path"):
        NotCalled(args=["--config", TINY], run=False)


# The hyper-parameters the CLI builds a module with


class Recorder(LightningModule):
    def __init__(self, width: int = 1) -> None:
        super().__init__()
        self.given = internals.cli_hyperparameters()
        self.save_hyperparameters()


def test_cli_hyperparameters_are_set_by_the_cli_only(resumed):
    assert Recorder().given is None
    cli, _, _ = resumed
    # save_config kept the YAML of the parts: only under the CLI's context variable
    assert cli.model.hparams["unet"]["class_path"] == "diffusion_apps.nn.UNet"
    assert cli.model.hparams["_instantiator"] == "lightning.pytorch.cli.instantiate_module"


def test_given_hyperparameters_are_what_the_module_saves():
    config = {"_class_path": f"{__name__}.Recorder", "width": 3}
    with internals.given_hyperparameters(config):
        module = Recorder(width=5)
    assert module.given == {**config, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    assert dict(module.hparams) == module.given
    assert internals.cli_hyperparameters() is None  # reset on leaving


def test_hyperparameter_adapters_fail_loudly_when_lightning_changes(monkeypatch):
    from lightning.pytorch.core.mixins import hparams_mixin

    for name in ("_given_hyperparameters", "_given_hyperparameters_context"):
        monkeypatch.delattr(hparams_mixin, name)
    with pytest.raises(internals.LightningChanged, match=lightning.__version__):
        internals.cli_hyperparameters()
    changed = pytest.raises(internals.LightningChanged, match="_given_hyperparameters_context")
    with changed, internals.given_hyperparameters({}):
        pass


# ModelCheckpoint: write `last` now


def test_save_last_checkpoint_writes_last_at_this_step(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2, save_top_k=0)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(BoringModel())
    assert internals.last_saved_step(cb) == 2  # the periodic save, not the final step
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2

    internals.save_last_checkpoint(cb, trainer)
    assert internals.last_saved_step(cb) == 3
    assert cb.last_model_path == str(tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3


def test_checkpoint_adapters_fail_loudly_when_lightning_changes():
    with pytest.raises(internals.LightningChanged, match="_last_global_step_saved"):
        internals.last_saved_step(object())
    with pytest.raises(internals.LightningChanged, match="_monitor_candidates"):
        internals.save_last_checkpoint(object(), None)


# DDPStrategy: find unused parameters


def test_find_unused_parameters_reaches_distributed_data_parallel(monkeypatch):
    wrapped = {}

    def fake_ddp(module, device_ids, **kwargs):
        wrapped.update(kwargs)
        return module

    monkeypatch.setattr("lightning.pytorch.strategies.ddp.DistributedDataParallel", fake_ddp)
    strategy = DDPStrategy(accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")])
    internals.find_unused_parameters(strategy)
    strategy._setup_model(torch.nn.Linear(1, 1))  # what DDPStrategy calls to wrap the model
    assert wrapped == {"find_unused_parameters": True}


def test_find_unused_parameters_fails_loudly_when_lightning_changes():
    with pytest.raises(internals.LightningChanged, match="_ddp_kwargs"):
        internals.find_unused_parameters(object())


# No other module touches Lightning's private names


def _private_names_defined_in(root: Path) -> set[str]:
    """``_x`` (not dunder) methods of classes and ``self._x`` attributes under ``root``."""
    names = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names |= {d.name for d in node.body if isinstance(d, ast.FunctionDef)}
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def _names_bound_in(trees) -> set[str]:
    """Every name the package itself defines: its functions, classes, variables, arguments and
    attributes (``self._trainer`` is ours, even if Lightning has one too)."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return names


def lightning_private_uses(sources: dict[str, str], classes) -> list[str]:
    """``module:line what`` for each Lightning private name ``sources`` ({module: source}) use:
    a ``from lightning... import _x``, an attribute ``._x`` (or ``getattr(..., "_x")``) that
    Lightning defines and these sources do not, an override of a private method of a Lightning
    base class (``classes(module)``: the module's namespace, to find the bases)."""
    trees = {module: ast.parse(source) for module, source in sources.items()}
    lightning_private = _private_names_defined_in(LIGHTNING)
    torch_private = _private_names_defined_in(Path(torch.__file__).parent / "nn")
    hooks = lightning_private - torch_private  # torch's hooks are torch's business
    private = hooks - _names_bound_in(trees.values())
    uses = []
    for module, tree in trees.items():
        for node in ast.walk(tree):
            line = getattr(node, "lineno", 0)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning"):
                parts = node.module.split(".") + [a.name for a in node.names]
                uses += [f"{module}:{line} imports {p}" for p in parts if p.startswith("_")]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("lightning") and "._" in alias.name:
                        uses.append(f"{module}:{line} imports {alias.name}")
            elif isinstance(node, ast.Attribute) and node.attr in private:
                uses.append(f"{module}:{line} uses .{node.attr}")
            elif isinstance(node, ast.Constant) and node.value in private:
                uses.append(f"{module}:{line} names {node.value!r}")
            elif isinstance(node, ast.ClassDef):
                methods = [d for d in node.body if isinstance(d, ast.FunctionDef)]
                for method in (d for d in methods if d.name in hooks):
                    bases = classes(module)[node.name].__mro__[1:]
                    if any(
                        b.__module__.startswith("lightning") and method.name in vars(b)
                        for b in bases
                    ):
                        uses.append(f"{module}:{method.lineno} overrides {method.name}")
    return uses


def test_only_the_adapter_touches_lightning_private_names():
    sources = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "lightning_internals.py":
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            sources[module] = path.read_text(encoding="utf-8")
    uses = lightning_private_uses(sources, lambda module: vars(importlib.import_module(module)))
    assert not uses, "Lightning private names outside lightning_internals.py:\n" + "\n".join(uses)


OLD_USES = """
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters


class CLI(LightningCLI):
    def _parse_ckpt_path(self):
        pass

    def _own_helper(self):
        pass


class Checkpoint(ModelCheckpoint):
    def on_train_batch_end(self, trainer, *args):
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        trainer.strategy._ddp_kwargs["find_unused_parameters"] = True
        getattr(trainer.strategy, "_ddp_kwargs")
"""


def test_the_scan_finds_what_the_package_used_to_do():
    """The scan is not vacuous: on the package's former uses it names each one."""
    namespace = {}
    exec(compile(OLD_USES, "old", "exec"), namespace)
    uses = lightning_private_uses({"old": OLD_USES}, lambda module: namespace)
    assert sorted(use.split(" ", 1)[1] for use in uses) == sorted(
        [
            "imports _given_hyperparameters",
            "overrides _parse_ckpt_path",
            "uses ._last_global_step_saved",
            "uses ._save_last_checkpoint",
            "uses ._monitor_candidates",
            "uses ._ddp_kwargs",
            "names '_ddp_kwargs'",
        ]
    ), uses
