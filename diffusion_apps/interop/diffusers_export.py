"""Ours → diffusers (``python -m diffusion_apps export``): a UNet of ours as a ``UNet2DModel``
config and state dict, our DDPM's schedule and sampling options as a ``DDPMScheduler`` config.

The inverse of :mod:`diffusion_apps.interop.diffusers_unet`, which reads back exactly what this
writes: ``unet_options(diffusers_config(o))`` is ``o`` in the import's spelling, and
``convert_unet(diffusers_state_dict(s, m), m)`` is ``s`` tensor for tensor (checked on every
export). Pure torch: diffusers is never imported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from diffusion_apps.interop.diffusers_unet import (
    FIXED_KEYS,
    PREDICTIONS,
    RESNET,
    SCHEDULER_DEFAULTS,
    UNET_DEFAULTS,
    UnsupportedConfig,
    convert_unet,
    ddpm_options,
    unet_options,
)

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
    "patch_size": (1, "the UNet runs on p×p patches folded into channels; UNet2DModel on pixels"),
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
            (cross-attention), ``resblock_updown``, ``time_scale`` ≠ 1, ``patch_size`` ≠ 1,
            ``null_label=True`` with ``num_classes`` (its class table has no null row),
            ``num_heads_upsample`` ≠ ``num_heads``, k > 1 fixed heads over blocks of different
            widths, a first level narrower or wider than ``base_channels`` (``channel_mult[0]``:
            diffusers' sinusoids are as wide as its first level), ``middle_attention_norm=False``
            without ``scale_shift_norm``.
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
    fixed = {ours: theirs for theirs, ours in FIXED_KEYS.items()}
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
