"""``python -m diffusion_apps import``: a released checkpoint of another codebase → one of ours.

The file written is an ordinary checkpoint (the config inside, ``weights_only=True``), which
``sample``, ``eval``, guided sampling and every method that builds on a trained model take:

    python -m diffusion_apps import --source guided-diffusion --weights 64x64_diffusion.pt \\
        --flags "$MODEL_FLAGS" --out adm64.ckpt
    python -m diffusion_apps import --source guided-diffusion --weights 64x64_classifier.pt \\
        --flags "$CLASSIFIER_FLAGS" --diffusion adm64.ckpt --out adm64_classifier.ckpt
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal


def import_checkpoint(
    source: Literal["guided-diffusion", "improved-diffusion", "diffusers", "diffusers-vae"],
    weights: str,
    out: str,
    flags: str = "",
    diffusion: str | None = None,
) -> Path:
    """Convert ``weights`` of ``source`` into our checkpoint ``out``.

    Args:
        source: "guided-diffusion": openai/guided-diffusion's diffusion models (a DDPM of ours)
            and noisy classifiers (a NoisyClassifier of ours), told apart by the file's tensors;
            "improved-diffusion": openai/improved-diffusion's (iDDPM) diffusion models;
            "diffusers": a UNet2DModel and its DDPMScheduler (a DDPM of ours); "diffusers-vae":
            an AutoencoderKL such as Stable Diffusion's VAE (our first stage, AutoencoderKL).
        weights: the released ``.pt`` file (read with ``weights_only=True``, memory-mapped); for
            diffusers, the model's folder, a pipeline folder, or a Hub id (downloaded when
            online).
        out: the checkpoint to write (atomically; an existing file is replaced only by a
            complete new one).
        flags: the official flags, exactly as its README prints them (``MODEL_FLAGS`` and
            ``DIFFUSION_FLAGS`` together, or ``CLASSIFIER_FLAGS``).
        diffusion: a classifier: our checkpoint of the diffusion model it guides (its noise
            schedule is the classifier's).

    Returns:
        The path written.
    """
    import torch

    from diffusion_apps.checkpoint import PARTS_KEY, SafeCheckpointIO, build_module, part_configs

    config, convert = SOURCES[source](weights, flags, diffusion)
    with torch.device("meta"):  # the module's names and shapes, no second copy of the weights
        module = build_module(config)
    state = convert(module)
    _check_fits(module.state_dict(), state, weights)
    checkpoint = {
        "state_dict": state,
        "hyper_parameters": dict(module.hparams),
        PARTS_KEY: part_configs(module._parts),
        "global_step": 0,
        "imported_from": {"source": source, "weights": str(weights), "flags": flags},
    }
    SafeCheckpointIO().save_checkpoint(checkpoint, out)
    print(f"wrote {out}: {type(module).__name__} from {source} {weights}")
    return Path(out)


def _official_state(weights: str) -> dict:
    """The released file's state dict, memory-mapped (its tensors are read as they are saved)."""
    from diffusion_apps.checkpoint import read_tensors

    if Path(weights).is_dir():
        raise ValueError(
            f"{weights} is a folder, but this source's weights are one .pt file (a diffusers "
            "folder: --source diffusers or diffusers-vae)"
        )
    state = read_tensors(weights, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{weights} holds no state dict (a mapping of names to tensors)")
    return state


def _prefixed(prefix: str, state: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def _openai(source: str):
    """openai/guided-diffusion's or improved-diffusion's diffusion model (a DDPM), or
    guided-diffusion's noisy classifier (a NoisyClassifier), told apart by the file's tensors:
    (our config, the module's state dict from the file)."""
    from diffusion_apps.interop import guided_diffusion as gd

    defaults = gd.GUIDED_DEFAULTS if source == "guided-diffusion" else gd.IMPROVED_DEFAULTS

    def read(weights: str, flags: str, diffusion: str | None):
        state = _official_state(weights)
        if any(k.startswith("output_blocks.") for k in state):
            parsed = gd.parse_flags(flags, defaults)
            unet = gd.unet_options(parsed, source)
            config = {
                "_class_path": "diffusion_apps.methods.DDPM",
                "unet": {"class_path": "diffusion_apps.nn.UNet", "init_args": unet},
                **gd.ddpm_options(parsed),
            }
            legacy = gd.legacy_attention(parsed, source)
            return config, lambda m: _prefixed("unet", gd.convert_unet(state, m.unet, legacy))
        if source != "guided-diffusion":
            raise ValueError(f"{weights} holds no UNetModel of {source} (no output_blocks)")
        return _classifier(state, weights, flags, diffusion)

    return read


def _classifier(state: dict, weights: str, flags: str, diffusion: str | None):
    from diffusion_apps.interop import guided_diffusion as gd

    if diffusion is None:
        raise ValueError(
            f"{weights} is a classifier: give --diffusion, our checkpoint of the diffusion model "
            "it guides (imported first)"
        )
    options = gd.classifier_options(gd.parse_flags(flags, gd.CLASSIFIER_DEFAULTS))
    config = {
        "_class_path": "diffusion_apps.methods.NoisyClassifier",
        "classifier": {"class_path": "diffusion_apps.nn.EncoderUNet", "init_args": options},
        "diffusion": str(diffusion),
    }
    return config, lambda m: _prefixed("classifier", gd.convert_classifier(state, m.classifier))


def _diffusers_folder(weights: str, part: str) -> Path:
    """A local diffusers folder: ``weights`` itself, its ``part/`` when ``weights`` is a pipeline
    (``model_index.json``), or a Hub id downloaded when online (``huggingface_hub``)."""
    folder = Path(weights)
    if folder.is_file():
        raise ValueError(
            f"{weights} is a file, but diffusers models are folders (config.json beside the "
            "weights); a guided-diffusion or improved-diffusion .pt: --source guided-diffusion "
            "or improved-diffusion"
        )
    if not folder.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", weights):
        try:
            from huggingface_hub import snapshot_download

            wanted = [f"{part}/*", "scheduler/*", "*.json", "diffusion_pytorch_model.*"]
            folder = Path(snapshot_download(weights, allow_patterns=wanted))
        except Exception as err:  # offline, or no huggingface_hub
            raise FileNotFoundError(
                f"{weights} is no folder here and cannot be downloaded ({type(err).__name__}): "
                f"place its {part}/config.json and {part}/diffusion_pytorch_model.safetensors "
                f"(and scheduler/scheduler_config.json) in a folder and give that"
            ) from None
    if (folder / "model_index.json").is_file():
        folder = folder / part
    return folder


def _diffusers(weights: str, flags: str, diffusion: str | None):
    """A diffusers UNet2DModel (a DDPM), from its folder or a pipeline's ``unet/`` and
    ``scheduler/`` (without one, DDPMScheduler's defaults)."""
    from diffusion_apps.interop import diffusers_unet
    from diffusion_apps.interop.diffusers import read_folder

    folder = _diffusers_folder(weights, "unet")
    network, state = read_folder(folder)
    scheduler_file = folder.parent / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    config = {
        "_class_path": "diffusion_apps.methods.DDPM",
        "unet": {
            "class_path": "diffusion_apps.nn.UNet",
            "init_args": diffusers_unet.unet_options(network),
        },
        **diffusers_unet.ddpm_options(scheduler),
    }
    return config, lambda m: _prefixed("unet", diffusers_unet.convert_unet(state, m.unet))


def _diffusers_vae(weights: str, flags: str, diffusion: str | None):
    """A diffusers AutoencoderKL (Stable Diffusion's ``vae/``) as our first stage, with its
    latent ``scaling_factor``."""
    import torch

    from diffusion_apps.interop import diffusers

    network, state = diffusers.read_folder(_diffusers_folder(weights, "vae"))
    config = {
        "_class_path": "diffusion_apps.methods.AutoencoderKL",
        "autoencoder": {
            "class_path": "diffusion_apps.nn.Autoencoder",
            "init_args": diffusers.vae_options(network),
        },
        **diffusers.autoencoder_kl_options(network),
    }

    def convert(module):
        converted = _prefixed("autoencoder", diffusers.convert_vae(state, module.autoencoder))
        return converted | {"logvar": torch.zeros(())}  # LDM's loss's s, trained from 0

    return config, convert


SOURCES = {
    "guided-diffusion": _openai("guided-diffusion"),
    "improved-diffusion": _openai("improved-diffusion"),
    "diffusers": _diffusers,
    "diffusers-vae": _diffusers_vae,
}


def _check_fits(own: dict, converted: dict, weights: str) -> None:
    """Every tensor of the module is in ``converted`` with its shape, or an error naming the
    first that is not."""
    missing, unexpected = (
        sorted(own.keys() - converted.keys()),
        sorted(converted.keys() - own.keys()),
    )
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not fit the network its flags build: "
            + (f"{len(missing)} tensors missing (first: {missing[0]})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else "")
        )
    for key, value in converted.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"{weights} does not fit the network its flags build: {key} is "
                f"{tuple(value.shape)} in the file, {tuple(own[key].shape)} in the network"
            )
