"""Exact resume: N steps in one go and N/2 steps + ``--ckpt_path last`` give identical bits.

The tiny DDPM trains on epochs of 3 batches with random flips, validation every 2 steps and a
checkpoint every 3, so the resume points fall mid-epoch, at the end of an epoch, on a
validation step and between two periodic checkpoints (where ``Checkpoint`` writes ``last``).
Every other method: tests/methods/test_resume_methods.py.
"""

import random

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from tests.conftest import CONFIGS, assert_same_training_state, fit_resuming

STEPS = 8


class DrawsInValidation(L.Callback):
    """Validation code that draws from the global streams (a user's metric, say): the resume at
    a validation step is exact only if validation leaves the training streams as it found them."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
        torch.rand(3), np.random.rand(), random.random()


def write_config(root, num_workers: int = 0):
    config = yaml.safe_load((CONFIGS / "tiny/ddpm.yaml").read_text())
    config["trainer"]["limit_train_batches"] = 3
    config["trainer"]["callbacks"][1]["init_args"]["every_n_train_steps"] = 3
    config["trainer"]["callbacks"].append({"class_path": "tests.test_resume.DrawsInValidation"})
    config["data"]["init_args"] |= {"random_flip": True, "num_workers": num_workers}
    path = root / f"workers{num_workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run, on one thread like the tests (conftest's session fixture): CPU
    kernels sum in another order on another number of threads."""
    root = tmp_path_factory.mktemp("resume")
    return fit_resuming(root, write_config(root), "whole", STEPS)


@pytest.mark.parametrize(
    "first, num_workers",
    [(4, 0), (6, 0), (5, 1)],
    ids=["mid-epoch-at-validation", "end-of-epoch", "mid-epoch-loader-workers"],
)
def test_resume_is_bit_identical(uninterrupted, tmp_path, first, num_workers):
    config = write_config(tmp_path, num_workers)
    stopped = fit_resuming(tmp_path, config, "split", first)
    assert stopped["global_step"] == first  # `last` was written at the final step
    assert_same_training_state(uninterrupted, fit_resuming(tmp_path, config, "split", STEPS), STEPS)
