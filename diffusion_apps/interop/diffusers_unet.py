"""diffusers ``UNet2DModel`` folders (google/ddpm-cifar10-32, -celebahq-256, -church-256, ...) and
their ``DDPMScheduler`` configs → our UNet and DDPM; the way back, for ``export``, is
:mod:`diffusion_apps.interop.diffusers_export`.

These are the original DDPM's networks (Ho et al. 2020): the time embedding added before the
second norm of each ResBlock (``resnet_time_scale_shift="default"``: our
``scale_shift_norm=False``), [sin, cos] sinusoids with frequencies spaced by 1/(h − 1)
(``flip_sin_to_cos=False, freq_shift=1``: our ``sin_first, freq_shift``), downsampling convs
padded at the bottom and right only (``downsample_padding=0``: our
``downsample_padding="asymmetric"``), every group norm at ε = 1e-6 and single-head attention
at the levels of ``AttnDownBlock2D`` / ``AttnUpBlock2D``. The config becomes our
:class:`~diffusion_apps.nn.UNet`'s options, the state dict ours by renaming (the attention's
separate q, k, v projections concatenated into our fused qkv). Pure torch: diffusers is never
imported (the tests compare against it on identical inputs).

Key map (L = ``layers_per_block``; ``resnets`` layers norm1, conv1, time_emb_proj, norm2, conv2,
conv_shortcut → in_norm, in_conv, emb_proj, out_norm, out_conv, skip; ``attentions`` layers
group_norm → norm, to_q | to_k | to_v (or query | key | value) → attn.qkv (rows [q; k; v]),
to_out.0 (or proj_attn) → attn.out)::

    conv_in                                 down.conv_in
    time_embedding.linear_1, .linear_2      time_embed.0, time_embed.2
    class_embedding                         label_embed
    down_blocks.i.resnets.j                 down.blocks.{i(L+1) + j}.0
    down_blocks.i.attentions.j              down.blocks.{i(L+1) + j}.1
    down_blocks.i.downsamplers.0.conv       down.blocks.{i(L+1) + L}.0
    mid_block.resnets.j                     down.middle.{2j}   (down.middle.j without attention)
    mid_block.attentions.0                  down.middle.1
    up_blocks.i.resnets.j                   up.{i(L+1) + j}.0  (i = 0: the lowest resolution)
    up_blocks.i.attentions.j                up.{i(L+1) + j}.1
    up_blocks.i.upsamplers.0.conv           up.{i(L+1) + L}.{2 with attention, else 1}.conv
    conv_norm_out, conv_out                 out_norm, out_conv
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

# ``diffusers.UNet2DModel.__init__``'s defaults: what a config.json without the key means (the
# google/ddpm-* configs, written by diffusers 0.0.4-0.3, lack most of the newer keys).
UNET_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0,
    act_fn="silu", attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
    num_class_embeds=None, num_train_timesteps=None,
)  # fmt: skip
# ``diffusers.DDPMScheduler.__init__``'s defaults.
SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
    thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
    sample_max_value=1.0, timestep_spacing="leading", steps_offset=0,
    rescale_betas_zero_snr=False,
)  # fmt: skip
DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}  # type → has attention
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}


class UnsupportedConfig(ValueError):
    """A diffusers config value our UNet / DDPM cannot express; the message names the key."""


def _with_defaults(config: Mapping, defaults: Mapping, what: str) -> dict:
    """``config`` over ``defaults``, its private keys (``_class_name``, ...) dropped; an unknown
    key is refused (a newer diffusers option could change the network)."""
    given = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UnsupportedConfig(
            f"{what} config: unknown key(s) {unknown}; known: {sorted(defaults)}"
        )
    return dict(defaults) | given


def _require(c: Mapping, key: str, allowed: tuple, what: str = "UNet2DModel") -> None:
    if c[key] not in allowed:
        taken = ", ".join(map(repr, allowed))
        raise UnsupportedConfig(
            f"{what} config: {key}={c[key]!r} is not supported (we take {taken})"
        )


def _block_types(name: str, types: list[str], known: dict[str, bool]) -> list[bool]:
    """Whether each block has attention; ``UNetRes`` prefixes dropped, as ``get_down_block``."""
    attention = []
    for i, kind in enumerate(types):
        kind = kind.removeprefix("UNetRes")
        if kind not in known:
            raise UnsupportedConfig(
                f"UNet2DModel config: {name}[{i}]={kind!r} is not supported (we take "
                f"{', '.join(known)})"
            )
        attention.append(known[kind])
    return attention


def _channel_mult(block_out_channels: list[int]) -> tuple[int | float, ...]:
    """Our channel_mult for ``block_out_channels`` (base = the first), refused unless our
    int(mult · base) widths reproduce every width exactly."""
    widths = block_out_channels
    if not widths or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in widths):
        mult: tuple = ()
    else:
        base = widths[0]
        mult = tuple(c // base if c % base == 0 else c / base for c in widths)
    if not mult or any(int(m * widths[0]) != c for m, c in zip(mult, widths, strict=True)):
        raise UnsupportedConfig(
            f"UNet2DModel config: block_out_channels={list(block_out_channels)} are not "
            "positive widths we can express as multiples of the first"
        )
    return mult


def unet_options(config: Mapping) -> dict:
    """Our UNet's constructor options for a diffusers ``UNet2DModel`` ``config`` (its
    config.json as a dict; missing keys take diffusers' defaults).

    Raises:
        UnsupportedConfig: (a ValueError) naming the first key whose value we cannot express:
            other block types (cross-attention, skip, ResNet-resampling, K blocks), up blocks
            that do not mirror the down blocks' attention, fourier / learned time embeddings,
            ``center_input_sample``, a mid-block scale factor ≠ 1, class embeddings other than a
            plain ``num_class_embeds`` table, activations other than SiLU, ...
    """
    c = _with_defaults(config, UNET_DEFAULTS, "UNet2DModel")
    for key, allowed in [
        ("time_embedding_type", ("positional",)), ("center_input_sample", (False,)),
        ("mid_block_type", ("UNetMidBlock2D",)), ("mid_block_scale_factor", (1,)),
        ("downsample_type", ("conv",)), ("upsample_type", ("conv",)), ("act_fn", ("silu", "swish")),
        ("downsample_padding", (0, 1)), ("resnet_time_scale_shift", ("default", "scale_shift")),
        ("class_embed_type", (None,)), ("add_attention", (True, False)),
    ]:  # fmt: skip
        _require(c, key, allowed)
    channels = list(c["block_out_channels"])
    mult = _channel_mult(channels)
    base, groups = channels[0], c["norm_num_groups"]
    down = _block_types("down_block_types", list(c["down_block_types"]), DOWN_BLOCKS)
    up = _block_types("up_block_types", list(c["up_block_types"]), UP_BLOCKS)
    if len(down) != len(channels) or len(up) != len(channels):
        raise UnsupportedConfig(
            f"UNet2DModel config: block_out_channels, down_block_types and up_block_types must "
            f"have one entry per level, got {len(channels)}, {len(down)}, {len(up)}"
        )
    if up[::-1] != down:  # our up path attends at the down path's resolutions
        raise UnsupportedConfig(
            f"UNet2DModel config: up_block_types={list(c['up_block_types'])} must mirror "
            f"down_block_types={list(c['down_block_types'])} (attention at the same levels)"
        )
    size = c["sample_size"]
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise UnsupportedConfig(f"UNet2DModel config: sample_size={size} is not square")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise UnsupportedConfig(f"UNet2DModel config: sample_size={size!r} must be a positive int")
    if c["time_embedding_dim"] not in (None, 4 * base):
        raise UnsupportedConfig(
            f"UNet2DModel config: time_embedding_dim={c['time_embedding_dim']} must be "
            f"4 · block_out_channels[0] = {4 * base} (ours)"
        )
    if not isinstance(groups, int) or c["attn_norm_num_groups"] not in (None, groups):
        raise UnsupportedConfig(
            f"UNet2DModel config: norm_num_groups={groups!r}, attn_norm_num_groups="
            f"{c['attn_norm_num_groups']!r}: we take one int group count for every norm"
        )
    resolutions = tuple(size // 2**i for i, attends in enumerate(down) if attends)
    head_dim = c["attention_head_dim"]  # None: one head as wide as the block
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
        raise UnsupportedConfig(
            f"UNet2DModel config: attention_head_dim={head_dim!r} must be None or a positive int"
        )
    attended = [ch for ch, a in zip(channels, down, strict=True) if a]
    attended += [channels[-1]] if c["add_attention"] else []
    if head_dim is not None and any(ch % head_dim for ch in attended):
        raise UnsupportedConfig(
            f"UNet2DModel config: attention_head_dim={head_dim} must divide the channels of "
            f"every attention block ({sorted(set(attended))})"
        )
    scale_shift = c["resnet_time_scale_shift"] == "scale_shift"
    options = dict(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        image_size=size,
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=c["layers_per_block"],
        attention_resolutions=resolutions,
        **({"num_heads": 1} if head_dim is None else {"num_head_channels": head_dim}),
        dropout=c["dropout"],
        num_groups=groups,
        scale_shift_norm=scale_shift,
        norm_eps=c["norm_eps"],
        sin_first=not c["flip_sin_to_cos"],
        freq_shift=c["freq_shift"],
        downsample_padding="asymmetric" if c["downsample_padding"] == 0 else "symmetric",
    )
    if not c["add_attention"]:
        options["middle_attention"] = False
    elif scale_shift and c["attn_norm_num_groups"] is None:  # diffusers' mid attention: no norm
        options["middle_attention_norm"] = False
    if c["num_class_embeds"] is not None:  # nn.Embedding(num_class_embeds, 4 · base)
        options |= dict(num_classes=c["num_class_embeds"], null_label=False)
    return options


# -- state dicts ----------------------------------------------------------------------------------

RESNET = {"norm1": "in_norm", "conv1": "in_conv", "time_emb_proj": "emb_proj",
          "norm2": "out_norm", "conv2": "out_conv", "conv_shortcut": "skip"}  # fmt: skip
QKV = {"to_q": 0, "query": 0, "to_k": 1, "key": 1, "to_v": 2, "value": 2}
OUT = ("to_out.0", "proj_attn")
BLOCK_KEY = r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions)\.(\d+)\.(.*)"


def _layer(prefix: str, rest: str, key: str) -> str:
    """``rest`` of the ResNet block key ``key`` (``norm1.weight``, ...) under our ``prefix``."""
    name, param = rest.split(".", 1)
    if name not in RESNET:
        raise KeyError(f"{key!r}: {name!r} is not a ResnetBlock2D layer we map")
    return f"{prefix}.{RESNET[name]}.{param}"


# UNet2DModel's modules outside the blocks → ours (the export maps them back).
FIXED_KEYS = {"conv_in": "down.conv_in", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "class_embedding": "label_embed",
              "conv_norm_out": "out_norm", "conv_out": "out_conv"}  # fmt: skip


def our_key(key: str, layers_per_block: int, model: nn.Module) -> str | tuple[str, int]:
    """A UNet2DModel key → ours; for a q/k/v projection, (our qkv key, its row block 0/1/2).

    Raises:
        KeyError: ``key`` is no UNet2DModel key we map.
    """
    n = layers_per_block
    head, _, param = key.rpartition(".")
    if head in FIXED_KEYS:
        return f"{FIXED_KEYS[head]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"down.blocks.{int(m[1]) * (n + 1) + n}.0.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        block = int(m[1]) * (n + 1) + n
        return f"up.{block}.{len(model.up[block]) - 1}.conv.{m[2]}"  # after its attention, if any
    m = re.fullmatch(BLOCK_KEY, key)
    if m is None:
        raise KeyError(f"{key!r} is not a key of diffusers' UNet2DModel that we map")
    where, i, kind, j, rest = m[1], int(m[2] or 0), m[3], int(m[4]), m[5]
    if where == "mid_block":
        attends = len(model.down.middle) == 3
        prefix = f"down.middle.{(2 * j if attends else j) if kind == 'resnets' else 1}"
    else:
        block = i * (n + 1) + j  # L + 1 blocks a level, down (its last downsamples) and up
        path = "down.blocks" if where == "down_blocks" else "up"
        prefix = f"{path}.{block}.{0 if kind == 'resnets' else 1}"
    if kind == "resnets":
        return _layer(prefix, rest, key)
    name, param = rest.rsplit(".", 1)
    if name == "group_norm":
        return f"{prefix}.norm.{param}"
    if name in QKV:
        return f"{prefix}.attn.qkv.{param}", QKV[name]
    if name in OUT:
        return f"{prefix}.attn.out.{param}"
    raise KeyError(f"{key!r} is not an attention parameter of diffusers' UNet2DModel")


def convert_unet(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A UNet2DModel's state dict as ``model``'s (our UNet built from :func:`unet_options`),
    fp32: renamed, q | k | v rows concatenated into qkv, 1×1-conv attention weights squeezed.

    Raises:
        KeyError: a key we do not map, or a q/k/v projection without its two partners.
    """
    n = model.down.num_res_blocks
    out: dict[str, Tensor] = {}
    rows: dict[str, dict[int, Tensor]] = {}
    for key, value in state.items():
        value, ours = value.float(), our_key(key, n, model)
        if ".attn." in (ours if isinstance(ours, str) else ours[0]) and value.dim() == 4:
            value = value.flatten(1)  # (C, C, 1, 1) → (C, C): an old AttentionBlock's conv
        if isinstance(ours, tuple):
            rows.setdefault(ours[0], {})[ours[1]] = value
        else:
            out[ours] = value
    for key, parts in rows.items():
        if sorted(parts) != [0, 1, 2]:
            raise KeyError(
                f"{key}: diffusers' q, k and v projections are not all in the state dict"
            )
        out[key] = torch.cat([parts[0], parts[1], parts[2]])  # rows [q; k; v] = (3, heads, d)
    return out


