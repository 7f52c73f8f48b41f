#!/usr/bin/env bash
# The GGUF oracle: llama.cpp as vendored in the llama-cpp-python source distribution on PyPI, built once
# into a cache outside the clone (like the test venv) and reused.
#
#   bash scripts/llama_cpp.sh PYTHON      # prints the cache folder when it is ready
#
# It holds: the sdist (convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py, the C++ sources), and a
# shared build of libllama + ggml that the sdist's own Python binding (llama_cpp, ctypes) loads through
# LLAMA_CPP_LIB_PATH: the tests run models and llama_model_quantize (what llama-quantize calls) through it.
set -euo pipefail
PY="${1:?python of the venv}"
VERSION=0.3.36
CACHE="${LORAFAST_LLAMA_CACHE:-$HOME/.cache/lorafast/llama}"
SRC="$CACHE/llama_cpp_python-$VERSION"
BUILD="$SRC/build"
STAMP="$BUILD/.lorafast-built"
if [ -f "$STAMP" ]; then
    echo "$SRC"
    exit 0
fi
mkdir -p "$CACHE"
# cmake from PyPI (a binary wheel), so a fresh machine needs only a C/C++ compiler.
"$PY" -m pip install -q "cmake>=3.24"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    # The sdist itself, checked against the digest in PyPI's simple index (what pip reads; pip download
    # would build its build backend from source just to read the metadata).
    "$PY" - "$CACHE" "$VERSION" <<'EOF'
import hashlib, re, sys, tarfile, urllib.request, urllib.parse
cache, version = sys.argv[1], sys.argv[2]
index = "https://pypi.org/simple/llama-cpp-python/"
page = urllib.request.urlopen(index, timeout=120).read().decode()
name = f"llama_cpp_python-{version}.tar.gz"
m = re.search(r'href="([^"#]*/' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', page)
if m is None:
    sys.exit(f"{index}: no {name}")
url, digest = urllib.parse.urljoin(index, m.group(1)), m.group(2)
path = f"{cache}/{name}"
data = urllib.request.urlopen(url, timeout=600).read()
if hashlib.sha256(data).hexdigest() != digest:
    sys.exit(f"{url}: sha256 does not match PyPI's")
open(path, "wb").write(data)
with tarfile.open(path) as t:
    t.extractall(cache, filter="data")
EOF
fi
CMAKE="$(dirname "$PY")/cmake"
"$CMAKE" -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_OPENMP=OFF >"$BUILD.log" 2>&1 \
    || { tail -n 30 "$BUILD.log" >&2; exit 1; }
"$CMAKE" --build "$BUILD" --target llama -j "$(nproc)" >>"$BUILD.log" 2>&1 || { tail -n 30 "$BUILD.log" >&2; exit 1; }
touch "$STAMP"
echo "$SRC"
