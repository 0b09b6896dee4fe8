"""diffusers ``UNet2DModel`` folders (google/ddpm-cifar10-32, -celebahq-256, -church-256, ...) and
their ``DDPMScheduler`` configs → our UNet and DDPM, and back (the ``export`` command:
:func:`diffusers_config`, :func:`diffusers_state_dict`, :func:`scheduler_config`).

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


def our_key(key: str, layers_per_block: int, model: nn.Module) -> str | tuple[str, int]:
    """A UNet2DModel key → ours; for a q/k/v projection, (our qkv key, its row block 0/1/2).

    Raises:
        KeyError: ``key`` is no UNet2DModel key we map.
    """
    n = layers_per_block
    fixed = {"conv_in": "down.conv_in", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "class_embedding": "label_embed",
             "conv_norm_out": "out_norm", "conv_out": "out_conv"}  # fmt: skip
    head, _, param = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{param}"
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


# -- ours → diffusers (the export) ----------------------------------------------------------------
# The inverse of the above: a UNet of ours as a UNet2DModel config and state dict, our DDPM's
# schedule and sampling options as a DDPMScheduler config. The import reads back exactly what
# this writes: ``unet_options(diffusers_config(o))`` is ``o`` in the import's spelling, and
# ``convert_unet(diffusers_state_dict(s, m), m)`` is ``s`` tensor for tensor (checked on every
# export).

DIFFUSERS_VERSION = "0.42.0"  # the diffusers release the tests load our folders with
# What UNet2DModel cannot express, option by option: (the value it needs, why).
NOT_EXPRESSIBLE = {
    "cond_dim": (None, "a conditioning vector applied by adaptive group norm (DiffAE's z_sem, "
                 "PDAE's z): UNet2DModel's ResBlocks take the time embedding only"),
    "cond_shift": (False, "PDAE's scale-and-shift AdaGN of a conditioning vector"),
    "context_dim": (None, "cross-attention to a context sequence (LDM): a UNet2DConditionModel's "
                    "layer, which DDPMPipeline does not run"),
    "resblock_updown": (False, "resampling ResBlocks (ADM's): diffusers' only in "
                        "ResnetDownsampleBlock2D / downsample_type='resnet' layouts we do not map"),
    "time_scale": (1.0, "the network sees t·time_scale (improved-diffusion's rescale_timesteps); "
                   "UNet2DModel embeds the scheduler's integer t as it is"),
}  # fmt: skip
NOISE_SCHEDULES = ("diffusion_apps.diffusion.NoiseSchedule",
                   "diffusion_apps.diffusion.schedule.NoiseSchedule")  # fmt: skip
# Ours → DDPMScheduler's; fixed_small is the import's reading of both fixed_small and _log.
THEIR_PREDICTION = {ours: theirs for theirs, ours in PREDICTIONS.items()}
THEIR_VARIANCE = {"beta_tilde": "fixed_small", "beta": "fixed_large", "learned": "learned_range"}


def _refuse(key: str, value, why: str) -> UnsupportedConfig:
    return UnsupportedConfig(f"UNet option {key}={value!r} cannot be exported to diffusers: {why}")


def _unet_defaults() -> dict:
    import inspect

    from diffusion_apps.nn import UNet

    params = inspect.signature(UNet).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _head_dim(o: Mapping, widths: tuple[int, ...], attends: list[bool]) -> int | None:
    """diffusers' ``attention_head_dim`` for our head options: a fixed head width, or None (one
    head per block); a fixed count of k > 1 heads only where every attention block is as wide."""
    from diffusion_apps.nn.checks import resolve_heads

    head_dim, heads, heads_up = resolve_heads(
        o["num_head_channels"], o["num_heads"], o["num_heads_upsample"]
    )
    if heads is None:
        return head_dim
    if heads_up != heads:
        raise _refuse(
            "num_heads_upsample", heads_up, f"the up path's heads differ from num_heads={heads}; "
            "UNet2DModel's attention blocks all take one attention_head_dim",
        )  # fmt: skip
    attended = {w for w, a in zip(widths, attends, strict=True) if a}
    attended |= {widths[-1]} if o["middle_attention"] else set()
    if heads == 1 or not attended:
        return None  # diffusers: heads as wide as the block
    if len(attended) > 1:
        raise _refuse(
            "num_heads", heads, f"{heads} heads in attention blocks {sorted(attended)} wide have "
            "different widths; UNet2DModel's heads are one width (attention_head_dim) or one "
            "head a block",
        )  # fmt: skip
    return attended.pop() // heads


def diffusers_config(options: Mapping) -> dict:
    """The diffusers ``UNet2DModel`` config.json (as a dict) of our UNet built with
    ``options`` (its constructor's arguments; missing ones take its defaults). Every key of
    UNet2DModel is written, so the file means the same under any diffusers' defaults.

    ``channels_last`` (a memory layout) and ``transformer_depth`` (without ``context_dim``) do not
    change the network and are dropped; the import reads back the rest in its own spelling
    (``num_head_channels`` for the default head width, the attention resolutions that are
    levels, ``num_heads=1`` for one head a block).

    Raises:
        UnsupportedConfig: (a ValueError) naming the first option UNet2DModel cannot express:
            ``cond_dim`` / ``cond_shift`` (AdaGN conditioning), ``context_dim``
            (cross-attention), ``resblock_updown``, ``time_scale`` ≠ 1, ``null_label=True``
            with ``num_classes`` (its class table has no null row), ``num_heads_upsample`` ≠
            ``num_heads``, k > 1 fixed heads over blocks of different widths, a first level
            narrower or wider than ``base_channels`` (``channel_mult[0]``: diffusers' sinusoids
            are as wide as its first level), ``middle_attention_norm=False`` without
            ``scale_shift_norm``.
    """
    from diffusion_apps.nn.checks import level_channels

    defaults = _unet_defaults()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise UnsupportedConfig(f"UNet options: unknown option(s) {unknown}")
    o = defaults | dict(options)
    for key, (needed, why) in NOT_EXPRESSIBLE.items():
        if o[key] != needed:
            raise _refuse(key, o[key], why)
    if o["num_classes"] and o["null_label"]:
        raise _refuse(
            "null_label", True, f"the null label of classifier-free guidance, a row beyond "
            f"num_classes={o['num_classes']}: UNet2DModel's num_class_embeds table holds the "
            "classes only (null_label=False exports)",
        )  # fmt: skip
    widths = level_channels(o["base_channels"], o["channel_mult"])
    if widths[0] != o["base_channels"]:
        raise _refuse(
            "channel_mult", tuple(o["channel_mult"]), f"the first level is {widths[0]} wide, "
            f"base_channels={o['base_channels']}: UNet2DModel's sinusoidal time embedding is as "
            "wide as its first level (block_out_channels[0]), ours base_channels wide",
        )  # fmt: skip
    size, scale_shift = o["image_size"], bool(o["scale_shift_norm"])
    attends = [size // 2**i in tuple(o["attention_resolutions"]) for i in range(len(widths))]
    attn_groups = None  # the middle attention's norm: diffusers' default for each time injection
    if o["middle_attention"] and scale_shift and o["middle_attention_norm"]:
        attn_groups = o["num_groups"]
    elif o["middle_attention"] and not scale_shift and not o["middle_attention_norm"]:
        raise _refuse(
            "middle_attention_norm", False, "with scale_shift_norm=False UNet2DModel's middle "
            "attention always group-normalises its input",
        )  # fmt: skip
    shift = o["freq_shift"]
    config = UNET_DEFAULTS | dict(
        sample_size=size,
        in_channels=o["in_channels"],
        out_channels=o["out_channels"] or o["in_channels"],
        freq_shift=int(shift) if float(shift).is_integer() else shift,
        flip_sin_to_cos=not o["sin_first"],
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        block_out_channels=list(widths),
        layers_per_block=o["num_res_blocks"],
        downsample_padding=0 if o["downsample_padding"] == "asymmetric" else 1,
        dropout=o["dropout"],
        attention_head_dim=_head_dim(o, widths, attends),
        norm_num_groups=o["num_groups"],
        attn_norm_num_groups=attn_groups,
        norm_eps=o["norm_eps"],
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        add_attention=bool(o["middle_attention"]),
        num_class_embeds=o["num_classes"] or None,
    )
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    unet_options(config)  # what we write, the import reads
    return {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, **config}


def their_key(key: str, model: nn.Module) -> str | tuple[str, str, str]:
    """Our UNet ``model``'s state-dict key → UNet2DModel's; for our fused qkv, its (q, k, v)
    keys, in the order of its row blocks. The inverse of :func:`our_key`.

    Raises:
        KeyError: ``key`` is no key of a UNet that UNet2DModel expresses.
    """
    from diffusion_apps.nn.layers import Upsample

    n = model.down.num_res_blocks
    fixed = {"down.conv_in": "conv_in", "time_embed.0": "time_embedding.linear_1",
             "time_embed.2": "time_embedding.linear_2", "label_embed": "class_embedding",
             "out_norm": "conv_norm_out", "out_conv": "conv_out"}  # fmt: skip
    head, _, param = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{param}"
    if m := re.fullmatch(r"down\.blocks\.(\d+)\.(\d+)\.(.+)", key):
        level, j = divmod(int(m[1]), n + 1)  # L + 1 blocks a level, the last one downsamples
        if j == n:
            return f"down_blocks.{level}.downsamplers.0.conv.{m[3]}"
        prefix, attention, rest = f"down_blocks.{level}", m[2] == "1", m[3]
    elif m := re.fullmatch(r"up\.(\d+)\.(\d+)\.(.+)", key):
        level, j = divmod(int(m[1]), n + 1)  # level 0: the lowest resolution
        if isinstance(model.up[int(m[1])][int(m[2])], Upsample):
            return f"up_blocks.{level}.upsamplers.0.{m[3]}"
        prefix, attention, rest = f"up_blocks.{level}", m[2] == "1", m[3]
    elif m := re.fullmatch(r"down\.middle\.(\d+)\.(.+)", key):
        i, attends = int(m[1]), len(model.down.middle) == 3
        prefix, attention, rest = "mid_block", attends and i == 1, m[2]
        j = 0 if attention else (i // 2 if attends else i)
    else:
        raise KeyError(f"{key!r} is not a key of our UNet that UNet2DModel expresses")
    if not attention:
        name, param = rest.split(".", 1)
        back = {ours: theirs for theirs, ours in RESNET.items()}
        if name not in back:
            raise KeyError(f"{key!r}: {name!r} is not a ResBlock layer UNet2DModel has")
        return f"{prefix}.resnets.{j}.{back[name]}.{param}"
    where = f"{prefix}.attentions.{j}"
    name, param = rest.rsplit(".", 1)
    if name == "norm":
        return f"{where}.group_norm.{param}"
    if name == "attn.qkv":
        return tuple(f"{where}.{p}.{param}" for p in ("to_q", "to_k", "to_v"))
    if name == "attn.out":
        return f"{where}.to_out.0.{param}"
    raise KeyError(f"{key!r} is not an attention parameter UNet2DModel has")


def diffusers_state_dict(our_state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Our UNet ``model``'s state dict ``our_state`` as UNet2DModel's (dtypes kept, contiguous,
    no two tensors sharing memory, as safetensors stores them): renamed, qkv split into its
    [q; k; v] row blocks. :func:`convert_unet` of the result is checked to give ``our_state``
    back, tensor for tensor.

    Raises:
        KeyError: a key UNet2DModel has no place for.
    """
    out: dict[str, Tensor] = {}
    for key, value in our_state.items():
        value, theirs = value.detach().cpu().contiguous(), their_key(key, model)
        if isinstance(theirs, tuple):  # rows [q; k; v] = (3, heads, d)
            out |= {name: part.clone() for name, part in zip(theirs, value.chunk(3), strict=True)}
        else:
            out[theirs] = value
    back = convert_unet(out, model)
    differ = [k for k in our_state if k not in back or not torch.equal(back[k], our_state[k])]
    if differ or back.keys() != our_state.keys():
        raise RuntimeError(f"the export does not read back: {(differ or sorted(back))[:3]}")
    return out


def _schedule_defaults() -> dict:
    import inspect

    from diffusion_apps.diffusion import NoiseSchedule

    return {p.name: p.default for p in inspect.signature(NoiseSchedule).parameters.values()}


def _exported_beta(ours: float, T: int) -> float:
    """diffusers' linear β for our rescaled one: β·1000/T, moved by up to 4 ulps so that
    :func:`ddpm_options`' β'·(T/1000) gives ``ours`` back exactly (when a float does)."""
    import math

    scale, guess = T / 1000, ours * 1000 / T
    candidates = [guess]
    for direction in (math.inf, -math.inf):
        b = guess
        for _ in range(4):
            b = math.nextafter(b, direction)
            candidates.append(b)
    return next((b for b in candidates if b * scale == ours), guess)


def scheduler_config(ddpm: Mapping) -> dict:
    """The diffusers ``DDPMScheduler`` scheduler_config.json (as a dict) of our DDPM's options
    ``ddpm``: ``schedule`` (``{"class_path": NoiseSchedule, "init_args": ...}``, or None for its
    defaults), ``prediction``, ``variance`` and ``clip_x0``, as :func:`ddpm_options` returns them
    (whose inverse this is).

    β: our ``linear`` (rescaled by 1000/T) is diffusers' ``linear`` from β·1000/T to β_end·1000/T,
    ``sqrt_linear`` its ``scaled_linear``, ``cosine`` with s = 0.008 its ``squaredcos_cap_v2``.
    Our ``uniform`` timestep spacing, t_i = i·⌊T/S⌋, is its ``leading`` with ``steps_offset=0``
    (written whatever the DDPM's spacing: a sampling setting).

    Raises:
        UnsupportedConfig: (a ValueError) naming the option: a ``constant`` schedule, ``cosine``
            with s ≠ 0.008, another schedule class, an unknown prediction or variance.
    """
    schedule = ddpm.get("schedule")
    args: dict = {}
    if schedule is not None:
        if not isinstance(schedule, Mapping) or schedule.get("class_path") not in NOISE_SCHEDULES:
            raise UnsupportedConfig(
                f"DDPM option schedule={schedule!r}: we export a NoiseSchedule (class_path "
                f"{NOISE_SCHEDULES[0]}) only"
            )
        args = dict(schedule.get("init_args") or {})
    s = _schedule_defaults() | args
    T, kind = s["num_timesteps"], s["kind"]
    betas = {}
    if kind == "linear":
        betas = dict(beta_schedule="linear", beta_start=_exported_beta(s["beta_start"], T),
                     beta_end=_exported_beta(s["beta_end"], T))  # fmt: skip
    elif kind == "sqrt_linear":
        betas = dict(beta_schedule="scaled_linear", beta_start=s["beta_start"],
                     beta_end=s["beta_end"])  # fmt: skip
    elif kind == "cosine" and s["cosine_s"] == 0.008:
        betas = dict(beta_schedule="squaredcos_cap_v2")
    else:
        what = f"cosine_s={s['cosine_s']!r}" if kind == "cosine" else f"kind={kind!r}"
        raise UnsupportedConfig(
            f"NoiseSchedule option {what} cannot be exported: DDPMScheduler's β schedules are "
            "linear, scaled_linear and squaredcos_cap_v2 (the cosine with s = 0.008)"
        )
    theirs = {}
    for key, table in [("prediction", THEIR_PREDICTION), ("variance", THEIR_VARIANCE)]:
        if ddpm.get(key) not in table:
            raise UnsupportedConfig(
                f"DDPM option {key}={ddpm.get(key)!r}: we export {', '.join(table)}"
            )
        theirs[key] = table[ddpm[key]]
    config = SCHEDULER_DEFAULTS | betas | dict(
        num_train_timesteps=T, variance_type=theirs["variance"],
        clip_sample=bool(ddpm.get("clip_x0", True)), clip_sample_range=1.0,
        prediction_type=theirs["prediction"], timestep_spacing="leading", steps_offset=0,
    )  # fmt: skip
    ddpm_options(config)  # what we write, the import reads
    return {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **config}
