#!/usr/bin/env bash
# Compile cache: load + optimize time without the cache, with a cold cache (it
# saves the graph and the packed weights), then two warm starts (they map the
# packed weights), one thread, one process each, for the bench models of
# tools/make_bench_models.py. Prints one line per start; docs/benchmarks.md has
# the table.
#
#   cargo build --release && tools/bench_compile_cache.sh /tmp/bench-models
set -euo pipefail
models=${1:?"usage: tools/bench_compile_cache.sh BENCH_MODELS_DIR"}
cd "$(dirname "$0")/.."
edgegen=target/release/edgegen
caches=$(mktemp -d)
trap 'rm -rf "$caches"' EXIT

starts() { # label model input...
    local label=$1 model=$2
    shift 2
    local inputs=()
    for input in "$@"; do inputs+=(--input "$input"); done
    for start in off cold warm warm; do
        local cache=()
        [[ $start == off ]] || cache=(--cache-dir "$caches/$label")
        "$edgegen" bench --onnx "$models/$model/model.onnx" "${inputs[@]}" --threads 1 --runs 1 \
            "${cache[@]}" --json 2>/dev/null | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(sys.argv[1], sys.argv[2], "load", round(r["load_ms"]), "optimize", round(r["optimize_ms"]),
      "sum", round(r["load_ms"] + r["optimize_ms"]), "run", round(r["median_ms"]),
      "peak_MB", round(r["peak_rss_bytes"] / 2**20))' "$label" "$start"
    done
    du -sh "$caches/$label" | sed "s|^|$label cache entry |"
}

starts unet512 bk-sdm-tiny-unet sample=1x4x64x64 timestep=scalar encoder_hidden_states=1x77x768
starts unet256 bk-sdm-tiny-unet sample=1x4x32x32 timestep=scalar encoder_hidden_states=1x77x768
starts clip clip-vit-l14-text input_ids=1x77:i32:49408
starts vae512 sd-vae-decoder latent_sample=1x4x64x64
starts taesd512 taesd-decoder latent_sample=1x4x64x64
