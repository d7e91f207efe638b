#!/usr/bin/env bash
# KV-cache quality on the demo model against llama.cpp's quantized caches, in one run and one
# table (issue 19): llama.cpp's scoring (`wkvc eval --score llama`, llama-perplexity's chunks
# of 512 with the second half of each scored) on the eval text, KV-only rows (weights in full
# precision) at 4 and 3 bits and W4KV4 rows:
#   ours: RTN / +POQ / +smoothing / +rotation / rotation without smoothing / +learned
#         (WKVQuant) / +learned+rotation, and +rotation / +learned+rotation with a (scale,
#         zero) pair per 32 channels (--kv-group 32)
#   llama.cpp (an F32 GGUF of the same weights): f16 cache (its default), q8_0, q4_0 (its
#         Hadamard rotation on, its default) and q4_0 unrotated (LLAMA_ATTN_ROT_DISABLE=1)
# with the gap to each engine's own full-precision cache and the cache's bytes a token.
# Results: $OUT/kv-table.md and .jsonl.
#
# Needs: the WikiText-2 splits (../shared/data, or KV_TEXT / KV_CALIB), and llama.cpp built by
# ../shared/tools/peer-llamacpp.sh (or PEER_LLAMACPP=path of that script; KV_NO_PEER=1 leaves
# its rows out). Settings (environment): KV_CHUNKS (16 chunks of 512; llama-perplexity's
# --chunks), KV_THREADS (2), KV_ONLY (row keys to run, space-separated; default all),
# KV_KLD=1 (also KL divergence from the FP model: twice the time), WKVC_KV_TABLE_OUT
# (target/kv-table), WKVC_BIN (the wkvc binary measured; target/release/wkvc). Our rows
# run on the CPU engine's exact path (f32 activations). Rows
# not run (KV_ONLY) keep their figures from the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-$(scripts/fetch-demo-model.sh)}
CALIB=${KV_CALIB:-../shared/data/wikitext2-calib.txt}
TEXT=${KV_TEXT:-../shared/data/wikitext2-eval.txt}
PEER=${PEER_LLAMACPP:-../shared/tools/peer-llamacpp.sh}
for f in "$CALIB" "$TEXT"; do
  [ -f "$f" ] || { echo "kv-table.sh needs $f (WikiText-2 split; KV_CALIB / KV_TEXT)" >&2; exit 2; }
done
if [ -z "${KV_NO_PEER:-}" ] && [ ! -x "$PEER" ]; then
  echo "kv-table.sh needs llama.cpp's peer script $PEER (PEER_LLAMACPP=...; KV_NO_PEER=1 to leave llama.cpp out)" >&2
  exit 2
fi
cargo build --release -q -p wkvc
WKVC=${WKVC_BIN:-target/release/wkvc}
OUT=${WKVC_KV_TABLE_OUT:-target/kv-table}
mkdir -p "$OUT"
N=${KV_CHUNKS:-16}; T=${KV_THREADS:-2}
C=(--calib "$CALIB")
WKV=(--method wkvquant --calib "$CALIB")
ROT=(--kv-rotate hadamard)
G32=(--kv-group 32)

# key|label|weights|kv bits|compile arguments (fp: the model itself; llama rows: -ctk/-ctv)
ROWS=(
  "fp|FP (KV16)|FP|16|fp"
)
for b in 4 3; do
  ROWS+=(
    "kv${b}_rtn|RTN|FP|$b|--wbits 16 --kvbits $b --no-poq --no-smooth"
    "kv${b}_poq|+POQ|FP|$b|--wbits 16 --kvbits $b --no-smooth"
    "kv${b}_smooth|+smoothing|FP|$b|--wbits 16 --kvbits $b ${C[*]}"
    "kv${b}_rot|+rotation|FP|$b|--wbits 16 --kvbits $b ${C[*]} ${ROT[*]}"
    "kv${b}_rotonly|rotation, no smoothing|FP|$b|--wbits 16 --kvbits $b --no-smooth ${ROT[*]}"
    "kv${b}_wkvq|+learned (WKVQuant)|FP|$b|--wbits 16 --kvbits $b ${WKV[*]}"
    "kv${b}_wkvqrot|+learned+rotation|FP|$b|--wbits 16 --kvbits $b ${WKV[*]} ${ROT[*]}"
    "kv${b}_g32rot|+rotation, groups of 32|FP|$b|--wbits 16 --kvbits $b ${C[*]} ${ROT[*]} ${G32[*]}"
    "kv${b}_g32wkvqrot|+learned+rotation, groups of 32|FP|$b|--wbits 16 --kvbits $b ${WKV[*]} ${ROT[*]} ${G32[*]}"
  )
