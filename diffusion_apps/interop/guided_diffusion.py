"""openai/guided-diffusion (ADM) and openai/improved-diffusion (iDDPM) checkpoints → ours.

The official code builds its networks from command-line flags (``script_util``'s
``create_model_and_diffusion`` / ``create_classifier``). Here the same flag strings, exactly as
the official READMEs print them, become the constructor options of our one UNet and EncoderUNet,
and their state dicts become ours by renaming: Conv1d (O, I, 1) → Linear (O, I) squeezes, and
for the legacy attention order (``use_new_attention_order False``, and every iDDPM model) the
qkv rows reordered from (head, q/k/v, d) to ours, (q/k/v, head, d). Pure torch: the official code
is never imported (the tests compare against it on identical inputs).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Literal

from torch import Tensor, nn

Source = Literal["guided-diffusion", "improved-diffusion"]

# ``script_util.model_and_diffusion_defaults()`` of each repository.
GUIDED_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
    use_fp16=False, use_new_attention_order=False, learn_sigma=False, diffusion_steps=1000,
    noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
    rescale_timesteps=False, rescale_learned_sigmas=False,
)  # fmt: skip
IMPROVED_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False,
    class_cond=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
    use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
    use_checkpoint=False, use_scale_shift_norm=True,
)  # fmt: skip
CLASSIFIER_DEFAULTS = dict(
    image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool="attention",
)  # fmt: skip
# channel_mult by image size when the flags leave it empty (``create_model``).
CHANNEL_MULT = {
    "guided-diffusion": {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                         128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
    "improved-diffusion": {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
}  # fmt: skip
NUM_CLASSES = 1000  # ImageNet: every class-conditional release


def parse_flags(flags: str, defaults: Mapping[str, object]) -> dict:
    """``"--image_size 64 --class_cond True …"`` over ``defaults``, each value converted to its
    default's type (booleans as the official ``str2bool``: true/false, yes/no, 1/0, t/f, y/n).

    Raises:
        ValueError: an unknown flag (the valid ones listed), a flag without a value, or a value
            of the wrong type.
    """
    tokens, parsed = shlex.split(flags), dict(defaults)
    if len(tokens) % 2:
        raise ValueError(f"flags: {tokens[-1]!r} has no value (flags come as '--name value')")
    for name, value in zip(tokens[::2], tokens[1::2], strict=True):
        key = name.removeprefix("--")
        if not name.startswith("--") or key not in defaults:
            raise ValueError(f"flags: unknown flag {name!r}; valid: {', '.join(sorted(defaults))}")
        parsed[key] = _typed(key, value, defaults[key])
    return parsed


def _typed(key: str, value: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            truth = {"true": True, "yes": True, "t": True, "y": True, "1": True,
                     "false": False, "no": False, "f": False, "n": False, "0": False}  # fmt: skip
            return truth[value.lower()]
        return type(default)(value)
    except (KeyError, ValueError):
        raise ValueError(f"flags: --{key} {value!r} is not a {type(default).__name__}") from None


def _channel_mult(image_size: int, given: str, source: Source) -> tuple:
    if given:
        return tuple(float(m) if "." in m else int(m) for m in given.split(","))
    by_size = CHANNEL_MULT[source]
    if image_size not in by_size:
        raise ValueError(f"{source} has no default channel_mult for image_size {image_size} "
                         f"(it has {sorted(by_size)}); give --channel_mult")  # fmt: skip
    return by_size[image_size]


def _resolutions(spec: str) -> tuple[int, ...]:
    return tuple(int(r) for r in spec.split(",") if r)


def unet_options(flags: Mapping, source: Source = "guided-diffusion") -> dict:
    """Our UNet's constructor options for the official ``create_model`` of ``flags``.

    ``attention_resolutions`` are pixel resolutions in both; ``num_head_channels`` (a head
    width) wins over ``num_heads`` (a head count) as in the official code; class-conditional
    models get exactly the official 1,000 label rows (no null label); ``use_checkpoint`` is our
    ``gradient_checkpointing``.
    """
    f = flags
    if f.get("num_head_channels", -1) != -1:
        heads = {"num_head_channels": f["num_head_channels"]}
    else:  # a head count; the up path's own when num_heads_upsample is set (-1: as num_heads)
        up = f["num_heads_upsample"]
        heads = {"num_heads": f["num_heads"], "num_heads_upsample": None if up == -1 else up}
    options = dict(
        in_channels=3,
        out_channels=6 if f["learn_sigma"] else 3,
        image_size=f["image_size"],
        base_channels=f["num_channels"],
        channel_mult=_channel_mult(f["image_size"], f.get("channel_mult", ""), source),
        num_res_blocks=f["num_res_blocks"],
        attention_resolutions=_resolutions(f["attention_resolutions"]),
        dropout=f["dropout"],
        num_groups=32,
        resblock_updown=f.get("resblock_updown", False),
        **heads,
    )
    if not f["use_scale_shift_norm"]:
        options["scale_shift_norm"] = False
    if f.get("rescale_timesteps"):  # the official samplers feed the network t·1000/T
        options["time_scale"] = 1000 / f["diffusion_steps"]
    if f["class_cond"]:
        options |= dict(num_classes=NUM_CLASSES, null_label=False)
    if f["use_checkpoint"]:  # a training-memory option: the outputs are the same
        options["gradient_checkpointing"] = True
    return options


def classifier_options(flags: Mapping) -> dict:
    """Our EncoderUNet's constructor options for the official ``create_classifier``."""
    f = flags
    pools = {"attention": "attention", "adaptive": "avg"}
    if f["classifier_pool"] not in pools:
        raise ValueError(f"flags: --classifier_pool {f['classifier_pool']!r} is not one we take "
                         f"({', '.join(pools)})")  # fmt: skip
    options = dict(
        in_channels=3,
        out_dim=NUM_CLASSES,
        image_size=f["image_size"],
        base_channels=f["classifier_width"],
        channel_mult=_channel_mult(f["image_size"], "", "guided-diffusion"),
        num_res_blocks=f["classifier_depth"],
        attention_resolutions=_resolutions(f["classifier_attention_resolutions"]),
        num_head_channels=64,
        num_groups=32,
        resblock_updown=f["classifier_resblock_updown"],
        time_conditioned=True,
        pool=pools[f["classifier_pool"]],
    )
    if not f["classifier_use_scale_shift_norm"]:
        options["scale_shift_norm"] = False
    return options


