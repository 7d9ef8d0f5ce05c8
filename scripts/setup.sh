#!/usr/bin/env bash
# Set up a virtual environment in .venv with opendelta and everything it uses.
#   bash scripts/setup.sh          library, transformers, the bundled model and data
#   bash scripts/setup.sh --test   also the test tools (peft, playwright, Debian's chromium) and
#                                  the quantization libraries (bitsandbytes, torchao)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
# Every install is held to the lock, constraints.txt: the same versions on any machine.
# torch first and pinned: a CPU build; an unpinned torch would pull CUDA packages.
pip install -q -c constraints.txt "torch==2.13.0"
extras="full"
if [ "${1:-}" = "--test" ]; then
    extras="full,test,quantized"
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        # For the browser test of interactive module selection; skipped where absent.
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "warning: could not install chromium; the browser test will be skipped" >&2
    fi
fi
pip install -q -c constraints.txt -e ".[$extras]"
