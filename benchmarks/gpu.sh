#!/usr/bin/env bash
# GPU benchmark for issue 11's ratios and throughput: one short run (under 5 minutes on one recent GPU), no
# downloads. Needs torch with CUDA, transformers, safetensors, av and this package importable (PYTHONPATH=src works
# without installing). Prints the card's name first: record the figures with it in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src:benchmarks:${PYTHONPATH:-}" HF_HUB_OFFLINE=1
python benchmarks/bench_gpu.py
