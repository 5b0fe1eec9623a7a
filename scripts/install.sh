#!/usr/bin/env bash
# Create .venv and install evl-hf with its training and test extras, offline-friendly.
# torch/torchvision/torchcodec are pinned first: a bare `torch` requirement on an empty environment can pull a
# different multi-GB build, and torchvision and torchcodec must match torch exactly (torchcodec 0.16 <-> torch 2.14).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages come from apt-get, as root or through passwordless sudo; elsewhere a warning says what is missing.
if ! command -v apt-get >/dev/null; then
    APT=unavailable
elif [ "$(id -u)" = 0 ]; then
    APT=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    APT="sudo -n"
else
    APT=unavailable
fi
APT_UPDATED=""
# apt_install [--no-install-recommends] PACKAGE...: the package lists are updated once, before the first install.
apt_install() {
    echo "Installing Debian packages (apt-get install $*)..."
    if [ -z "$APT_UPDATED" ]; then
        $APT apt-get update -qq || return 1
        APT_UPDATED=1
    fi
    $APT env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# torchcodec decodes through FFmpeg's shared libraries (PyAV bundles its own). Without them evl-hf decodes with PyAV,
# but the test suite runs every decoding test on both backends and needs them.
if ! ldconfig -p 2>/dev/null | grep -q "libavcodec\.so\."; then
    if [ "$APT" != unavailable ]; then
        apt_install --no-install-recommends ffmpeg \
            || echo "warning: apt-get install ffmpeg failed: torchcodec will not load and decoding uses PyAV." >&2
    else
        echo "warning: FFmpeg's shared libraries are missing and cannot be installed here: torchcodec will not load," \
            "decoding uses PyAV, and the torchcodec tests fail. Install them with: apt-get install ffmpeg" >&2
    fi
fi
# tests/test_app.py drives the web demo in headless Chromium through Debian's chromedriver (Selenium is never let
# download a browser or a driver). With its recommended packages (fonts among them), as the test was checked with.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$APT" != unavailable ]; then
        apt_install chromium chromium-driver \
            || echo "warning: apt-get install chromium chromium-driver failed: the web demo's browser tests" \
                "(tests/test_app.py) are skipped." >&2
    else
        echo "warning: chromium or chromedriver is missing and cannot be installed here: the web demo's browser" \
            "tests (tests/test_app.py) are skipped. Install them with: apt-get install chromium chromium-driver" >&2
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
