#!/usr/bin/env bash
# GPU checks of the CUDA back end, for a machine with an NVIDIA GPU (about 3-6 minutes):
#   1. the CUDA engine against the interpreter on tiny models of every configuration
#      (16/4/3-bit caches, smoothing, past-only or not, both protocols, graph-replayed steps);
#   2. a model of the demo model's shapes (the demo model when WKVC_DEMO_MODEL is set, else
#      random weights of its architecture): CUDA logits against the interpreter's (W4 KV16,
#      W4KV4 and W4KV4 with a recent window of 8, replaying the engine's cache), and the
#      int4 GEMV bandwidth on 4096 x 11008 against the device's copy bandwidth;
#   3. `wkvc bench --engine cuda` on that model's W4KV4 plan: prefill 512, decode 128, decode
#      at 2048 tokens of context.
# Writes $OUT/gpu-check.json (OUT defaults to ./gpu-check-out) with every figure, beside the
# two test logs and nvidia-smi's output (intermediate files go to a temporary folder).
#
#   scripts/gpu-check.sh bundle   # here (any x86-64 machine with cargo): release binaries into
#                                 # gpu-bundle/ for a GPU machine without a Rust toolchain
#   scripts/gpu-check.sh          # on the GPU machine (builds itself when cargo is there)
#
# NVRTC: WKVC_NVRTC_LIB, else libnvrtc.so.13/.so.12 from the CUDA toolkit or the pip wheels
# nvidia-cuda-nvrtc(-cu12) found through python3.
set -euo pipefail
cd "$(dirname "$0")/.."
B=gpu-bundle

build() {
  cargo build --release -p wkvc
  cargo test --release -p wkvc-tests --test gpu --test lower_cpu --no-run 2>&1 |
    sed -n 's/.*Executable tests\/\(gpu\|lower_cpu\)\.rs (\(.*\))/\1 \2/p' > /tmp/wkvc-gpu-tests
  rm -rf "$B"; mkdir -p "$B"
  cp target/release/wkvc "$B/"
  while read -r name path; do cp "$path" "$B/$name"; done < /tmp/wkvc-gpu-tests
  strip "$B"/* 2>/dev/null || true
  ls -la "$B"
}

if [ "${1:-}" = bundle ]; then build; exit 0; fi

T0=$(date +%s)
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if command -v cargo >/dev/null 2>&1; then build; fi
[ -x "$B/wkvc" ] && [ -x "$B/gpu" ] && [ -x "$B/lower_cpu" ] ||
  { echo "error: no $B/ binaries: run 'scripts/gpu-check.sh bundle' on a machine with cargo" >&2; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" > "$OUT/nvidia-smi.txt"

if [ -z "${WKVC_NVRTC_LIB:-}" ]; then
  for c in /usr/local/cuda/lib64/libnvrtc.so.13 /usr/local/cuda/lib64/libnvrtc.so.12 \
           $(python3 - 2>/dev/null <<'PY'
import importlib, os
for mod, sub in (("nvidia.cu13", "lib/libnvrtc.so.13"), ("nvidia.cuda_nvrtc", "lib/libnvrtc.so.12")):
    try:
        m = importlib.import_module(mod)
        for p in m.__path__:
            print(os.path.join(p, sub))
    except Exception:
        pass
PY
           ); do
    if [ -f "$c" ]; then export WKVC_NVRTC_LIB=$c; break; fi
  done
fi
echo "NVRTC: ${WKVC_NVRTC_LIB:-WKVC_NVRTC_LIB unset (wkvc searches its cache and the CUDA paths)}" | tee "$WORK/nvrtc.txt"
export WKVC_REQUIRE_GPU=1 WKVC_REQUIRE_NVRTC=1 WKVC_GPU_REPORT_DIR=$WORK RUST_BACKTRACE=1

set +e
"$B/lower_cpu" --test-threads 1 cuda_engine_is_a_clean_error 2>&1 | tee "$OUT/tiny.log"; tiny=${PIPESTATUS[0]}
"$B/gpu" --test-threads 1 2>&1 | tee "$OUT/demo.log"; demo=${PIPESTATUS[0]}
bench=1
if [ -f "$WORK/demo-shaped.gguf" ] || [ -n "${WKVC_DEMO_MODEL:-}" ]; then
  M=${WKVC_DEMO_MODEL:-$WORK/demo-shaped.gguf}
  "$B/wkvc" compile "$M" -o "$WORK/w4kv4.wkv" --calib-tokens 64 --threads 8 2>&1 | tail -3 &&
  "$B/wkvc" bench "$WORK/w4kv4.wkv" --engine cuda --runs 3 --json > "$WORK/bench.json"
  bench=$?
fi
set -e
python3 - "$WORK" "$OUT" "$tiny" "$demo" "$bench" "$(( $(date +%s) - T0 ))" <<'PY'
import json, os, sys
work, out = sys.argv[1], sys.argv[2]
tiny, demo, bench, secs = (int(a) for a in sys.argv[3:7])
def load(n):
    p = os.path.join(work, n)
    try:
        return json.load(open(p))
    except Exception:
        return None
b = load("bench.json")
bw = load("qgemv_bandwidth.json")
r = {
    "tiny_models_pass": tiny == 0,
    "demo_shapes_pass": demo == 0,
    "bench_ok": bench == 0,
    "seconds": secs,
    "logits_kv16": load("logits_kv16.json"),
    "logits_kv4": load("logits_kv4.json"),
    "logits_kv4_window8": load("logits_kv4_window8.json"),
    "logits_kv16_mma_prefill": load("logits_kv16_mma_prefill.json"),
    "qgemv_bandwidth": bw,
    "bench": b,
    "nvrtc": open(os.path.join(work, "nvrtc.txt")).read().strip(),
}
if bw:
    r["qgemv_target_70pct_of_copy"] = bw["ratio"] >= 0.7
if b:
    d, l = b.get("decode_from_empty_tokens_per_s"), b.get("decode_at_long_ctx_tokens_per_s")
    r["decode_target_1000_tok_s"] = bool(d and d >= 1000)
    r["long_ctx_keeps_80pct"] = bool(d and l and l >= 0.8 * d)
json.dump(r, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
print(json.dumps(r, indent=1))
PY
[ "$tiny" = 0 ] && [ "$demo" = 0 ] && [ "$bench" = 0 ]
