#!/bin/sh
# Does the core install resolve to binary wheels on an Apple Silicon Mac? macOS cannot be run here, so
# this asks pip to resolve (and download, not install) the core for CPython 3.12 on macOS 11-14 arm64
# (scipy's newest wheels carry only the newer macOS tags), with the versions of constraints.txt.
#
#   sh tools/check_macos_resolution.sh [OUT_DIR]        # or: make check-macos
#
# Prints every wheel it resolved and exits non-zero when a dependency has no macOS arm64 wheel.
# Its last run is recorded in docs/benchmarks.md.
set -eu
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d /tmp/lsync_macos.XXXXXX)}
mkdir -p "$out/dist" "$out/wheels"
python3 -m pip wheel --no-deps -q -w "$out/dist" .
wheel=$(ls "$out"/dist/lsync_jax-*.whl)
set -- --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform macosx_14_0_arm64 --platform macosx_13_0_arm64 --platform macosx_12_0_arm64 \
    --platform macosx_11_0_arm64 --platform macosx_11_0_universal2
status=0
# "$wheel" with constraints.txt: the tested versions; then the core's own ranges (what a user resolves).
python3 -m pip download -q "$@" -d "$out/wheels" -c constraints.txt "$wheel" || status=1
echo "with constraints.txt: exit $status; resolved:"
ls "$out/wheels" | sed 's/^/  /'
python3 -m pip download -q "$@" -d "$out/latest" "$wheel" || status=$((status + 2))
echo "without constraints (newest releases): exit $status; resolved:"
ls "$out/latest" 2>/dev/null | sed 's/^/  /'
exit $status
