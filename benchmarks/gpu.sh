#!/usr/bin/env bash
# GPU benchmark for issue 11's ratios and throughput: one short run (under 6 minutes on one recent GPU), no
# downloads. Needs torch with CUDA, transformers, datasets, safetensors, av and this package importable
# (PYTHONPATH=src works without installing). Prints the versions and the card's name first: record the figures with
# them in BENCHMARKS.md.
# On a machine that reaches no package registry (this project's lent GPU machines): run benchmarks/gpu_wheels.sh
# where one is reachable, bring .whl/ along, and run this with EVL_GPU_WHEELS=1: the wheels are installed into
# /tmp/evl-gpu-site, ahead of the machine's own packages on PYTHONPATH, which are left as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ "${EVL_GPU_WHEELS:-0}" = 1 ]; then
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "EVL_GPU_WHEELS=1 but .whl/ holds no wheel: run benchmarks/gpu_wheels.sh first." >&2
        exit 2
    fi
    # Exactly these wheels, without pip's resolver: it would refuse the image's tokenizers, whose metadata caps
    # huggingface_hub below the 2.x that transformers 5.25 needs (it runs with it).
    "$PYTHON" -m pip install -q --no-deps --no-index --no-cache-dir --no-compile --upgrade --target /tmp/evl-gpu-site \
        "${wheels[@]}"
    export PYTHONPATH="/tmp/evl-gpu-site:${PYTHONPATH:-}"
fi
# Unbuffered: a run stopped at its time limit still shows every figure printed before.
export PYTHONPATH="src:benchmarks:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$PYTHON" - <<'PY'
from importlib.metadata import version
import torch, transformers, datasets, av  # noqa: F401  (each must import)
names = ["torch", "transformers", "huggingface_hub", "tokenizers", "datasets", "pyarrow", "av", "accelerate"]
print(", ".join(f"{name} {version(name)}" for name in names))
PY
"$PYTHON" benchmarks/bench_gpu.py
# Issue 11, target 4 where it matters most: real-sized clips decoded in DataLoader workers (0, 4 and 8) while the
# bf16 model runs on the GPU, against the model alone on the same clips already decoded (target >= 0.85).
"$PYTHON" benchmarks/bench_throughput.py --device cuda --backbone_dtype bfloat16 --clips 32 --batch_size 16 \
    --workers 0 4 8 --repeats 2
