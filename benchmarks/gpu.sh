#!/usr/bin/env bash
# The speed matrix on a lent GPU, in one device call (about 6 minutes on an H200):
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=560)
# The GPU image has torch, lightning and einops but not the contenders: fetch their wheels here
# once with `make gpu-wheels` (into .whl/, which git ignores through .git/info/exclude).
# Results: $OUT/gpu-cifar32.{md,json,png} and gpu-adm64.* (benchmarks/results/ when run
# elsewhere), nvidia-smi's line in gpu-smi.txt. Never run on a GPU yet: check the first call.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    | tee "$out/gpu-smi.txt"
# The DDPM CIFAR-10 layout (38.3 M) with every speed option, then ADM-64 without compilation
# (its compile alone would take minutes of the lease).
timeout 330 python3 benchmarks/speed.py --device cuda --shapes cifar32 --compile --cuda-graphs \
    --reps 5 --out "$out" --name gpu-cifar32
timeout 180 python3 benchmarks/speed.py --device cuda --shapes adm64 --reps 3 --no-profile \
    --out "$out" --name gpu-adm64
