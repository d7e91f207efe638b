#!/usr/bin/env bash
# A LLaMA-architecture GGUF with random F16 weights of given shapes, for speed and memory
# measurements (default: Llama-3.2-1B's shapes, SmolLM2's vocabulary size; 2.1 GB), or with
# --hf-shards N a Hugging Face folder of N bf16 safetensors shards:
#
#   scripts/make-random-model.sh -o OUT.gguf [--hidden 2048] [--layers 16] [--heads 32]
#       [--kv-heads 8] [--ffn 8192] [--vocab 49152] [--ctx 4096] [--seed 1] [--untied]
#       [--hf-shards N]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release -q --manifest-path "$ROOT/Cargo.toml" -p wkvc-tests --bin make-random-model
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/make-random-model" "$@"
