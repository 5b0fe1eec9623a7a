#!/usr/bin/env bash
# Create .venv and install evl-hf with its training and test extras, offline-friendly.
# torch/torchvision/torchcodec are pinned first: a bare `torch` requirement on an empty environment can pull a
# different multi-GB build, and torchvision and torchcodec must match torch exactly (torchcodec 0.16 <-> torch 2.14).
set -euo pipefail
cd "$(dirname "$0")/.."

# torchcodec decodes through FFmpeg's shared libraries (PyAV bundles its own). Without them evl-hf decodes with PyAV,
# but the test suite runs every decoding test on both backends and needs them.
if ! ldconfig -p 2>/dev/null | grep -q "libavcodec\.so\."; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        SUDO=""
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        SUDO="unavailable"
    fi
    if [ "$SUDO" != unavailable ] && command -v apt-get >/dev/null; then
        echo "Installing FFmpeg's shared libraries for torchcodec (apt-get install ffmpeg)..."
        { $SUDO apt-get update -qq \
            && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null; } \
            || echo "warning: apt-get install ffmpeg failed: torchcodec will not load and decoding uses PyAV." >&2
    else
        echo "warning: FFmpeg's shared libraries are missing and cannot be installed here: torchcodec will not load," \
            "decoding uses PyAV, and the torchcodec tests fail. Install them with: apt-get install ffmpeg" >&2
    fi
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" "torchcodec==0.16.0"
.venv/bin/python -m pip install --quiet -e ".[testing]"
# The test suite runs transformers' own model tests (ModelTesterMixin) against EVL; they ship in transformers' source
# distribution, not in its wheel. Fetch them now, so that the tests run offline (they never download anything).
.venv/bin/python tools/fetch_transformers_tests.py >/dev/null \
    || echo "warning: could not fetch transformers' test files from PyPI: tests/test_modeling_evl_common.py stops" \
        "with an error until \`.venv/bin/python tools/fetch_transformers_tests.py\` succeeds." >&2