done
ROWS+=(
  "w4|W4 only (KV16)|W4|16|--kvbits 16 ${C[*]}"
  "w4lwc|W4 only, learned clipping (KV16)|W4|16|--kvbits 16 ${WKV[*]}"
  "w4kv4_rtn|RTN|W4|4|--no-poq --no-smooth"
  "w4kv4_poq|+POQ|W4|4|--no-smooth"
  "w4kv4_smooth|+smoothing|W4|4|${C[*]}"
  "w4kv4_rot|+rotation|W4|4|${C[*]} ${ROT[*]}"
  "w4kv4_wkvq|+learned (WKVQuant)|W4|4|${WKV[*]}"
  "w4kv4_wkvqrot|+learned+rotation|W4|4|${WKV[*]} ${ROT[*]}"
  "w4kv4_wkvqrot_wf|+learned+rotation, weights first|W4|4|${WKV[*]} ${ROT[*]} --calib-schedule weights-first"
  "w4kv4_g32wkvqrot|+learned+rotation, groups of 32|W4|4|${WKV[*]} ${ROT[*]} ${G32[*]}"
)
if [ -z "${KV_NO_PEER:-}" ]; then
  ROWS+=(
    "llama_f16|llama.cpp f16 (its default)|FP|16|llama:f16"
    "llama_q8_0|llama.cpp q8_0|FP|8.5|llama:q8_0"
    "llama_q4_0|llama.cpp q4_0 (rotated, its default)|FP|4.5|llama:q4_0"
    "llama_q4_0_norot|llama.cpp q4_0 unrotated|FP|4.5|llama:q4_0:norot"
  )
fi

# the model's cache geometry, for llama.cpp's bytes a token
read -r LAYERS KVW < <($WKVC inspect "$MODEL" --json |
  python3 -c 'import json,sys; c=json.load(sys.stdin)["config"]; print(c["num_layers"], c["num_kv_heads"] * c["head_dim"])')
F32=""
if [ -z "${KV_NO_PEER:-}" ]; then
  F32=$("$PEER" quantize "$MODEL" F32)
  [ -s "$F32" ] || { echo "llama-quantize wrote no F32 GGUF (is llama.cpp built? $PEER build)" >&2; exit 1; }
fi

RES="$OUT/kv-table.jsonl"
: >"$RES.new"
for row in "${ROWS[@]}"; do
  IFS='|' read -r key label weights bits args <<<"$row"
  if [ -n "${KV_ONLY:-}" ] && [[ " $KV_ONLY " != *" $key "* ]]; then
    continue
  fi
  echo "== $key: $label" >&2
  t0=$(date +%s.%N)
  kld=null
  case "$args" in
    llama:*)
      IFS=: read -r _ type norot <<<"$args"
      extra=()
      [ "$type" = f16 ] || extra=(-ctk "$type" -ctv "$type" -fa on)
      if [ -n "$norot" ]; then
        line=$(LLAMA_ATTN_ROT_DISABLE=1 THREADS=$T "$PEER" ppl "$F32" "$TEXT" --chunks "$N" "${extra[@]}")
      else
        line=$(THREADS=$T "$PEER" ppl "$F32" "$TEXT" --chunks "$N" "${extra[@]}")
      fi
      ppl=$(sed -n 's/.*PPL = \([0-9.]*\).*/\1/p' <<<"$line")
      [ -n "$ppl" ] || { echo "llama-perplexity printed no estimate: $line" >&2; exit 1; }
      per=$(case $type in f16) echo 2 ;; q8_0) echo "34/32" ;; q4_0) echo "18/32" ;; esac)
      kvb=$(python3 -c "print(int($LAYERS * 2 * $KVW * $per))")
      engine=llama ;;
    *)
      if [ "$args" = fp ]; then
        target=$MODEL; eng=()
      else
        target="$OUT/$key.wkv"
        # shellcheck disable=SC2086
        $WKVC compile "$MODEL" -o "$target" --threads "$T" --quality-check none $args \
          >"$OUT/$key.compile.log" 2>&1 || { tail -5 "$OUT/$key.compile.log" >&2; exit 1; }
        eng=(--engine cpu --cpu-act f32)
      fi
      k=()
      [ -z "${KV_KLD:-}" ] || k=(--kld-vs "$MODEL")
      ev=$($WKVC eval "$target" --ppl "$TEXT" --score llama --ctx 512 --windows "$N" --json \
        --threads "$T" "${eng[@]}" "${k[@]}")
      ppl=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["perplexity"])' "$ev")
      kld=$(python3 -c 'import json,sys; k=json.loads(sys.argv[1]).get("kld"); print("null" if k is None else k)' "$ev")
      if [ "$args" = fp ]; then
        kvb=$((LAYERS * 2 * KVW * 4))
      else
        kvb=$($WKVC inspect "$target" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["plan"]["memory"]["kv_bytes_per_token"])')
      fi
      engine=wkvc ;;
  esac
  secs=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
  python3 -c 'import json,sys; a=sys.argv; print(json.dumps({"key": a[1], "label": a[2], "weights": a[3], "kv_bits": a[4], "engine": a[5], "perplexity": float(a[6]), "kld": json.loads(a[7]), "kv_bytes_per_token": int(a[8]), "seconds": float(a[9])}))' \
    "$key" "$label" "$weights" "$bits" "$engine" "$ppl" "$kld" "$kvb" "$secs" | tee -a "$RES.new"
