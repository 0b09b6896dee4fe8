"""diffusers ``AutoencoderKL`` folders (Stable Diffusion's ``vae/``) → our first stage.

A diffusers model folder holds ``config.json`` (the constructor's arguments) and the weights,
``diffusion_pytorch_model.safetensors`` or ``.bin``. Its AutoencoderKL is CompVis's LDM
autoencoder, which ours expresses with ``norm_eps=1e-6`` and ``downsample_padding="asymmetric"``
(nn/first_stage.py); the config becomes our :class:`~diffusion_apps.nn.Autoencoder`'s options and
the state dict ours by renaming, the attention's separate q, k, v projections concatenated into
our fused qkv. Pure torch (safetensors if installed, for ``.safetensors``): diffusers is never
imported (the tests compare against it on identical inputs).

Key map (L = ``layers_per_block``; ``resnets`` layers norm1, conv1, norm2, conv2, conv_shortcut
→ in_norm, in_conv, out_norm, out_conv, skip)::

    encoder.conv_in                        encoder.conv_in
    encoder.down_blocks.i.resnets.j        encoder.blocks.{i(L+1) + j}.0
    encoder.down_blocks.i.downsamplers.0.conv   encoder.blocks.{i(L+1) + L}.0
    {en,de}coder.mid_block.resnets.j       {en,de}coder.middle.{2j}   (.j without attention)
    {en,de}coder.mid_block.attentions.0    {en,de}coder.middle.1: group_norm → norm,
        to_q | to_k | to_v (or query | key | value) → attn.qkv (rows [q; k; v]),
        to_out.0 (or proj_attn) → attn.out; 1×1-conv weights (C, C, 1, 1) squeezed
    encoder.conv_norm_out, encoder.conv_out    encoder_out.0, encoder_out.2
    quant_conv, post_quant_conv            quant_conv, post_quant_conv
    decoder.conv_in                        decoder.conv_in
    decoder.up_blocks.i.resnets.j          decoder.blocks.i.j   (i = 0: the lowest resolution)
    decoder.up_blocks.i.upsamplers.0.conv  decoder.blocks.i.{L+1}.conv
    decoder.conv_norm_out, decoder.conv_out    decoder.out.0, decoder.out.2
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

CONFIG = "config.json"
SAFETENSORS = "diffusion_pytorch_model.safetensors"
BIN = "diffusion_pytorch_model.bin"

# ``diffusers.AutoencoderKL.__init__``'s defaults: what a config.json without the key means
# (Stable Diffusion v1's, written by diffusers 0.6, has no scaling_factor).
VAE_DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215,
    shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)  # fmt: skip


def read_folder(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """The config and state dict of the diffusers model folder ``path`` (or of its ``vae/``
    when ``path`` is a whole Stable Diffusion pipeline folder, with ``model_index.json``).

    The weights are ``diffusion_pytorch_model.safetensors`` (read with the ``safetensors``
    package) or else ``diffusion_pytorch_model.bin`` (``torch.load(weights_only=True)``,
    memory-mapped).

    Raises:
        FileNotFoundError: no folder, no config.json or no weights file, naming what to place
            where.
        ImportError: only a .safetensors file and the safetensors package is not installed.
        ValueError: a config.json that is not a JSON object, or a weights file that is not a
            state dict.
    """
    folder = Path(path)
    if not (folder / CONFIG).is_file() and (folder / "vae" / CONFIG).is_file():
        folder = folder / "vae"  # a pipeline folder: its VAE
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give a diffusers model folder")
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(
            f"{folder} has no {CONFIG}: place the model's config.json (the vae/ folder of a "
            f"Stable Diffusion repository) in {folder}"
        )
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG} holds no JSON object of constructor arguments")
    if (folder / SAFETENSORS).is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(
                f"reading {folder / SAFETENSORS} needs the safetensors package "
                f"(pip install safetensors), or place {BIN} in {folder} instead"
            ) from None
        state = load_file(folder / SAFETENSORS)
    elif (folder / BIN).is_file():
        try:
            state = torch.load(folder / BIN, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # torch's pre-1.6 format cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            state = torch.load(folder / BIN, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"{folder} has no weights: place {SAFETENSORS} (or {BIN}) beside its {CONFIG}"
        )
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(f"the weights in {folder} are not a state dict (names to tensors)")
    return config, state


def _config(config: Mapping) -> dict:
    """``config`` over diffusers' defaults; ValueError unless it is an AutoencoderKL of the
    layout ours expresses (LDM's: plain down / up blocks, SiLU, quant convs, decoding to the
    input's channels)."""
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ValueError(f"config: _class_name {name!r} is not a diffusers AutoencoderKL")
    c = VAE_DEFAULTS | dict(config)
    levels = len(c["block_out_channels"])
    required = {
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "act_fn": "silu",
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "out_channels": c["in_channels"],
    }
    for key, value in required.items():
        given = list(c[key]) if isinstance(c[key], tuple | list) else c[key]
        if given != value:
            raise ValueError(f"config: {key}={c[key]!r} is not supported (only {value!r})")
    return c


def vae_options(config: Mapping, image_size: int | None = None) -> dict:
    """Our Autoencoder's constructor options for the diffusers AutoencoderKL of ``config``.

    ``block_out_channels`` (w_0, w_1, …) are base_channels = w_0 and channel_mult w_i / w_0;
    ``layers_per_block`` is num_res_blocks (the decoder's L + 1 per level are ours too); the
    middle blocks' one attention head spans the last width (``mid_block_add_attention``: whether
    they have one). ``image_size``: the images ours
    will take, default the config's ``sample_size``.
    """
    c = _config(config)
    widths = tuple(c["block_out_channels"])
    if not widths or any(not isinstance(w, int) or w % widths[0] for w in widths):
        raise ValueError(
            f"config: block_out_channels={widths} must be positive multiples of the first"
        )
    size = c["sample_size"]
    size = size[0] if isinstance(size, list | tuple) else size
    return dict(
        in_channels=c["in_channels"],
        latent_channels=c["latent_channels"],
        image_size=int(size if image_size is None else image_size),
        base_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=c["layers_per_block"],
        attention_resolutions=(),
        num_head_channels=widths[-1],
        dropout=0.0,
        num_groups=c["norm_num_groups"],
        norm_eps=1e-6,
        downsample_padding="asymmetric",
        middle_attention=bool(c["mid_block_add_attention"]),
    )


def autoencoder_kl_options(config: Mapping) -> dict:
    """Our AutoencoderKL method's options beside the network: the latent scale s that a stage 2
    multiplies z by (``scaling_factor``; diffusers' default 0.18215 when the config has none).

    Raises:
        ValueError: a ``shift_factor`` or per-channel ``latents_mean`` / ``latents_std``
            (z ↦ (z − shift)·s, SD3's and FLUX's): our stage 2 only scales.
    """
    c = _config(config)
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if c[key] is not None:
            raise ValueError(f"config: {key}={c[key]!r} is not supported (our latents only scale)")
    return {"scaling_factor": float(c["scaling_factor"])}


# -- state dicts ----------------------------------------------------------------------------------

RESNET = {"norm1": "in_norm", "conv1": "in_conv", "norm2": "out_norm", "conv2": "out_conv",
          "conv_shortcut": "skip"}  # fmt: skip
ATTENTION = {"group_norm": "norm", "to_out.0": "attn.out", "proj_attn": "attn.out"}
QKV = {"to_q": 0, "query": 0, "to_k": 1, "key": 1, "to_v": 2, "value": 2}
FIXED = {
    "encoder.conv_norm_out": "encoder_out.0",
    "encoder.conv_out": "encoder_out.2",
    "decoder.conv_norm_out": "decoder.out.0",
    "decoder.conv_out": "decoder.out.2",
    "encoder.conv_in": "encoder.conv_in",
    "decoder.conv_in": "decoder.conv_in",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}


def our_key(key: str, num_res_blocks: int, middle_attention: bool = True) -> tuple[str, int | None]:
    """A diffusers AutoencoderKL key → ours, and for a q / k / v projection its row block
    (0, 1, 2) in our fused qkv (None otherwise)."""
    L, stride = num_res_blocks, 2 if middle_attention else 1  # middle: res, [attention,] res
    module, _, param = key.rpartition(".")
    if module in FIXED:
        return f"{FIXED[module]}.{param}", None
    patterns = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda i, j, layer: f"encoder.blocks.{int(i) * (L + 1) + int(j)}.0.{RESNET[layer]}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv",
         lambda i: f"encoder.blocks.{int(i) * (L + 1) + L}.0"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)",
         lambda part, j, layer: f"{part}.middle.{stride * int(j)}.{RESNET[layer]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda i, j, layer: f"decoder.blocks.{i}.{j}.{RESNET[layer]}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv",
         lambda i: f"decoder.blocks.{i}.{L + 1}.conv"),
    ]  # fmt: skip
    for pattern, ours in patterns:
        match = re.fullmatch(pattern, module)
        if match:
            try:
                return f"{ours(*match.groups())}.{param}", None
            except KeyError:  # a layer no resnet of this layout has (time_emb_proj, ...)
                break
    match = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module)
    if match and match[2] in ATTENTION:
        return f"{match[1]}.middle.1.{ATTENTION[match[2]]}.{param}", None
    if match and match[2] in QKV:
        return f"{match[1]}.middle.1.attn.qkv.{param}", QKV[match[2]]
    raise ValueError(f"{key!r} is not a key of diffusers' AutoencoderKL (of the layout we take)")


