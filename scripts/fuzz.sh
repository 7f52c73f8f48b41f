#!/usr/bin/env bash
# Fuzz one parser of untrusted files with libFuzzer, on the stable toolchain (no cargo-fuzz, no nightly):
# the sanitizer-coverage instrumentation is passed to rustc the way cargo-fuzz passes it, and libfuzzer-sys
# builds libFuzzer itself with the system C++ compiler.
#
#   bash scripts/fuzz.sh TARGET [SECONDS] [extra libFuzzer flags]
#   TARGET: safetensors_checkpoint | adapter_folder | quantized_checkpoint
#
# New inputs that reach new code are added to fuzz/corpus/TARGET (merged, so the corpus stays minimal);
# crashes go to fuzz/artifacts/TARGET/. `cargo test` replays the corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?target: safetensors_checkpoint | adapter_folder | quantized_checkpoint}"
seconds="${2:-600}"
shift $(( $# > 1 ? 2 : 1 ))
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# With an explicit --target the flags reach only the fuzzed code, not build scripts or proc macros.
host="$(rustc -vV | sed -n 's/^host: //p')"
cargo build -q --release --manifest-path fuzz/Cargo.toml --target "$host" --bin "$target"
bin="fuzz/target/$host/release/$target"
corpus="fuzz/corpus/$target"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$corpus" "fuzz/artifacts/$target"
# Fuzz into a scratch corpus seeded with the kept one, then merge back only what adds coverage.
TMPDIR="${TMPDIR:-/dev/shm}" "$bin" "$work" "$corpus" -max_total_time="$seconds" -max_len=65536 -timeout=10 \
    -rss_limit_mb=2048 -dict=fuzz/json.dict -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1 "$@" \
    2>&1 | tail -n 25
"$bin" -merge=1 "$corpus" "$work" 2>&1 | tail -n 2
