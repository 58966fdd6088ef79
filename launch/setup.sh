#!/usr/bin/env bash
# Create .venv and install the trainer (an editable package) with its requirements, pinned to the tested
# versions (constraints.txt). `bash launch/setup.sh requirements-dev.txt` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r "${1:-requirements.txt}"