def ddpm_options(flags: Mapping) -> dict:
    """Our DDPM's options for the official diffusion of ``flags``: its noise schedule (linear β
    rescaled by 1000/T, or cosine), ε or x_0 prediction, learned Σ (``learn_sigma``) or a fixed
    one (β: ``sigma_small False``, β̃: ``sigma_small True``), x̂_0 clipped as the official
    samplers' ``clip_denoised=True``."""
    f = flags
    if f["noise_schedule"] not in ("linear", "cosine"):
        raise ValueError(f"flags: --noise_schedule {f['noise_schedule']!r} is not linear or cosine")
    schedule = {"kind": f["noise_schedule"], "num_timesteps": f["diffusion_steps"]}
    fixed = "beta_tilde" if f.get("sigma_small") else "beta"
    return {
        "schedule": {"class_path": "diffusion_apps.diffusion.NoiseSchedule", "init_args": schedule},
        "prediction": "x0" if f["predict_xstart"] else "eps",
        "variance": "learned" if f["learn_sigma"] else fixed,
        "clip_x0": True,
    }


def legacy_attention(flags: Mapping, source: Source) -> bool:
    """Whether the qkv rows are in the legacy (head, q/k/v, d) order: every iDDPM model, ADM's
    unless ``use_new_attention_order``; ADM's classifiers always."""
    return source == "improved-diffusion" or not flags.get("use_new_attention_order", True)


# -- state dicts ----------------------------------------------------------------------------------

RESBLOCK = {  # official ResBlock layer → ours
    "in_layers.0": "in_norm",
    "in_layers.2": "in_conv",
    "emb_layers.1": "emb_proj",
    "out_layers.0": "out_norm",
    "out_layers.3": "out_conv",
    "skip_connection": "skip",
}


def _layer_key(layer: str) -> str:
    """``j.<rest>`` of one official TimestepEmbedSequential layer → ours."""
    j, rest = layer.split(".", 1)
    for theirs, ours in RESBLOCK.items():
        if rest.startswith(theirs + "."):
            return f"{j}.{ours}{rest[len(theirs) :]}"
    if rest.startswith(("qkv.", "proj_out.")):  # AttentionBlock: norm stays, qkv/proj_out in attn
        return f"{j}.attn.{rest.replace('proj_out.', 'out.')}"
    if rest.startswith("op."):  # Downsample's strided conv
        return f"{j}.{rest[3:]}"
    return f"{j}.{rest}"  # norm.*, Upsample's conv.*


