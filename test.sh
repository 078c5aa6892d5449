#!/usr/bin/env bash
# Set up (with test tools) and run lint + the test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -m "not slow" --durations=25
