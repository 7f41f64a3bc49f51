#!/usr/bin/env bash
# Set up a virtual environment (CPU torch wheel) and run the test suite. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
# UTF-8 everywhere: progress bars and messages contain non-ASCII characters even under a bare C locale.
export PYTHONUTF8=1 LC_ALL=C.UTF-8 LANG=C.UTF-8
bash scripts/setup.sh
. .venv/bin/activate
python -m ruff check MedDiffusionLib  # the library lints clean (rules in pyproject.toml)
python -m mypy  # the library type-checks (files and strictness in pyproject.toml)
python -m pytest -q -p no:cacheprovider "$@"