def convert_vae(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict as ``model``'s (our Autoencoder built from
    :func:`vae_options`), fp32, checked against ``model`` tensor by tensor.

    Raises:
        ValueError: a key of no AutoencoderKL; or weights that do not fit the network the config
            builds, naming the first tensor that does not (both names and both shapes) or the
            tensors missing.
    """
    own = model.state_dict()
    layout = model.encoder.num_res_blocks, model.encoder.spec.middle_attention
    out: dict[str, Tensor] = {}
    theirs: dict[str, str] = {}  # our key → the (first) diffusers key it came from
    qkv: dict[str, list[Tensor | None]] = {}
    for key, value in state.items():
        ours, part = our_key(key, *layout)
        value = value.float()
        if ".middle.1.attn." in ours and value.dim() == 4:  # a 1×1 conv (C, C, 1, 1) → Linear
            value = value[:, :, 0, 0]
        theirs.setdefault(ours, key)
        if part is None:
            out[ours] = value
        else:
            qkv.setdefault(ours, [None, None, None])[part] = value
    for ours, parts in qkv.items():
        if any(p is None for p in parts):
            raise ValueError(f"{theirs[ours]}: the attention lacks one of its q, k, v projections")
        if len({p.shape for p in parts}) > 1:
            shapes = ", ".join(str(tuple(p.shape)) for p in parts)
            raise ValueError(f"{theirs[ours]}: the q, k, v projections differ in shape ({shapes})")
        out[ours] = torch.cat(parts)  # rows [q; k; v], each (heads, d): ours
    fit = "do not fit the network the config builds"
    for ours, value in out.items():
        if ours not in own:
            raise ValueError(f"the weights {fit}: {theirs[ours]} (our {ours}) has no place in it")
        if value.shape != own[ours].shape:
            raise ValueError(
                f"the weights {fit}: {theirs[ours]} (our {ours}) is {tuple(value.shape)} in the "
                f"weights, {tuple(own[ours].shape)} in the network"
            )
    missing = [k for k in own if k not in out]
    if missing:
        raise ValueError(f"the weights {fit}: {len(missing)} tensors missing (first: {missing[0]})")
    return out
