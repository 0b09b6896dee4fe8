"""Every method's tiny config resumes exactly: 4 steps in one go and 2 + ``--ckpt_path last``
give identical bits, the resume at its validation step, with the method's own state (the
consistency target, the discriminator start, the latent scale factor, the code statistics)."""

import pytest
import yaml

from tests.conftest import (
    CONFIGS,
    assert_same_training_state,
    fit_resuming,
    run_cli_in,
    tiny_configs,
    tiny_parts,
)

# The checkpoints others build on, in the order they build on each other.
PARTS = [name for name in tiny_configs() if any(name in tiny_parts(n) for n in tiny_configs())]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    fits = [["fit", "--config", str(CONFIGS / f"tiny/{name}.yaml")] for name in PARTS]
    return run_cli_in(root, *[[*args, "--trainer.max_steps", "2"] for args in fits])


@pytest.mark.parametrize(
    "method", [name for name in tiny_configs() if name != "ddpm"]
)  # the DDPM's resume: tests/test_resume.py
def test_every_method_resumes_exactly(parts, method):
    config = CONFIGS / f"tiny/{method}.yaml"
    quick = ["--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps", "0"]
    if "num_val_samples" in yaml.safe_load(config.read_text())["model"]["init_args"]:
        quick.append("--model.init_args.num_val_samples=0")  # validation without its pictures
    whole = fit_resuming(parts, config, f"{method}_whole", 4, *quick)
    fit_resuming(parts, config, f"{method}_split", 2, *quick)
    split = fit_resuming(parts, config, f"{method}_split", 4, *quick)
    assert_same_training_state(whole, split, steps=4)
