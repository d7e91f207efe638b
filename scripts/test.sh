#!/usr/bin/env bash
# Run every test in release mode (doc-tests included), every test binary even after a
# failure, and end with a one-line summary. Fetches the demo model, NVRTC and the openai
# Python client first; their checks are then required (a skip is a failure), as are the
# reference figures when ../shared is beside the repository.
# Without ../shared the reference checks are skipped (said in the summary), and without a GPU
# the GPU checks (scripts/gpu-check.sh runs them on a GPU machine).
# Without arguments it ends with the fuzz smoke (scripts/fuzz.sh --smoke: each fuzz target
# replays its corpus and runs 20 s under AFL++).
# Arguments go to cargo test (e.g. scripts/test.sh -p wkvc-tests --test demo_cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
WKVC_DEMO_MODEL=$(scripts/fetch-demo-model.sh)
export WKVC_DEMO_MODEL WKVC_REQUIRE_DEMO=1
# NVRTC from PyPI: the CUDA kernels are compiled to CUBIN in the tests (no GPU needed)
WKVC_NVRTC_LIB=$(scripts/fetch-nvrtc.sh)
export WKVC_NVRTC_LIB WKVC_REQUIRE_NVRTC=1
# the official openai client for the wkvc serve tests, in a cached virtual environment
VENV=${WKVC_CACHE:-$HOME/.cache/wkvc}/venv-openai
OPENAI_VERSION=3.57.0
if ! "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  echo "installing openai==$OPENAI_VERSION into $VENV ..." >&2
  python3 -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install -q "openai==$OPENAI_VERSION" >&2
fi
export WKVC_PYTHON="$VENV/bin/python" WKVC_REQUIRE_PYTHON=1
if [ -f ../shared/reference/smollm2.json ] && [ -f ../shared/data/wikitext2-eval.txt ]; then
  export WKVC_REQUIRE_REFERENCE=1
else
  echo "NOTE: ../shared/reference or ../shared/data is absent: the checks against the reference figures are skipped" >&2
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
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export WKVC_SKIP_LOG="$work/skips"
: >"$WKVC_SKIP_LOG"
set +e
cargo test --release --workspace --no-fail-fast "$@" 2>&1 | tee "$work/log"
rc=${PIPESTATUS[0]}
set -e
# the whole run (no arguments) ends with the fuzz smoke: every fuzz target replays its corpus
# and runs 20 s under AFL++ (scripts/fuzz.sh; cargo-afl is installed on first use)
fuzz=""
if [ $# -eq 0 ]; then
  if WKVC_FUZZ_OUT="$work/fuzz" scripts/fuzz.sh --smoke 20 2>&1 | tee "$work/fuzzlog"; then
    fuzz="; fuzz smoke: $(grep -c ' execs ' "$work/fuzzlog") targets, no crash or hang"
  else
    fuzz="; fuzz smoke: FAILED"
    rc=1
  fi
fi
# one line: tests passed/failed/ignored over all binaries, the failing binaries, the skips
summary=$(awk '
  /^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i+1) ~ /^passed/) p += $i
      if ($(i+1) ~ /^failed/) f += $i
      if ($(i+1) ~ /^ignored/) g += $i
    }
    bins++
  }
  END { printf "%d passed, %d failed, %d ignored in %d test binaries", p, f, g, bins }
' "$work/log")
failing=$(grep -E "^error: test failed, to rerun pass" "$work/log" | sed -E 's/.*pass `(.*)`/\1/' | paste -sd';' - | sed 's/;/; /g' || true)
skipped=$(sed -E 's/^SKIPPED ([^(]*) \(.*/\1/' "$WKVC_SKIP_LOG" | sed 's/ *$//' | sort -u | paste -sd, - | sed 's/,/, /g')
elapsed=$(( $(date +%s) - start ))
if [ "$rc" -eq 0 ]; then verdict=PASS; else verdict=FAIL; fi
echo
echo "wkvc tests: $verdict: $summary${failing:+ (failing: $failing)}; skipped: ${skipped:-none}$fuzz; $((elapsed / 60)) min $((elapsed % 60)) s"
exit "$rc"
