#!/usr/bin/env bash
# Everything we measure on a lent GPU, in one device call of at most 9 minutes (H100/H200):
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=580)
# Fetch the wheels here first, once: `make gpu-wheels` (into .whl/, which git ignores through
# .git/info/exclude): the GPU image has torch, lightning and einops, but not diffusers,
# jsonargparse (our CLI) or the other contenders.
# Stages, in this order, each under `timeout` within one budget of GPU_BUDGET_S (540) seconds:
#   1. benchmarks/gpu_fit.py, at most 300 s: the DDPM CIFAR-10 recipe trained 200 steps at
#      batch 128 in bf16 + torch.compile through our CLI's Trainer, diffusers' UNet2DModel and
#      our UNet in a plain loop, DDIM-50 sampling of 1,000 images -> gpu-fit.{md,json},
#      gpu-fit-grid.png;
#   2. benchmarks/speed.py's matrix at cifar32, eager, 2 repetitions, the time left (its compile
#      rows would take minutes more) -> gpu-cifar32.{md,json,png}.
# The whole log goes to gpu-log.txt, nvidia-smi's line first: 7 files of the 8 that come back.
# Results land in $OUT (benchmarks/results/ elsewhere). Never run on a GPU yet: check the first
# call's log. ADM-64's matrix needs a lease of its own:
#   timeout 180 python3 benchmarks/speed.py --device cuda --shapes adm64 --reps 3 --no-profile
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
exec > >(tee "$out/gpu-log.txt") 2>&1
budget=${GPU_BUDGET_S:-540}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true

# stage CAP_S COMMAND...: COMMAND under `timeout` of CAP_S or the budget left, whichever is less;
# its failure is logged and the next stage runs.
stage() {
    local cap=$1 left=$((budget - SECONDS))
    shift
    if ((left < 60)); then
        echo "== skipped, ${left} s of the budget left: $*"
        return
    fi
    local limit=$((cap < left ? cap : left))
    echo "== $(date -u +%T), ${SECONDS} s in, timeout ${limit} s: $*"
    timeout -k 15 "$limit" "$@" || echo "== exit $?: $*"
}

stage 300 python3 benchmarks/gpu_fit.py --device cuda --out "$out"
stage 400 python3 benchmarks/speed.py --device cuda --shapes cifar32 --reps 2 --no-profile \
    --out "$out" --name gpu-cifar32
echo "== done, ${SECONDS} s"
