#!/usr/bin/env bash
# The web demo's browser test: installs Debian's chromium and Playwright (its Python driver only; it drives the
# system chromium), then opens the Gradio demo on the trained digits model in headless chromium, uploads a digit,
# asks which digit it is and checks the streamed answer. Not part of the default suite (needs root for apt).
#   bash scripts/browser_test.sh            # trains the digits demo first (~70 s) unless ML_MAMBA_DEMO_DIR is set
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
    apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }
fi
python -m pip install -q "playwright>=1.40" "gradio>=5"
ML_MAMBA_BROWSER_TESTS=1 python -m pytest -m browser tests/test_web_demo.py "$@"