# -- the scheduler --------------------------------------------------------------------------------

PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# fixed_small_log draws with the same σ² = β̃ (as a standard deviation); learned_range is iDDPM's
# interpolation between log β̃ and log β (ours: "learned", the UNet's 2C outputs [ε, v]).
VARIANCES = {"fixed_small": "beta_tilde", "fixed_small_log": "beta_tilde", "fixed_large": "beta",
             "learned_range": "learned"}  # fmt: skip


def ddpm_options(scheduler_config: Mapping) -> dict:
    """Our DDPM's options (``schedule``, ``prediction``, ``variance``, ``clip_x0``) for a diffusers
    ``DDPMScheduler`` config (scheduler_config.json as a dict; missing keys take its defaults).

    β schedules: diffusers' ``linear`` is linspace(β_start, β_end, T) at any T; ours rescales by
    1000/T, so it gets β·T/1000 (the same betas). ``scaled_linear`` is our ``sqrt_linear``,
    ``squaredcos_cap_v2`` our ``cosine`` (s = 0.008, β ≤ 0.999 in both). The inference-only keys
    (``timestep_spacing``, ``steps_offset``) are ignored.

    Raises:
        UnsupportedConfig: (a ValueError) naming the key: another scheduler class, ``sigmoid`` /
            ``laplace`` betas, ``trained_betas``, zero-terminal-SNR rescaling, dynamic
            thresholding, a clip range ≠ 1, or the ``learned`` / ``fixed_large_log`` variances.
    """
    name = scheduler_config.get("_class_name", "DDPMScheduler")
    if name != "DDPMScheduler":
        raise UnsupportedConfig(f"scheduler config: _class_name={name!r} is not DDPMScheduler")
    c = _with_defaults(scheduler_config, SCHEDULER_DEFAULTS, "DDPMScheduler")
    what = "DDPMScheduler"
    _require(c, "beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"), what)
    _require(c, "prediction_type", tuple(PREDICTIONS), what)
    _require(c, "variance_type", tuple(VARIANCES), what)
    _require(c, "trained_betas", (None,), what)
    _require(c, "rescale_betas_zero_snr", (False,), what)
    _require(c, "thresholding", (False,), what)
    if c["clip_sample"]:
        _require(c, "clip_sample_range", (1, 1.0), what)
    T = c["num_train_timesteps"]
    if not isinstance(T, int) or T < 1:
        raise UnsupportedConfig(f"{what} config: num_train_timesteps={T!r} must be a positive int")
    schedule: dict = {"num_timesteps": T}
    if c["beta_schedule"] == "linear":  # ours: linspace(β_start·1000/T, β_end·1000/T, T)
        scale = T / 1000  # exactly 1.0 at T = 1000: the config's betas unchanged
        schedule |= dict(kind="linear", beta_start=c["beta_start"] * scale,
                         beta_end=c["beta_end"] * scale)  # fmt: skip
    elif c["beta_schedule"] == "scaled_linear":
        schedule |= dict(kind="sqrt_linear", beta_start=c["beta_start"], beta_end=c["beta_end"])
    else:
        schedule |= dict(kind="cosine", cosine_s=0.008)
    return {
        "schedule": {"class_path": "diffusion_apps.diffusion.NoiseSchedule", "init_args": schedule},
        "prediction": PREDICTIONS[c["prediction_type"]],
        "variance": VARIANCES[c["variance_type"]],
        "clip_x0": bool(c["clip_sample"]),
    }
