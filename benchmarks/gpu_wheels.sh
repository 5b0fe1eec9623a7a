#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu.sh installs on a lent GPU machine, which reaches no package registry.
# Its image (2026-11) has torch with CUDA, numpy, pyarrow, pandas, safetensors and tokenizers, but transformers 5.17
# with huggingface_hub 1.33 (this package needs transformers >= 5.24) and no datasets or PyAV. The wheels are the
# versions this project is tested with, for the image's Python (3.12 unless PYTHON_VERSION says otherwise), in .whl/
# (git-ignored). Then, with the device tool:
#   run(command="EVL_GPU_WHEELS=1 bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
# What travels is limited to 64 MiB: the wheels take 60 MB (PyAV, which bundles FFmpeg, 36 MB), the repository 3.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
# Into a fresh folder, moved to .whl/ only once every download has succeeded.
download=$(mktemp -d .whl-download.XXXXXX)
trap 'rm -rf "$download"' EXIT
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$platform")
done
# transformers and what it needs beyond the image (huggingface_hub 2 and its HTTP client, kernels); datasets and
# what it needs beyond the image; PyAV. gpu.sh installs exactly these, without pip's resolver.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp "${platforms[@]}" -d "$download" \
    transformers==5.25.0 huggingface_hub==2.4.0 hf-xet==1.8.0 kernels==0.19.1 regex==2026.12.2 \
    httpx2==2.17.0 httpcore2==2.17.0 h11==0.16.0 truststore==0.10.5 idna==3.21 anyio==4.16.0 \
    typing-extensions==4.16.0 click==8.5.1 tomlkit==0.14.0 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 xxhash==4.1.0 \
    av==18.1.0
rm -rf .whl && mv "$download" .whl
du -sh .whl
