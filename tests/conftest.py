import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine thrash."""
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
