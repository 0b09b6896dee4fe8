"""Which precision to compute in, chosen by what the hardware runs natively.

bf16 pays only where the processor has bf16 instructions: on a CPU with AVX512-BF16 or AMX-BF16
bf16 autocast was 1.2–1.8× faster than fp32 for our UNets, but on an AVX2-only CPU (AMD Zen 3,
most laptops) it is emulated and one training step of configs/ddpm.yaml took 26.5 s against
1.4 s in fp32. So the default ("auto", or a config without ``trainer.precision``) is bf16 only
where it runs natively, and an explicit setting always wins (on a CPU, "16-mixed" too, which
Lightning alone would run as bf16-mixed).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names


def cpu_flags() -> set[str]:
    """The CPU's bf16-relevant features, from torch's own probe (with /proc/cpuinfo as a
    fallback on builds without it)."""
    # torch probes AMX tiles, not AMX-BF16 itself: every CPU with AMX tiles so far has both.
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    flags = {name for name, probe in probes.items() if getattr(torch.cpu, probe, bool)()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split()) & set(NATIVE_BF16_FLAGS)
                break
    return flags


def choose(device_type: str, flags: set[str] | None = None) -> tuple[str, str]:
    """(Lightning precision, why) for ``device_type``: "bf16-mixed" where bf16 runs natively
    (a CUDA GPU that supports it; a CPU with one of ``flags`` ⊆ NATIVE_BF16_FLAGS), else
    "32-true". ``flags`` defaults to this machine's :func:`cpu_flags`."""
    if device_type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed", "the GPU runs bf16 natively"
        return "32-true", "this GPU has no native bf16"
    if device_type != "cpu":
        return "32-true", f"no bf16 default for {device_type!r}"
    native = sorted(set(NATIVE_BF16_FLAGS) & (cpu_flags() if flags is None else flags))
    capability = torch.backends.cpu.get_cpu_capability()
    if native:
        return "bf16-mixed", f"the CPU runs bf16 natively ({', '.join(native)}; {capability})"
    return "32-true", (
        f"the CPU has no AVX512-BF16 or AMX ({capability}): bf16 would be emulated, ~19x slower"
    )


def device_type_of(accelerator) -> str:
    """ "cuda" or "cpu" for a Trainer ``accelerator`` setting ("auto" picks CUDA when present)."""
    if not isinstance(accelerator, str):  # an Accelerator, or its class_path in a config
        accelerator = str(getattr(accelerator, "class_path", type(accelerator).__name__))
    name = accelerator.lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "gpu" or "cuda" in name:
        return "cuda"
    return "cpu" if "cpu" in name else name


def announce(precision: str, why: str) -> None:
    """Say on rank 0 which precision runs, and why."""
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(f"precision {precision}: {why}")


def configure(trainer) -> None:
    """Fill an unset ``precision`` of a Trainer config (jsonargparse namespace) from
    :func:`choose`; a set one wins, and so does a precision plugin in ``plugins`` (Lightning
    refuses a plugin and a precision together). Either way, say which and why.

    "16-mixed" on a CPU becomes Lightning's ``MixedPrecision("16-mixed", "cpu")`` plugin: fp16
    autocast with a GradScaler, as asked, where Lightning would run the string as bf16-mixed.
    """
    plugins = trainer.plugins if isinstance(trainer.plugins, list) else [trainer.plugins]
    plugins = [p for p in plugins if p is not None]
    plugin = next((p for p in plugins if _is_precision_plugin(p)), None)
    device = device_type_of(trainer.accelerator)
    if plugin is not None:
        precision = getattr(plugin, "class_path", type(plugin).__name__)
        why = "as configured (a precision plugin)"
    elif trainer.precision is None:
        trainer.precision, why = choose(device)
        precision = trainer.precision
    elif str(trainer.precision) in ("16", "16-mixed") and device == "cpu":
        from jsonargparse import Namespace

        fp16 = Namespace(
            class_path="lightning.pytorch.plugins.precision.MixedPrecision",
            init_args=Namespace(precision="16-mixed", device="cpu"),
        )
        trainer.precision, trainer.plugins = None, [*plugins, fp16]
        precision = "16-mixed"
        why = "as configured: fp16 autocast and a GradScaler on the CPU (not Lightning's bf16)"
    else:
        precision, why = trainer.precision, "as configured"
    announce(str(precision), why)


def _is_precision_plugin(plugin) -> bool:
    """Whether a Trainer ``plugins`` entry (an object or its class_path namespace) sets the
    precision."""
    from lightning.pytorch.plugins.precision import Precision

    path = getattr(plugin, "class_path", None)
    if path is None:
        return isinstance(plugin, Precision)
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    return isinstance(cls, type) and issubclass(cls, Precision)


def sampling_precision(setting: str, device: torch.device) -> str:
    """ "32" or "bf16" for ``sample``/``eval --precision``: "auto" follows :func:`choose`."""
    if setting != "auto":
        return setting
    precision, why = choose(device.type)
    chosen = "bf16" if precision == "bf16-mixed" else "32"
    announce(chosen, why)
    return chosen


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast of the network for ``precision == "bf16"``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
