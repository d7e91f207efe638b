#!/usr/bin/env bash
# The main job on the demo model: fetch it, build wkvc, inspect it, generate text, and
# measure perplexity on a few windows.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(scripts/fetch-demo-model.sh)
cargo build --release -q -p wkvc
WKVC=target/release/wkvc
echo "== inspect"
$WKVC inspect "$MODEL"
echo; echo "== run (greedy)"
$WKVC run "$MODEL" -p "The capital of France is" -n 32
echo; echo "== chat"
$WKVC run "$MODEL" --chat -p "Write one sentence about the sea." -n 48
echo; echo "== perplexity (4 windows of 512 tokens)"
TEXT=../shared/data/wikitext2-eval.txt
if [ ! -f "$TEXT" ]; then
  # No evaluation text on this machine: score text the model samples itself (data-free).
  TEXT=$(mktemp)
  trap 'rm -f "$TEXT"' EXIT
  echo "(no ../shared/data here: evaluating on 2100 tokens sampled from the model itself)"
  $WKVC run "$MODEL" -p "Chapter 1." -n 2100 --temperature 1 --seed 7 --ctx 4096 --ignore-eos >"$TEXT" 2>/dev/null
fi
$WKVC eval "$MODEL" --ppl "$TEXT" --ctx 512 --windows 4
echo; echo "== bench (prefill 128, decode 32)"
$WKVC bench "$MODEL" --prompt 128 --gen 32 --runs 2
