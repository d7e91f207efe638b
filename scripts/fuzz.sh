#!/usr/bin/env bash
# Coverage-guided fuzzing of wkvc's parsers of untrusted input with AFL++ (cargo afl, stable
# Rust). The targets are in fuzz/src/lib.rs; their seed corpora in fuzz/corpus/TARGET/; inputs
# that once failed in fuzz/regressions/TARGET/ (replayed by `cargo test -p wkvc-fuzz`).
#
#   scripts/fuzz.sh --list                  the target names, one a line
#   scripts/fuzz.sh TARGET [SECONDS] [JOBS] [EXECS]
#                                           fuzz TARGET for SECONDS (default 600) on JOBS
#                                           AFL++ instances (default 1), each stopping early
#                                           once its queue has EXECS executions (AFL's -E:
#                                           a resumed queue's count included); findings and
#                                           the grown queue in target/fuzz/TARGET/ (a later
#                                           run resumes; WKVC_FUZZ_OUT sets another folder)
#   scripts/fuzz.sh --smoke [SECONDS]       every target: replay its corpus, then SECONDS
#                                           (default 20) of fuzzing; fails on any crash or hang
#   scripts/fuzz.sh --stats TARGET          executions, corpus size, edges, crashes, hangs
#
# Installs cargo-afl (crates.io) and builds AFL++ on first use. An execution over 1 s is a
# hang; a target over 1 GiB of address space (AFL's -m) is a crash. Every run rebuilds the
# harness first (incremental: seconds when nothing changed), so a campaign never fuzzes a stale
# binary. With WKVC_FUZZ_LEAKS=DIR, the harness writes every input after which the process
# holds more heap than before to DIR/leak-BYTES-N, and the heap's size (live bytes, glibc's
# arena) at powers of two and every 20 000 executions to DIR/heap-PID.log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${WKVC_FUZZ_OUT:-$ROOT/target/fuzz}
# campaigns build at opt-level 3 (AFL_OPT_LEVEL, cargo-afl's default); the smoke at 0, in
# its own folder: it builds in a fraction of the time and runs 20 s
AFL_OPT_LEVEL=${AFL_OPT_LEVEL:-3}
AFL_DIR=$ROOT/target/afl
BIN=$AFL_DIR/release/wkvc-fuzz
export PATH="$HOME/.cargo/bin:$PATH"

targets() { sed -n '/^pub const TARGETS/,/^];/s/^ *("\([a-z_]*\)".*/\1/p' fuzz/src/lib.rs; }

die() { echo "error: $*" >&2; exit 1; }

ensure_afl() {
  if ! cargo afl --version >/dev/null 2>&1; then
    echo "installing cargo-afl from crates.io ..." >&2
    cargo install --locked cargo-afl@0.18.2 >&2
  fi
  # AFL++ itself, built once per rustc (cargo afl config --build says so when it is there)
  if ! ls "$HOME"/.local/share/afl.rs/rustc-*/afl.rs-*/afl/bin/afl-fuzz >/dev/null 2>&1; then
    echo "building AFL++ ..." >&2
    cargo afl config --build >&2
  fi
}

build() {
  ensure_afl
  echo "building the instrumented harness ($AFL_DIR, opt-level $AFL_OPT_LEVEL) ..." >&2
  AFL_OPT_LEVEL=$AFL_OPT_LEVEL cargo afl build --release -q -p wkvc-fuzz --features afl \
    --bin wkvc-fuzz --target-dir "$AFL_DIR" >&2
}

stat() { sed -n "s/^$2 *: *//p" "$1/default/fuzzer_stats" 2>/dev/null | head -1; }

stats() {
  local t=$1 d=$OUT/$1 execs=0 secs=0 crashes=0 hangs=0 corpus=0 edges=0
  [ -d "$d" ] || die "no campaign of $t in $d"
  for inst in "$d"/*/; do
    [ -f "$inst/fuzzer_stats" ] || continue
    local s=$inst/fuzzer_stats
    execs=$((execs + $(sed -n 's/^execs_done *: *//p' "$s")))
    secs=$((secs + $(sed -n 's/^run_time *: *//p' "$s")))
    crashes=$((crashes + $(sed -n 's/^saved_crashes *: *//p' "$s")))
    hangs=$((hangs + $(sed -n 's/^saved_hangs *: *//p' "$s")))
    corpus=$(( $(sed -n 's/^corpus_count *: *//p' "$s") > corpus ? $(sed -n 's/^corpus_count *: *//p' "$s") : corpus ))
    edges=$(( $(sed -n 's/^edges_found *: *//p' "$s") > edges ? $(sed -n 's/^edges_found *: *//p' "$s") : edges ))
  done
  printf '%-14s execs %11d  cpu-s %6d  corpus %5d  edges %6d  crashes %d  hangs %d\n' \
    "$t" "$execs" "$secs" "$corpus" "$edges" "$crashes" "$hangs"
  [ "$crashes" -eq 0 ] && [ "$hangs" -eq 0 ]
}

fuzz() {
  local t=$1 secs=${2:-600} jobs=${3:-1} execs=${4:-}
  targets | grep -qx "$t" || die "unknown target \`$t\` (scripts/fuzz.sh --list)"
  [ -n "${BUILT:-}" ] || build
  mkdir -p "$OUT/$t"
  export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 \
    AFL_QUIET=1 AFL_NO_AFFINITY=1 AFL_SKIP_CRASHES=0 AFL_AUTORESUME=1
  local pids=() i
  for ((i = 0; i < jobs; i++)); do
    # cmplog (input-to-state, `-c0`, which cargo afl adds) on the main instance only, as AFL++
    # advises: the others mutate at a quarter more executions a second without it
    local role=(-M default)
    [ "$i" -gt 0 ] && role=(-c - -S "s$i")
    cargo afl fuzz "${role[@]}" -i "fuzz/corpus/$t" -o "$OUT/$t" -t 1000 -m 1024 \
      -V "$secs" ${execs:+-E "$execs"} -- "$BIN" "$t" >"$OUT/$t/afl-$i.log" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  [ $rc -eq 0 ] || { tail -20 "$OUT/$t/afl-0.log" >&2; die "afl-fuzz failed on $t"; }
  stats "$t"
}

case "${1:-}" in
  --list) targets ;;
  --build) build ;;
  --stats) [ -n "${2:-}" ] || die "--stats TARGET"; stats "$2" ;;
  --smoke)
    secs=${2:-20}
    OUT=${WKVC_FUZZ_OUT:-$ROOT/target/fuzz-smoke}
    AFL_OPT_LEVEL=0 AFL_DIR=$ROOT/target/afl-smoke BIN=$AFL_DIR/release/wkvc-fuzz
    echo "== replaying every corpus (cargo test -p wkvc-fuzz)"
    cargo test --release -q -p wkvc-fuzz
    build
    BUILT=1
    # two targets at a time (a core each)
    fail=0 pids=()
    for t in $(targets); do
      rm -rf "${OUT:?}/$t"
      fuzz "$t" "$secs" 1 &
      pids+=($!)
      if [ ${#pids[@]} -eq 2 ]; then
        for p in "${pids[@]}"; do wait "$p" || fail=1; done
        pids=()
      fi
    done
    for p in "${pids[@]}"; do wait "$p" || fail=1; done
    [ $fail -eq 0 ] || die "a fuzz target crashed or hung: see $OUT/TARGET/default/{crashes,hangs}"
    ;;
 ""|-h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) fuzz "$@" ;;
esac
