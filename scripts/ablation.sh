#!/usr/bin/env bash
# WKVQuant ablation on the demo model (issue 4): W4KV4 throughout,
#   RTN -> +POQ -> +smoothing (init only) -> +LWC (local MSE) -> +CRR MSE -> +CRR MAE (k=1,3,5),
# plus FP, W4-only RTN and W4-only with LWC. Each configuration is compiled to a plan (timed),
# then evaluated on the eval text (ctx 512, 8 windows, decode-equivalent protocol) for
# perplexity and KL divergence from the FP model. Results: $OUT/ablation.md and .jsonl.
#
# Calibration text: ../shared/data/wikitext2-calib.txt (required; the eval text is never used
# for calibration). Settings (environment): ABL_SAMPLES (16), ABL_LEN (256), ABL_EPOCHS (4),
# ABL_THREADS (2), ABL_WINDOWS (8), ABL_ONLY (space-separated row keys to run, default all),
# WKVC_ABLATION_OUT (target/ablation).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-$(scripts/fetch-demo-model.sh)}
CALIB=../shared/data/wikitext2-calib.txt
TEXT=../shared/data/wikitext2-eval.txt
if [ ! -f "$CALIB" ] || [ ! -f "$TEXT" ]; then
  echo "ablation.sh needs $CALIB and $TEXT (WikiText-2 splits); they are not here" >&2
  exit 2
fi
cargo build --release -q -p wkvc
WKVC=target/release/wkvc
OUT=${WKVC_ABLATION_OUT:-target/ablation}
mkdir -p "$OUT"
S=${ABL_SAMPLES:-16}; L=${ABL_LEN:-256}; E=${ABL_EPOCHS:-4}; T=${ABL_THREADS:-2}
W=${ABL_WINDOWS:-8}
WKV=(--method wkvquant --calib "$CALIB" --calib-samples "$S" --calib-len "$L" --epochs "$E")

# key|label|compile arguments (empty: the FP model itself)
ROWS=(
  "fp|FP32|"
  "w4rtn|W4 RTN (weight-only)|--kvbits 16 --calib $CALIB"
  "w4lwc|W4 LWC (weight-only, CRR MAE k=5)|--kvbits 16 ${WKV[*]}"
  "rtn|W4KV4 RTN|--no-poq --no-smooth --calib $CALIB"
  "poq|+POQ|--no-smooth --calib $CALIB"
  "smooth|+smoothing (init only)|--calib $CALIB --calib-len $L --calib-tokens $((S * L))"
  "lwc_local|+LWC, local MSE (k=0)|${WKV[*]} --crr-k 0 --loss mse"
  "crr_mse|+CRR MSE (k=5)|${WKV[*]} --crr-k 5 --loss mse"
  "crr_mae1|+CRR MAE (k=1)|${WKV[*]} --crr-k 1 --loss mae"
  "crr_mae3|+CRR MAE (k=3)|${WKV[*]} --crr-k 3 --loss mae"
  "crr_mae5|+CRR MAE (k=5) = WKVQuant|${WKV[*]} --crr-k 5 --loss mae"
)

RES="$OUT/ablation.jsonl"
: >"$RES.new"
for row in "${ROWS[@]}"; do
  IFS='|' read -r key label args <<<"$row"
  if [ -n "${ABL_ONLY:-}" ] && [[ " $ABL_ONLY " != *" $key "* ]]; then
    continue
  fi
  echo "== $label" >&2
  if [ "$key" = fp ]; then
    target=$MODEL; secs=0; calib='{}'
  else
    target="$OUT/$key.wkv"
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    $WKVC compile "$MODEL" -o "$target" --threads "$T" $args >"$OUT/$key.compile.log" 2>&1
    secs=$(echo "$(date +%s.%N) - $t0" | bc)
    calib=$($WKVC inspect "$target" --json | python3 -c 'import json,sys; q=json.load(sys.stdin)["plan"]["quant"]; c=q.get("calibrate") or {}; print(json.dumps({"seconds": c.get("seconds"), "peak_rss_bytes": c.get("peak_rss_bytes"), "settings": c.get("settings")}))')
  fi
  ev=$($WKVC eval "$target" --ppl "$TEXT" --ctx 512 --windows "$W" --kld-vs "$MODEL" --json --threads "$T")
  python3 -c 'import json,sys; e=json.loads(sys.argv[4]); c=json.loads(sys.argv[5]); print(json.dumps({"key": sys.argv[1], "label": sys.argv[2], "compile_seconds": float(sys.argv[3]), "perplexity": e["perplexity"], "kld": e.get("kld"), "tokens": e["tokens"], "calibration": c}))' \
    "$key" "$label" "$secs" "$ev" "$calib" | tee -a "$RES.new"
done
mv "$RES.new" "$RES"

python3 - "$RES" "$S" "$L" "$E" "$T" "$W" >"$OUT/ablation.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
s, l, e, t, w = sys.argv[2:]
fp = next((r["perplexity"] for r in rows if r["key"] == "fp"), None)
print(f"WKVQuant ablation, demo model, eval text ctx 512 x {w} windows (decode-equivalent);")
print(f"wkvquant calibration: {s} samples x {l} tokens of wikitext2-calib, {e} epochs, {t} threads\n")
print("| config | perplexity | gap to FP | KLD vs FP | compile s | calibration s | peak RSS MiB |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    c = r.get("calibration") or {}
    gap = "" if fp is None or r["key"] == "fp" else f'{r["perplexity"] - fp:+.3f}'
    kld = "" if r.get("kld") is None else f'{r["kld"]:.4f}'
    cs = "" if c.get("seconds") is None else f'{c["seconds"]:.0f}'
    rss = "" if c.get("peak_rss_bytes") is None else f'{c["peak_rss_bytes"] / 1048576:.0f}'
    comp = "" if r["key"] == "fp" else f'{r["compile_seconds"]:.0f}'
    print(f'| {r["label"]} | {r["perplexity"]:.4f} | {gap} | {kld} | {comp} | {cs} | {rss} |')
by = {r["key"]: r for r in rows}
if fp is not None and "crr_mae5" in by and "w4lwc" in by:
    a = by["crr_mae5"]["perplexity"] - fp
    b = by["w4lwc"]["perplexity"] - fp
    print(f"\nW4KV4 WKVQuant gap / W4-only LWC gap = {a:.3f} / {b:.3f} = {a / b:.2f}x")
EOF
cat "$OUT/ablation.md"
