#!/usr/bin/env bash
# Run every test in release mode. Fetches the demo model and NVRTC first (tests then require
# them), and requires the shared reference figures when ../shared is present beside the
# repository.
set -euo pipefail
cd "$(dirname "$0")/.."
WKVC_DEMO_MODEL=$(scripts/fetch-demo-model.sh)
export WKVC_DEMO_MODEL WKVC_REQUIRE_DEMO=1
# NVRTC from PyPI: the CUDA kernels are compiled to CUBIN in the tests (no GPU needed)
WKVC_NVRTC_LIB=$(scripts/fetch-nvrtc.sh)
export WKVC_NVRTC_LIB WKVC_REQUIRE_NVRTC=1
if [ -f ../shared/reference/smollm2.json ] && [ -f ../shared/data/wikitext2-eval.txt ]; then
  export WKVC_REQUIRE_REFERENCE=1
else
  echo "NOTE: ../shared/reference or ../shared/data is absent: tests comparing with the reference figures are skipped" >&2
fi
# the CUDA host emulator's tests build the CUDA C with a C++ compiler
CXX_BIN=${WKVC_CXX:-c++}
if ! command -v "$CXX_BIN" >/dev/null 2>&1; then
  echo "no C++ compiler ($CXX_BIN) for the CUDA host emulator: installing g++" >&2
  if command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && apt-get install -y -qq g++ >/dev/null; } ||
      sudo sh -c 'apt-get update -qq && apt-get install -y -qq g++ >/dev/null' ||
      { echo "error: could not install g++; set WKVC_CXX to a C++17 compiler" >&2; exit 1; }
  else
    echo "error: no C++ compiler; set WKVC_CXX to a C++17 compiler" >&2
    exit 1
  fi
fi
export INSTA_UPDATE=no
cargo test --release --workspace "$@"
