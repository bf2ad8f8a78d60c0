#!/usr/bin/env bash
# The GPU job of the fast-decode work, as one short run (about 10 minutes on one H100/H200; CI has no GPU):
# correctness of every attention backend and of the compiled static cache on CUDA, then decode speed in bf16 with
# CUDA graphs (the compiled static cache) against Qwen2.5-VL insertion and the text LLM, at Qwen2.5-0.5B's shape and
# at Helium-1 2B's (the paper's CASA-Helium1-VL-2B decodes at 59 tok/s). Each step has its own time limit, so a slow
# one leaves the others' results (a step cut short writes nothing). Outputs go to $OUT (default results/).
#
#     bash scripts/gpu_decode.sh
#     DEVICE=cpu SIZES=tiny OUT=/tmp/dry bash scripts/gpu_decode.sh     # a dry run of the same steps on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-results}
SIZES=${SIZES:-"base:151936 helium2b:48000"}  # size:vocabulary, the real models' vocabularies
DTYPE=bfloat16
[ "$DEVICE" = cpu ] && DTYPE=float32
mkdir -p "$OUT"
status=0
timeout 240 python scripts/check_cuda.py --out "$OUT/cuda_check_$DEVICE.json" || status=1
for entry in $SIZES; do
    size=${entry%%:*}
    vocab=${entry#*:}
    [ "$vocab" = "$entry" ] && vocab=1024
    timeout 200 python benchmarks/bench_decode.py --device "$DEVICE" --dtype "$DTYPE" --size "$size" \
        --vocab "$vocab" --images "" --generate-images 1 --caches dynamic,static,compiled --new-tokens 33 \
        --repeats 3 --out "$OUT/decode_${DEVICE}_$size" || status=1
done
exit $status
