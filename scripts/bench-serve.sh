#!/usr/bin/env bash
# Serving benchmark (not a test): aggregate generated tokens/s and the time to the first
# token (p50, p99) at 1, 4 and 16 concurrent clients, for `wkvc serve` on the demo model's
# W4KV4 plan and, side by side in the same run, llama.cpp's `llama-server` on the same model
# requantized to Q4_0 with its default f16 KV cache (`-np` equal to our `--parallel`), both
# on 2 threads. Each client sends REQUESTS streamed completions one after another, MAX_TOKENS
# tokens each (end-of-generation ignored, so both servers generate the same lengths), greedy
# or at TEMPERATURE (each server's own sampler).
#
#   scripts/bench-serve.sh [CLIENTS (1,4,16)] [REQUESTS per client (4)] [MAX_TOKENS (64)] [TEMPERATURE (0)]
#
# llama-server comes from ../shared/tools/peer-llamacpp.sh (built there once, never into the
# repository); without it only wkvc is measured. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-1,4,16}
PER=${2:-4}
MAXT=${3:-64}
TEMP=${4:-0}
PAR=16
CTX=512
MODEL=$(scripts/fetch-demo-model.sh)
cargo build --release -q -p wkvc
OUT=target/bench-serve
mkdir -p "$OUT"
PLAN="$OUT/demo-w4kv4.wkv"
[ -s "$PLAN" ] || target/release/wkvc compile "$MODEL" -o "$PLAN" --calib-tokens 1024 --threads 2 >/dev/null
VENV=${WKVC_CACHE:-$HOME/.cache/wkvc}/venv-openai
if ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
  python3 -m venv "$VENV" && "$VENV/bin/python" -m pip install -q "openai==3.57.0"
fi
PY="$VENV/bin/python"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_ready() {
  for _ in $(seq 600); do
    curl -sf "$1/health" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "error: $1 did not become ready" >&2
  return 1
}
target/release/wkvc serve "$PLAN" --port 8181 --parallel $PAR --ctx $CTX --threads 2 --queue 256 2>"$OUT/wkvc.log" &
pids+=($!)
WK=http://127.0.0.1:8181
PEER=../shared/tools/peer-llamacpp.sh
LL=
if [ -x "$PEER" ] || [ -f "$PEER" ]; then
  bash "$PEER" build >/dev/null 2>&1
  Q4=$(bash "$PEER" q4_0 "$MODEL")
  bash "$PEER" serve "$Q4" --port 8182 -np $PAR -c $((PAR * CTX)) >"$OUT/llama.log" 2>&1 &
  pids+=($!)
  LL=http://127.0.0.1:8182
else
  echo "(no ../shared/tools/peer-llamacpp.sh: measuring wkvc only)" >&2
fi
wait_ready $WK
[ -n "$LL" ] && wait_ready $LL
echo "| clients | server | aggregate tokens/s | TTFT p50 (s) | TTFT p99 (s) |"
echo "|---:|---|---:|---:|---:|"
IFS=, read -ra CS <<<"$CLIENTS"
for c in "${CS[@]}"; do
  # alternate the servers per client count (this machine's speed drifts)
  for s in wkvc llama; do
    url=$WK; name="wkvc serve (W4KV4, int8 act.)"
    if [ "$s" = llama ]; then
      [ -n "$LL" ] || continue
      url=$LL; name="llama-server (Q4_0, f16 KV)"
    fi
    r=$("$PY" scripts/bench_serve.py "$url" "$c" "$PER" "$MAXT" "$TEMP")
    echo "$r" >>"$OUT/results.jsonl"
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("| %d | %s | %.1f | %.3f | %.3f |" % (r["clients"], sys.argv[2], r["aggregate_tokens_per_s"], r["ttft_p50_s"], r["ttft_p99_s"]))' "$r" "$name"
  done
done
