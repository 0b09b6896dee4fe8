"""Exact resume: N steps in one go and N/2 steps + ``--ckpt_path last`` give identical bits.

The tiny DDPM trains on epochs of 3 batches with random flips, validation every 2 steps and a
checkpoint every 3, so the resume points fall mid-epoch, at the end of an epoch, on a
validation step and between two periodic checkpoints (where ``Checkpoint`` writes ``last``).
Every other method's tiny config resumes at its validation step, with its own state (EMA target,
discriminator start, latent scale factor).
"""

import pytest
import torch
import yaml

from tests.conftest import CONFIGS, run_cli_in

STEPS = 8


def write_config(root, num_workers: int = 0):
    config = yaml.safe_load((CONFIGS / "tiny/ddpm.yaml").read_text())
    config["trainer"]["limit_train_batches"] = 3
    config["trainer"]["callbacks"][1]["init_args"]["every_n_train_steps"] = 3
    config["data"]["init_args"] |= {"random_flip": True, "num_workers": num_workers}
    path = root / f"workers{num_workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(root, config, name: str, steps: int, *extra: str) -> dict:
    """``fit --ckpt_path last``: the first run of ``name`` starts from scratch, later ones
    resume; returns the ``last.ckpt`` written."""
    args = ["fit", "--config", str(config), "--trainer.max_steps", str(steps)]
    args += ["--trainer.logger.init_args.name", name, "--ckpt_path", "last", *extra]
    run_cli_in(root, args)
    versions = list((root / "runs" / name).iterdir())
    assert [v.name for v in versions] == ["version_0"]  # the resumed run went on there
    return torch.load(versions[0] / "checkpoints/last.ckpt", weights_only=True)


def assert_same_training_state(a: dict, b: dict, steps: int = STEPS) -> None:
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Runs before the autouse one-thread fixture: set the same thread count as the tests (CPU
    kernels sum in another order on another number of threads)."""
    root, threads = tmp_path_factory.mktemp("resume"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(root, write_config(root), "whole", STEPS)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "first, num_workers",
    [(4, 0), (6, 0), (5, 1)],
    ids=["mid-epoch-at-validation", "end-of-epoch", "mid-epoch-loader-workers"],
)
def test_resume_is_bit_identical(uninterrupted, tmp_path, first, num_workers):
    config = write_config(tmp_path, num_workers)
    stopped = fit(tmp_path, config, "split", first)
    assert stopped["global_step"] == first  # `last` was written at the final step
    assert_same_training_state(uninterrupted, fit(tmp_path, config, "split", STEPS))


PARTS = ["ddpm", "diffae", "ldm_autoencoder", "pdae"]  # the checkpoints others build on


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    fits = [["fit", "--config", str(CONFIGS / f"tiny/{name}.yaml")] for name in PARTS]
    return run_cli_in(root, *[[*args, "--trainer.max_steps", "2"] for args in fits])


@pytest.mark.parametrize(
    "method",
    ["diffae", "ldm_autoencoder", "pdae", "guided_classifier", "consistency", "diffae_latent",
     "ldm", "ldm_caption", "pdae_latent"],
)  # fmt: skip
def test_every_method_resumes_exactly(parts, method):
    config = CONFIGS / f"tiny/{method}.yaml"
    quick = ["--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps", "0"]
    if "num_val_samples" in yaml.safe_load(config.read_text())["model"]["init_args"]:
        quick.append("--model.init_args.num_val_samples=0")  # validation without its pictures
    whole = fit(parts, config, f"{method}_whole", 4, *quick)
    fit(parts, config, f"{method}_split", 2, *quick)
    split = fit(parts, config, f"{method}_split", 4, *quick)
    assert_same_training_state(whole, split, steps=4)