done
# rows not run this time (KV_ONLY) keep their last figures, in the table's order
python3 - "$RES" "$RES.new" "${ROWS[@]}" >"$RES.merged" <<'EOF'
import json, os, sys
old, new, order = sys.argv[1], sys.argv[2], [r.split("|")[0] for r in sys.argv[3:]]
rows = {}
if os.path.exists(old):
    rows.update((r["key"], r) for r in map(json.loads, open(old)))
rows.update((r["key"], r) for r in map(json.loads, open(new)))
for k in order + sorted(set(rows) - set(order)):
    if k in rows:
        print(json.dumps(rows.pop(k)))
EOF
mv "$RES.merged" "$RES"
rm -f "$RES.new"

python3 - "$RES" "$N" "$T" >"$OUT/kv-table.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
n, t = sys.argv[2:]
by = {r["key"]: r for r in rows}
fp = {"wkvc": by.get("fp"), "llama": by.get("llama_f16")}
print(f"KV cache quality, demo model, eval text, llama.cpp scoring (chunks of 512, second halves, "
      f"{n} chunks), {t} threads; gaps to each engine's own full-precision cache (ours: f32, "
      f"llama.cpp: f16); W4 rows: weights W4 group 128.\n")
print("| weights | KV | row | perplexity | gap to FP | KLD vs FP | KV bytes/token |")
print("|---|---|---|---:|---:|---:|---:|")
gap = {}
for r in rows:
    ref = fp[r["engine"]]
    g = ""
    if ref is not None and r is not ref:
        gap[r["key"]] = r["perplexity"] / ref["perplexity"] - 1
        g = f'{100 * gap[r["key"]]:+.2f}%'
    kld = "" if r.get("kld") is None else f'{r["kld"]:.4f}'
    kv = "16" if r["kv_bits"] == "16" else r["kv_bits"]
    print(f'| {r["weights"]} | {kv} | {r["label"]} | {r["perplexity"]:.4f} | {g} | {kld} | {r["kv_bytes_per_token"]} |')
print()
q4 = gap.get("llama_q4_0")
for k in ["kv4_rot", "kv4_wkvq", "kv4_wkvqrot", "kv4_g32rot", "kv4_g32wkvqrot"]:
    if k in gap and q4:
        print(f"- {by[k]['label']} KV4: gap {100 * gap[k]:.2f}% (target <= 1.9%), "
              f"{gap[k] / q4:.2f}x llama.cpp q4_0's {100 * q4:.2f}% (target <= 0.5x)")
for k in ["kv3_rot", "kv3_wkvq", "kv3_wkvqrot", "kv3_g32rot", "kv3_g32wkvqrot"]:
    if k in gap and q4:
        print(f"- {by[k]['label']} KV3: gap {100 * gap[k]:.2f}% vs llama.cpp q4_0 {100 * q4:.2f}% "
              f"(target: below)")
for k in ["w4kv4_wkvq", "w4kv4_wkvqrot", "w4kv4_wkvqrot_wf", "w4kv4_g32wkvqrot"]:
    for w in ["w4lwc", "w4"]:
        if k in gap and w in gap and gap[w] > 0:
            print(f"- W4KV4 {by[k]['label']}: gap {100 * gap[k]:.2f}% = {gap[k] / gap[w]:.2f}x "
                  f"the {by[w]['label']} gap {100 * gap[w]:.2f}% (target <= 1.1x)")
EOF
cat "$OUT/kv-table.md"
