"""``import`` turns guided-diffusion's released files into checkpoints of ours that every command
takes: tiny random-weight networks of the official code, saved as the releases are (a plain
state dict), imported through the CLI, compute what the official ones compute."""

import warnings

import pytest
import torch

from diffusion_apps.checkpoint import load_module
from diffusion_apps.cli import main
from diffusion_apps.interop.guided_diffusion import GUIDED_DEFAULTS, parse_flags
from diffusion_apps.methods import DDPM, NoisyClassifier
from tests.factories import randomize_norms_around_one_

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from guided_diffusion import script_util

MODEL_FLAGS = (
    "--attention_resolutions 16,8 --class_cond False --diffusion_steps 100 --image_size 64 "
    "--learn_sigma True --noise_schedule cosine --num_channels 32 --num_head_channels 8 "
    "--num_res_blocks 1 --resblock_updown True --use_new_attention_order True "
    "--use_scale_shift_norm True"
)
CLASSIFIER_FLAGS = (
    "--image_size 64 --classifier_attention_resolutions 16,8 --classifier_depth 1 "
    "--classifier_width 64 --classifier_pool attention --classifier_resblock_updown True "
    "--classifier_use_scale_shift_norm True"
)


def released(module: torch.nn.Module, path, seed: int = 0):
    """``module`` with random weights, saved as a release: ``torch.save(state_dict)``."""
    randomize_norms_around_one_(module, seed, std=0.1)
    torch.save(module.state_dict(), path)
    return module


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    options = parse_flags(MODEL_FLAGS, GUIDED_DEFAULTS)  # the official defaults (test_interop)
    names = options.keys() & set(script_util.create_model.__code__.co_varnames)
    official = released(script_util.create_model(**{k: options[k] for k in names}), root / "d.pt")
    classifier_defaults = script_util.classifier_defaults()
    official_classifier = released(
        script_util.create_classifier(**{**classifier_defaults, "classifier_width": 64,
                                         "classifier_depth": 1,
                                         "classifier_attention_resolutions": "16,8"}),
        root / "c.pt", seed=1,
    )  # fmt: skip
    ddpm, classifier = root / "adm.ckpt", root / "adm_classifier.ckpt"
    main(["import", "--source", "guided-diffusion", "--weights", str(root / "d.pt"),
          "--flags", MODEL_FLAGS, "--out", str(ddpm)])  # fmt: skip
    main(["import", "--source", "guided-diffusion", "--weights", str(root / "c.pt"),
          "--flags", CLASSIFIER_FLAGS, "--diffusion", str(ddpm),
          "--out", str(classifier)])  # fmt: skip
    return root, official, official_classifier


def test_the_imported_diffusion_model_computes_the_official_output(imported):
    root, official, _ = imported
    ddpm = load_module(root / "adm.ckpt", DDPM)
    assert ddpm.schedule.num_timesteps == 100 and ddpm.schedule.kind == "cosine"
    x, t = (
        torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)),
        torch.tensor([7, 93]),
    )
    assert ddpm.variance == "learned"  # --learn_sigma True: [ε, v], Σ_θ from v
    with torch.no_grad():
        expected = official(x, t)  # (B, 6, H, W)
        relative = (ddpm.model_output(x, t) - expected).abs().max() / expected.abs().max()
    assert relative < 1e-5


def test_the_imported_classifier_computes_the_official_logits(imported):
    root, _, official = imported
    classifier = load_module(root / "adm_classifier.ckpt", NoisyClassifier)
    x, t = (
        torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)),
        torch.tensor([0, 60]),
    )
    with torch.no_grad():
        expected = official(x, t)
        relative = (classifier(x, t) - expected).abs().max() / expected.abs().max()
    assert relative < 1e-5


def test_sample_takes_the_imported_pair_for_guided_sampling(imported, tmp_path):
    root, _, _ = imported
    main(["sample", "--ckpt_path", str(root / "adm.ckpt"), "--classifier_path",
          str(root / "adm_classifier.ckpt"), "--labels", "[1, 207]", "--num_samples", "2",
          "--steps", "3", "--precision", "32", "--out_dir", str(tmp_path)])  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "000000.png",
        "000001.png",
        "grid.png",
    ]


def test_weights_that_do_not_fit_the_flags_name_the_tensor(imported, tmp_path):
    root, _, _ = imported
    wider = MODEL_FLAGS.replace("--num_channels 32", "--num_channels 64")
    with pytest.raises(SystemExit, match=r"error: .*time_embed.0.weight is \(128, 32\) in the "
                       r"file, \(256, 64\) in the network"):  # fmt: skip
        main(["import", "--source", "guided-diffusion", "--weights", str(root / "d.pt"),
              "--flags", wider, "--out", str(tmp_path / "x.ckpt")])  # fmt: skip
    with pytest.raises(SystemExit, match="error: .*give --diffusion"):
        main(["import", "--source", "guided-diffusion", "--weights", str(root / "c.pt"),
              "--flags", CLASSIFIER_FLAGS, "--out", str(tmp_path / "x.ckpt")])  # fmt: skip
    with pytest.raises(SystemExit, match="error: .*unknown flag '--num_chanels'"):
        main(["import", "--source", "guided-diffusion", "--weights", str(root / "d.pt"),
              "--flags", "--num_chanels 8", "--out", str(tmp_path / "x.ckpt")])  # fmt: skip
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_source_and_a_file_that_do_not_fit_say_so(imported, tmp_path):
    root, _, _ = imported
    out = ["--out", str(tmp_path / "x.ckpt")]
    with pytest.raises(SystemExit, match="error: .* is a file, but diffusers models are folders"):
        main(["import", "--source", "diffusers", "--weights", str(root / "d.pt"), *out])
    with pytest.raises(SystemExit, match="error: .* is a folder, but this source's weights are"):
        main(["import", "--source", "guided-diffusion", "--weights", str(tmp_path), *out])
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # needs unpickling
    with pytest.raises(
        SystemExit, match="error: cannot read checkpoint .*weights_only=True refuses"
    ):
        main(["import", "--source", "guided-diffusion", "--weights", str(tmp_path / "pickled.pt"),
              "--flags", MODEL_FLAGS, *out])  # fmt: skip
    assert not (tmp_path / "x.ckpt").exists()
