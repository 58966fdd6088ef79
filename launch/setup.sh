#!/usr/bin/env bash
# Create .venv and install the trainer's requirements (CPU or GPU machine alike).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r "${1:-requirements.txt}"
