#!/usr/bin/env bash
# Installs the development dependencies (into a venv kept outside the clone and reused: torch is
# large) and runs every check and test: lints, cargo test, pytest against PEFT.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${LORAFAST_VENV:-$HOME/.cache/lorafast/venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# Builds the Rust extension (maturin, release) and installs torch, transformers, peft, bitsandbytes...
"$PY" -m pip install -q -e ".[dev]"
export PATH="$VENV/bin:$PATH"
# llama.cpp, the GGUF oracle: built once into ~/.cache/lorafast/llama (about 6 minutes on 2 cores).
LORAFAST_LLAMA_CPP="$(bash scripts/llama_cpp.sh "$PY")"
export LORAFAST_LLAMA_CPP

echo "== lints"
cargo fmt --check
cargo clippy --all-targets -q -- -D warnings
cargo clippy --all-targets --features python -q -- -D warnings
ruff check python tests benches examples
ruff format --check python tests benches examples
"$PY" -m mypy.stubtest lorafast._core

echo "== cargo test"
cargo test -q

echo "== pytest"
"$PY" -m pytest -q "$@"