def our_key(key: str) -> str:
    """An official UNetModel / EncoderUNetModel state-dict key → ours (heads excepted)."""
    patterns = [
        (r"time_embed\.(.*)", r"time_embed.\1"),
        (r"label_emb\.(.*)", r"label_embed.\1"),
        (r"input_blocks\.0\.0\.(.*)", r"down.conv_in.\1"),
        (r"out\.0\.(.*)", r"out_norm.\1"),
        (r"out\.2\.(weight|bias)", r"out_conv.\1"),
    ]
    for pattern, replacement in patterns:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    for pattern, prefix in [(r"input_blocks\.(\d+)\.(.*)", "down.blocks.{}."),
                            (r"middle_block\.()(.*)", "down.middle{}."),
                            (r"output_blocks\.(\d+)\.(.*)", "up.{}.")]:  # fmt: skip
        match = re.fullmatch(pattern, key)
        if match:
            index = "" if not match[1] else str(int(match[1]) - (prefix[0] == "d"))
            return prefix.format(index) + _layer_key(match[2])
    raise KeyError(f"{key!r} is not a key of guided-diffusion's UNetModel/EncoderUNetModel")


def _qkv_new_order(weight: Tensor, heads: int) -> Tensor:
    """Rows (head, q/k/v, d) → (q/k/v, head, d)."""
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, 3, rows // (3 * heads), *rest).transpose(0, 1).reshape(rows, *rest)


def convert_unet(
    official: Mapping[str, Tensor], model: nn.Module, legacy_attention: bool
) -> dict[str, Tensor]:
    """A UNetModel's state dict as ``model``'s (our UNet built from :func:`unet_options`), fp32."""
    return {our_key(k): v for k, v in _attention_rows(official, model, legacy_attention).items()}


def convert_classifier(official: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """An EncoderUNetModel's state dict as ``model``'s (our EncoderUNet built from
    :func:`classifier_options`), fp32. The pooled head (``out.2``, or ``out.3`` for the
    adaptive pool) maps by :func:`_pool_head`; the rest as a UNet's, legacy attention order."""
    body = {k: v for k, v in official.items() if not k.startswith(("out.2.", "out.3."))}
    converted = {our_key(k): v for k, v in _attention_rows(body, model, True).items()}
    for key, value in official.items():
        if key.startswith(("out.2.", "out.3.")):
            converted |= _pool_head(key.split(".", 2)[2], value.float())
    return converted


def _attention_rows(
    official: Mapping[str, Tensor], model: nn.Module, legacy_attention: bool
) -> dict[str, Tensor]:
    """``official`` in fp32 with its attention's Conv1d weights squeezed to Linear ones and,
    for the legacy order, the qkv rows reordered by the heads of ``model``'s block."""
    out = {}
    for key, value in official.items():
        value, ours = value.float(), our_key(key)
        if ours.endswith(("attn.qkv.weight", "attn.qkv.bias", "attn.out.weight")):
            value = value[..., 0] if value.dim() == 3 else value  # Conv1d → Linear
            if legacy_attention and ".qkv." in ours:
                heads = model.get_submodule(ours.rsplit(".qkv.", 1)[0]).heads
                value = _qkv_new_order(value, heads)
        out[key] = value
    return out


def _pool_head(rest: str, value: Tensor) -> dict[str, Tensor]:
    """A classifier's pooled head: AttentionPool2d (``out.2.*``) or the adaptive pool's conv."""
    value = value[..., 0] if value.dim() == 3 else value
    if rest == "positional_embedding":
        return {"head.pos": value.t().contiguous()}  # (C, L) → (L, C)
    if "." not in rest:  # the adaptive pool's 1×1 conv (out.3)
        return {f"head.{rest}": value.flatten(1) if value.dim() == 4 else value}
    name, param = rest.rsplit(".", 1)
    if name == "qkv_proj":
        c = value.shape[0] // 3
        return {f"head.q.{param}": value[:c], f"head.kv.{param}": value[c:]}
    return {f"head.out.{param}": value}  # c_proj
