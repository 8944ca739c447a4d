#!/usr/bin/env bash
# Build llama.cpp's own HTTP server (`llama-server`: continuous batching, parallel slots) from the llama.cpp
# source vendored in the llama-cpp-python sdist of the installed version, so that the server is the same
# llama.cpp as the llama-cpp-python peer of benchmarks/peers.py.
#
#     benchmarks/build_llama_server.sh        # prints the path of the binary
#
# Installs ${OWL_DEPLOY_HOME:-$HOME/.cache/owl_deploy}/tools/llama-server-VERSION/llama-server (VERSION is
# llama-cpp-python's); does nothing when it is already there. Builds in a temporary folder and moves the
# finished folder into place at the end, so an interrupted build leaves nothing behind. CPU only, static,
# -march=native (GGML_NATIVE), without the web UI (no download at build time) and without HTTPS.
# Environment: PYTHON (default .venv/bin/python of this project), JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-2}"

die() {
    echo "build_llama_server: $*" >&2
    exit 1
}

[[ -x "$PYTHON" ]] || die "no Python at $PYTHON (set PYTHON=...)"
VERSION="$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null)" ||
    die "llama_cpp is not importable by $PYTHON (pip install -e '.[peers]')"
TOOLS="${OWL_DEPLOY_HOME:-$HOME/.cache/owl_deploy}/tools"
DEST="$TOOLS/llama-server-$VERSION"
if [[ -x "$DEST/llama-server" ]]; then
    echo "$DEST/llama-server"
    exit 0
fi

command -v cmake >/dev/null 2>&1 || die "cmake is missing (apt-get install cmake, or pip install cmake in a throwaway venv and put it on PATH)"
CC_BIN="${CC:-$(command -v cc || command -v gcc || command -v clang || true)}"
CXX_BIN="${CXX:-$(command -v c++ || command -v g++ || command -v clang++ || true)}"
[[ -n "$CC_BIN" ]] || die "no C compiler (cc/gcc/clang) on PATH (apt-get install build-essential)"
[[ -n "$CXX_BIN" ]] || die "no C++ compiler (c++/g++/clang++) on PATH (apt-get install build-essential)"
GENERATOR=()
command -v ninja >/dev/null 2>&1 && GENERATOR=(-G Ninja)
command -v ninja >/dev/null 2>&1 || command -v make >/dev/null 2>&1 || die "neither ninja nor make is on PATH"

mkdir -p "$TOOLS"
TMP="$(mktemp -d "$TOOLS/.llama-server-$VERSION.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "build_llama_server: llama-cpp-python $VERSION sdist from PyPI" >&2
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP/dl" >&2 ||
    die "pip download of the llama-cpp-python==$VERSION sdist failed"
SDIST="$(ls "$TMP"/dl/llama_cpp_python-*.tar.gz 2>/dev/null | head -n1)"
[[ -n "$SDIST" ]] || die "no llama_cpp_python-$VERSION.tar.gz in what pip downloaded"
TOP="llama_cpp_python-$VERSION"
# vendor/llama.cpp and the git data of that submodule (the sdist ships it: the commit of the build comes from it)
tar -xzf "$SDIST" -C "$TMP" --no-same-owner --wildcards "$TOP/vendor/llama.cpp/*" "$TOP/CHANGELOG.md" ||
    die "the sdist has no vendor/llama.cpp"
tar -xzf "$SDIST" -C "$TMP" --no-same-owner --wildcards "$TOP/.git/modules/vendor/llama.cpp/*" 2>/dev/null || true
SRC="$TMP/$TOP/vendor/llama.cpp"

# The llama.cpp commit: from the submodule's git data, else from llama-cpp-python's changelog.
COMMIT="$(GIT_CEILING_DIRECTORIES="$TMP/$TOP" git -C "$SRC" rev-parse --short=9 HEAD 2>/dev/null || true)"
if [[ -z "$COMMIT" ]]; then
    COMMIT="$(awk -v v="## [$VERSION]" '$0==v {on=1; next} /^## \[/ {on=0} on' "$TMP/$TOP/CHANGELOG.md" |
        grep -oE 'llama\.cpp@[0-9a-f]{7,40}' | head -n1 | cut -d@ -f2 || true)"
fi
COMMIT="${COMMIT:-unknown}"

FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_CURL=OFF # deprecated and ignored in this llama.cpp (it has no libcurl download code left)
    -DGGML_NATIVE=ON
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_OPENSSL=OFF         # no HTTPS: the server listens on loopback
    -DLLAMA_BUILD_UI=OFF        # no npm build of the web UI ...
    -DLLAMA_USE_PREBUILT_UI=OFF # ... and no download of a prebuilt one (the API does not need it)
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    "-DLLAMA_BUILD_COMMIT=$COMMIT"
    "-DCMAKE_C_COMPILER=$CC_BIN"
    "-DCMAKE_CXX_COMPILER=$CXX_BIN"
)
echo "build_llama_server: llama.cpp $COMMIT, cmake ${FLAGS[*]}" >&2
start=$SECONDS
cmake -S "$SRC" -B "$TMP/build" "${GENERATOR[@]}" "${FLAGS[@]}" >"$TMP/configure.log" 2>&1 ||
    die "cmake configure failed: $(grep -m1 -iE 'error' "$TMP/configure.log" || tail -n1 "$TMP/configure.log")"
cmake --build "$TMP/build" --target llama-server -j "$JOBS" >"$TMP/build.log" 2>&1 ||
    die "cmake build failed: $(grep -m1 -E 'error|Error' "$TMP/build.log" || tail -n1 "$TMP/build.log")"
BIN="$(find "$TMP/build" -type f -name llama-server -perm -u+x | head -n1)"
[[ -n "$BIN" ]] || die "the build produced no llama-server binary"
"$BIN" --version >/dev/null 2>&1 || die "the built llama-server does not run: $("$BIN" --version 2>&1 | tail -n1)"

STAGE="$TMP/llama-server-$VERSION"
mkdir -p "$STAGE"
cp "$BIN" "$STAGE/llama-server"
cp "$SRC/LICENSE" "$STAGE/LICENSE"
{
    echo "llama-cpp-python $VERSION, llama.cpp commit $COMMIT"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - start)) s with $("$CXX_BIN" --version | head -n1), $(cmake --version | head -n1)"
    echo "cmake ${FLAGS[*]}"
    "$BIN" --version 2>&1
} >"$STAGE/BUILD_INFO.txt"
# the move is atomic (same file system); a concurrent build that finished first wins
mv -T "$STAGE" "$DEST" 2>/dev/null || [[ -x "$DEST/llama-server" ]] || die "could not move the build to $DEST"
echo "build_llama_server: built in $((SECONDS - start)) s" >&2
echo "$DEST/llama-server"
