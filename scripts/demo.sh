#!/usr/bin/env bash
# The main job on the demo model: fetch it, build wkvc, compile a W4KV4 plan with WKVQuant
# (learned clipping and smoothing; a quick calibration setting, about 2 minutes on 2 cores: the
# documented setting is wkvc's default and takes about 20), run prompts from the plan, evaluate
# it against the FP model and print the RTN quality table on a few windows.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(scripts/fetch-demo-model.sh)
cargo build --release -q -p wkvc
WKVC=target/release/wkvc
OUT=${WKVC_DEMO_OUT:-target/demo}
mkdir -p "$OUT"
PLAN="$OUT/smollm2-w4kv4.wkv"

CALIB=../shared/data/wikitext2-calib.txt
TEXT=../shared/data/wikitext2-eval.txt
CALIB_ARGS=()
if [ -f "$CALIB" ] && [ -f "$TEXT" ]; then
  CALIB_ARGS=(--calib "$CALIB")
else
  # No text on this machine: calibration is sampled from the FP model (data-free, said in the
  # compile output and recorded in the plan); quality is judged on other sampled text.
  TEXT="$OUT/sampled-eval.txt"
  echo "(no ../shared/data here: calibrating and evaluating on text sampled from the FP model)"
  [ -s "$TEXT" ] || $WKVC run "$MODEL" -p "Chapter 1." -n 1100 --temperature 1 --seed 7 --ctx 2048 --ignore-eos >"$TEXT" 2>/dev/null
fi

echo "== compile W4KV4 with WKVQuant (group 128, past-only, learned clipping + smoothing, CRR k=5;"
echo "   the plan selects the CPU back end's int8-activation fast path)"
$WKVC compile "$MODEL" -o "$PLAN" "${CALIB_ARGS[@]}" --method wkvquant --calib-samples 4 --calib-len 128 --epochs 2 --cpu-act int8
echo; echo "== inspect the plan and its CPU memory plan"
$WKVC inspect "$PLAN"
$WKVC inspect "$PLAN" --memory --ctx 2048
echo; echo "== run from the plan"
$WKVC run "$PLAN" -p "The capital of France is" -n 32
$WKVC run "$PLAN" --chat -p "Write one sentence about the sea." -n 48
echo; echo "== perplexity and KLD of the plan vs the FP model (2 windows of 512)"
$WKVC eval "$PLAN" --ppl "$TEXT" --windows 2 --kld-vs "$MODEL"
echo; echo "== quality table (2 windows of 512, decode-equivalent protocol)"
$WKVC eval "$MODEL" --table --ppl "$TEXT" --windows 2 "${CALIB_ARGS[@]}"
echo; echo "== bench: FP model (interpreter) vs W4KV4 plan (compiled CPU engine, JIT at load)"
$WKVC bench "$MODEL" --prompt 128 --gen 32 --runs 2 --long-ctx 0
$WKVC bench "$PLAN" --prompt 512 --gen 128 --runs 2 --long-ctx 2048
