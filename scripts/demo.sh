#!/usr/bin/env bash
# The main job on the demo model: fetch it, build wkvc, compile a W4KV4 plan with WKVQuant
# (learned clipping and smoothing; a quick calibration setting, a few minutes on 2 cores: the
# documented setting is wkvc's default and takes about 20), run prompts from the plan, evaluate
# it against the FP model and print the RTN quality table on a few windows.
#
#   scripts/demo.sh [--text FILE]      (or WKVC_DEMO_TEXT=FILE)
#
# Text for calibration and evaluation, in this order of preference:
#   --text FILE / $WKVC_DEMO_TEXT   your own text (UTF-8): its first half, cut at a line break
#                                   near the middle, calibrates; its second half is evaluated
#                                   (calibration never sees evaluation text). A few thousand
#                                   words or more: evaluation uses up to 2 windows of 512 tokens.
#   ../shared/data                  WikiText-2's calibration and evaluation splits, where the
#                                   repository sits beside that folder (the project's machines)
#   nothing                         data-free: calibration on text sampled from the FP model,
#                                   quality judged by KL divergence and top-1 agreement with the
#                                   FP model on other sampled text (perplexities on sampled text
#                                   are labelled as such: they say little)
# WKVC_DEMO_OUT sets the output folder (default target/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
TEXT_IN=${WKVC_DEMO_TEXT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --text) TEXT_IN=${2:?--text needs a file}; shift 2 ;;
    --text=*) TEXT_IN=${1#--text=}; shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (scripts/demo.sh [--text FILE])" >&2; exit 2 ;;
  esac
done
if [ -n "$TEXT_IN" ] && [ ! -s "$TEXT_IN" ]; then
  echo "error: --text $TEXT_IN: no such file, or empty" >&2
  exit 2
fi
MODEL=$(scripts/fetch-demo-model.sh)
cargo build --release -q -p wkvc
WKVC=target/release/wkvc
OUT=${WKVC_DEMO_OUT:-target/demo}
mkdir -p "$OUT"
PLAN="$OUT/smollm2-w4kv4.wkv"

ORIGIN=corpus
if [ -n "$TEXT_IN" ]; then
  CALIB="$OUT/text-calib.txt"
  TEXT="$OUT/text-eval.txt"
  python3 - "$TEXT_IN" "$CALIB" "$TEXT" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
mid = len(text) // 2
cut = text.rfind("\n", 0, mid)
if cut < len(text) // 4:
    cut = text.rfind(" ", 0, mid)
if cut <= 0:
    cut = mid
open(sys.argv[2], "w", encoding="utf-8").write(text[:cut])
open(sys.argv[3], "w", encoding="utf-8").write(text[cut:])
PY
  echo "(your text $TEXT_IN: its first half calibrates, its second half is evaluated)"
elif [ -f ../shared/data/wikitext2-calib.txt ] && [ -f ../shared/data/wikitext2-eval.txt ]; then
  CALIB=../shared/data/wikitext2-calib.txt
  TEXT=../shared/data/wikitext2-eval.txt
  echo "(WikiText-2 from ../shared/data: the calibration split calibrates, the evaluation split is evaluated)"
else
  # Data-free: calibration is sampled from the FP model (said in the compile output and
  # recorded in the plan); quality is judged against the FP model on other sampled text.
  CALIB=
  ORIGIN=sampled
  TEXT="$OUT/sampled-eval.txt"
  echo "(no text given and no ../shared/data: calibrating on text sampled from the FP model, and judging"
  echo " quality by KL divergence and top-1 agreement with the FP model on other sampled text;"
  echo " scripts/demo.sh --text FILE uses your own text instead)"
  if [ ! -s "$TEXT" ]; then
    echo "== sampling 1100 tokens of evaluation text from the FP model (seed 7; calibration uses other seeds)"
    $WKVC run "$MODEL" -p "Chapter 1." -n 1100 --temperature 1 --seed 7 --ctx 2048 --ignore-eos >"$TEXT.tmp" 2>/dev/null
    mv "$TEXT.tmp" "$TEXT"
  fi
fi
CALIB_ARGS=()
[ -n "$CALIB" ] && CALIB_ARGS=(--calib "$CALIB")

echo "== compile W4KV4 with WKVQuant (group 128, past-only, learned clipping + smoothing, CRR k=5;"
echo "   the plan selects the CPU back end's int8-activation fast path, the default)"
$WKVC compile "$MODEL" -o "$PLAN" "${CALIB_ARGS[@]}" --method wkvquant --calib-samples 4 --calib-len 128 --epochs 2
echo; echo "== inspect the plan and its CPU memory plan"
$WKVC inspect "$PLAN"
$WKVC inspect "$PLAN" --memory --ctx 2048
echo; echo "== run from the plan"
$WKVC run "$PLAN" -p "The capital of France is" -n 32
$WKVC run "$PLAN" --chat -p "Write one sentence about the sea." -n 48
echo; echo "== quality of the plan against the FP model (up to 2 windows of 512 tokens)"
$WKVC eval "$PLAN" --ppl "$TEXT" --windows 2 --kld-vs "$MODEL" --text-origin "$ORIGIN"
echo; echo "== quality table (up to 2 windows of 512, decode-equivalent protocol)"
$WKVC eval "$MODEL" --table --ppl "$TEXT" --windows 2 "${CALIB_ARGS[@]}" --text-origin "$ORIGIN"
echo; echo "== bench: FP model (interpreter) vs W4KV4 plan (compiled CPU engine, JIT at load)"
$WKVC bench "$MODEL" --prompt 128 --gen 32 --runs 2 --long-ctx 0
$WKVC bench "$PLAN" --prompt 512 --gen 128 --runs 2 --long-ctx 2048
