#!/usr/bin/env bash
# Install NVRTC (the pip wheel nvidia-cuda-nvrtc-cu12, no GPU needed) into wkvc's cache and
# print the path of libnvrtc.so.12 (for WKVC_NVRTC_LIB). Idempotent; an interrupted install
# leaves nothing behind.
#   WKVC_CACHE   cache directory (default ~/.cache/wkvc)
set -euo pipefail
CACHE=${WKVC_CACHE:-$HOME/.cache/wkvc}
SPEC="nvidia-cuda-nvrtc-cu12==12.9.86"
DEST="$CACHE/nvrtc"
LIB="$DEST/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
if [ -f "$LIB" ] && [ -f "$DEST/.installed" ]; then echo "$LIB"; exit 0; fi
mkdir -p "$CACHE"
tmp=$(mktemp -d "$CACHE/.nvrtc.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "installing $SPEC into $DEST ..." >&2
python3 -m pip install -q --no-deps --target "$tmp" "$SPEC" >&2
[ -f "$tmp/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ] || { echo "error: $SPEC has no libnvrtc.so.12" >&2; exit 1; }
touch "$tmp/.installed"
rm -rf "$DEST"
mv "$tmp" "$DEST"
echo "$LIB"
