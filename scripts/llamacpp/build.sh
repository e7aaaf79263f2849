#!/usr/bin/env bash
# Build llama.cpp (libllama, llama-bench, llama-quantize, llama-perplexity) from the source that the llama-cpp-python sdist on PyPI
# vendors, and lp-logits (logits.cpp) against it. Everything goes under DIR (git-ignored).
#   scripts/llamacpp/build.sh [DIR]      (JOBS=2, PY=python3 by default)
set -euo pipefail
DIR=${1:-.llamacpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-2}
PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

if [ ! -f "$DIR/src/CMakeLists.txt" ]; then
    "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DIR/sdist"
    tar xzf "$DIR/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$DIR/sdist"
    mv "$DIR/sdist/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DIR/src"
    rm -rf "$DIR/sdist/llama_cpp_python-$VERSION"
fi

if [ -x "$DIR/build/bin/lp-logits" ] && [ -x "$DIR/build/bin/llama-bench" ] && [ -x "$DIR/build/bin/llama-quantize" ] && [ -x "$DIR/build/bin/llama-perplexity" ] && [ "$DIR/build/bin/lp-logits" -nt "$HERE/logits.cpp" ]; then
    echo "llama.cpp already built in $DIR/build/bin"
    exit 0
fi
start=$(date +%s)
cmake -S "$DIR/src" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON > "$DIR/configure.log"
cmake --build "$DIR/build" -j"$JOBS" --target llama llama-bench llama-quantize llama-perplexity > "$DIR/build.log"
g++ -O2 -std=c++17 "$HERE/logits.cpp" -I "$DIR/src/include" -I "$DIR/src/ggml/include" -L "$DIR/build/bin" \
    -lllama -lggml -lggml-base -Wl,-rpath,"$DIR/build/bin" -o "$DIR/build/bin/lp-logits"
echo "built llama.cpp (llama-cpp-python $VERSION) in $(( $(date +%s) - start )) s with $JOBS jobs: $DIR/build/bin"
