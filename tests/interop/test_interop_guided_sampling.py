"""Sampling an imported guided-diffusion model (and its imported classifier) with our samplers
equals the official sampling loops from the same x_T: DDIM η = 0 on 25 respaced steps, and
classifier-guided DDIM (10 steps) with the ``cond_fn`` of guided-diffusion's
``classifier_sample.py``, the latter also for a class-conditional model with a learned Σ (ADM-G
on ImageNet: ``model_fn`` passes y to the model)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from diffusion_apps.checkpoint import load_module
from diffusion_apps.cli import main
from diffusion_apps.interop.guided_diffusion import (
    CLASSIFIER_DEFAULTS,
    GUIDED_DEFAULTS,
    parse_flags,
)
from diffusion_apps.methods import DDPM, ClassifierGuidedDDPM, NoisyClassifier
from tests.factories import randomize_norms_around_one_

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from guided_diffusion import script_util

# The guided loop runs the classifier's backward every step: 10 steps test the guidance as 25
# would (the respacing itself is the unguided test's), at 40% of the cost.
T, STEPS, GUIDED_STEPS = 100, 25, 10
MODEL_FLAGS = (
    f"--attention_resolutions 16,8 --class_cond False --diffusion_steps {T} --image_size 64 "
    "--learn_sigma False --noise_schedule cosine --num_channels 32 --num_head_channels 8 "
    "--num_res_blocks 1 --resblock_updown True --use_new_attention_order True"
)
CONDITIONAL_FLAGS = MODEL_FLAGS.replace("--class_cond False", "--class_cond True").replace(
    "--learn_sigma False", "--learn_sigma True"
)
CLASSIFIER_FLAGS = (
    "--classifier_attention_resolutions 16,8 --classifier_depth 1 --classifier_width 64"
)


def imported(root, flags: str, seed: int):
    """The official model of ``flags`` (random weights, norms around one) and ours imported."""
    parsed = parse_flags(flags, GUIDED_DEFAULTS)
    names = parsed.keys() & set(script_util.create_model.__code__.co_varnames)
    model = script_util.create_model(**{k: parsed[k] for k in names})
    model = randomize_norms_around_one_(model, seed)
    torch.save(model.state_dict(), root / f"model{seed}.pt")
    main(["import", "--source", "guided-diffusion", "--weights", str(root / f"model{seed}.pt"),
          "--flags", flags, "--out", str(root / f"ddpm{seed}.ckpt")])  # fmt: skip
    return model, load_module(root / f"ddpm{seed}.ckpt", DDPM)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official unconditional and class-conditional models and classifier, and ours imported
    from them: {"unconditional" | "conditional": (model, ddpm, guided)}, classifier."""
    root = tmp_path_factory.mktemp("guided_sampling")
    c_flags = parse_flags(CLASSIFIER_FLAGS, CLASSIFIER_DEFAULTS)
    classifier = randomize_norms_around_one_(script_util.create_classifier(**c_flags), 1)
    torch.save(classifier.state_dict(), root / "classifier.pt")
    models = {}
    for seed, (kind, flags) in enumerate(
        [("unconditional", MODEL_FLAGS), ("conditional", CONDITIONAL_FLAGS)], start=2
    ):
        model, ddpm = imported(root, flags, seed)
        models[kind] = model, ddpm
    main(["import", "--source", "guided-diffusion", "--weights", str(root / "classifier.pt"),
          "--flags", CLASSIFIER_FLAGS, "--diffusion", str(root / "ddpm2.ckpt"),
          "--out", str(root / "classifier.ckpt")])  # fmt: skip
    ours_classifier = load_module(root / "classifier.ckpt", NoisyClassifier)
    return {
        kind: (model, ddpm, ClassifierGuidedDDPM(ddpm, ours_classifier))
        for kind, (model, ddpm) in models.items()
    }, classifier


def respaced(steps: int, learn_sigma: bool = False):
    """The official diffusion respaced to ``steps`` DDIM steps."""
    return script_util.create_gaussian_diffusion(
        steps=T, learn_sigma=learn_sigma, noise_schedule="cosine",
        timestep_respacing=f"ddim{steps}",
    )  # fmt: skip


def x_T(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


# fp32 rounding compounded over a DDIM loop: kernels sum in another order on each ISA (an AVX2-only
# Zen 1 gave 1.1e-4); a wrong coefficient or missed step moves the samples by > 1e-2.
RTOL = 5e-4


LABELS = torch.tensor([3, 871])
KINDS = ["unconditional", "conditional"]


def test_ddim_equals_the_official_respaced_ddim_loop(official):
    model, ddpm, _ = official[0]["unconditional"]
    with torch.no_grad():
        theirs = respaced(STEPS).ddim_sample_loop(
            model, (2, 3, 64, 64), noise=x_T(), clip_denoised=True
        )
    ours = ddpm.sample(2, sampler="ddim", steps=STEPS, eta=0.0, x_T=x_T())
    assert relative(ours, theirs.clamp(-1, 1)) < RTOL


# The class-conditional model is sampled by the guided loop only: there the official model_fn
# hands it y, so ours must hand it the labels too (and the guidance is checked at work).
@pytest.mark.parametrize("kind", KINDS)
def test_classifier_guided_ddim_equals_the_official_loop_with_its_cond_fn(official, kind):
    (model, _, guided), classifier = official[0][kind], official[1]
    scale = 4.0

    def cond_fn(x, t, y=None):  # classifier_sample.py's
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    def model_fn(x, t, y=None):  # classifier_sample.py's: y reaches a class_cond model only
        return model(x, t, y if kind == "conditional" else None)

    theirs = respaced(GUIDED_STEPS, kind == "conditional").ddim_sample_loop(
        model_fn, (2, 3, 64, 64), noise=x_T(), clip_denoised=True, cond_fn=cond_fn, device="cpu",
        model_kwargs={"y": LABELS},
    )  # fmt: skip
    kw = dict(labels=LABELS, sampler="ddim", steps=GUIDED_STEPS, x_T=x_T())
    unguided = guided.sample(2, scale=0.0, **kw)
    ours = guided.sample(2, scale=scale, **kw)
    assert relative(ours, theirs.clamp(-1, 1)) < RTOL
    assert relative(unguided, theirs.clamp(-1, 1)) > 1e-2  # the guidance is at work
