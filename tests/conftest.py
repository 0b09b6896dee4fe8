import os
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def tiny_parts(name: str) -> list[str]:
    """The tiny configs whose checkpoints ``configs/tiny/<name>.yaml`` builds on: the names
    ``X`` of the ``runs/tiny_X/`` paths it holds (a stage-1 autoencoder, a DDPM, a teacher)."""
    return sorted(
        set(re.findall(r"runs/tiny_(\w+)/", (CONFIGS / "tiny" / f"{name}.yaml").read_text()))
    )


def tiny_configs() -> list[str]:
    """The names of every ``configs/tiny/*.yaml``, each after the ones it builds on: the tests
    that cover every method discover them, so a new method's tiny config joins them unlisted."""
    pending, ordered = sorted(p.stem for p in (CONFIGS / "tiny").glob("*.yaml")), []
    while pending:
        ready = [n for n in pending if set(tiny_parts(n)) <= set(ordered)]
        if not ready:
            raise ValueError(f"configs/tiny: {pending} build on each other or on a missing config")
        ordered += ready
        pending = [n for n in pending if n not in ready]
    return ordered


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine thrash (a
    module-scoped fixture training under two threads beside the other xdist worker took 258 s
    instead of 11 s). Session-scoped, so it is set before any module's fixtures run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a temporary working directory (the CLI writes runs/ relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli_in(root: Path, *commands: list[str]) -> Path:
    """Run CLI commands (``["fit", "--config", ...]``) in ``root`` (where they write runs/);
    for module-scoped fixtures, which cannot use ``monkeypatch``. Returns ``root``."""
    from diffusion_apps.cli import main

    cwd = os.getcwd()
    os.chdir(root)
    try:
        for args in commands:
            main(args)
    finally:
        os.chdir(cwd)
    return root


def fit_tiny(root: Path, *names: str, steps: int = 2) -> Path:
    """Fit ``configs/tiny/<name>.yaml`` for ``steps`` steps each, in order, in ``root``."""
    config = [["fit", "--config", str(CONFIGS / "tiny" / f"{n}.yaml")] for n in names]
    return run_cli_in(root, *[[*c, "--trainer.max_steps", str(steps)] for c in config])


def fit_resuming(root, config, name: str, steps: int, *extra: str) -> dict:
    """``fit --ckpt_path last``: the first run of ``name`` starts from scratch, later ones
    resume; returns the ``last.ckpt`` written."""
    args = ["fit", "--config", str(config), "--trainer.max_steps", str(steps)]
    args += ["--trainer.logger.init_args.name", name, "--ckpt_path", "last", *extra]
    run_cli_in(root, args)
    versions = list((root / "runs" / name).iterdir())
    assert [v.name for v in versions] == ["version_0"]  # the resumed run went on there
    return torch.load(versions[0] / "checkpoints/last.ckpt", weights_only=True)


def assert_same_training_state(a: dict, b: dict, steps: int) -> None:
    """Two checkpoints hold the same training state, bit for bit."""
    assert a["global_step"] == b["global_step"] == steps
    for key in ("state_dict", "current_model_state"):  # EMA (when used) and raw weights
        assert a.get(key, {}).keys() == b.get(key, {}).keys()
        for name in a.get(key, {}):
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for i, moments in opt_a["state"].items():
            for name, value in moments.items():
                assert torch.equal(value, opt_b["state"][i][name]), f"AdamW {i}.{name}"
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["ImageDataModule"] == b["ImageDataModule"]
