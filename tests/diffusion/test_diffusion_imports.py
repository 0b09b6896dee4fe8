"""diffusion_apps.diffusion is pure torch: it must import with Lightning unavailable."""

import subprocess
import sys
from pathlib import Path

BLOCK_LIGHTNING = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning"):
            raise ImportError(f"{name} is blocked")

sys.meta_path.insert(0, Block())
import diffusion_apps.diffusion
assert not any(m.split(".")[0] in ("lightning", "pytorch_lightning") for m in sys.modules)
"""


def test_diffusion_imports_without_lightning():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_LIGHTNING], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
