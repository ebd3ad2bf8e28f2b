#!/usr/bin/env bash
# The one short GPU run of the fast-training issue: `bench speed` on DiT-S/2 (B=4, batch 128), the training loop's
# step against the bare step, with the data resident on the device and on the host; then the language trunk's bare
# step and cached generation before and after issue 26 (benchmarks/trunk_speed.py). Every step is under a timeout
# and writes into $OUT as it goes (the device tool copies $OUT back).
#   OUT=/tmp/speed bash benchmarks/gpu_speed.sh                       # on a GPU machine, from the repository root
#   OUT=/tmp/speed MODEL=tiny BATCH=8 DEVICE=cpu PRECISIONS=fp32 COMPILE=off bash benchmarks/gpu_speed.sh  # a dry run
set -u
OUT=${OUT:-runs/gpu-speed}
MODEL=${MODEL:-dit-s2}
BATCH=${BATCH:-128}
DEVICE=${DEVICE:-cuda}
PRECISIONS=${PRECISIONS:-fp32,tf32,bf16}
COMPILE=${COMPILE:-off,on}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
(nvidia-smi 2>&1 || true; python -c "import torch; print(torch.__version__)") > "$OUT/machine.txt"
bench() {  # name, timeout in seconds, then the arguments
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python -m diffusionblocks bench speed --model "$MODEL" --batch "$BATCH" --num-blocks 4 \
        --device "$DEVICE" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $?" >> "$OUT/status.txt"
}
bench resident 300 --precisions "$PRECISIONS" --compile "$COMPILE" train.data_on_device=on
bench host 150 --precisions bf16 --compile off train.data_on_device=off
timeout 240 python benchmarks/trunk_speed.py --device "$DEVICE" --repeats 9 --steps 5 --generate \
    --json "$OUT/trunk-speed.json" > "$OUT/trunk-speed.log" 2>&1
echo "trunk-speed: exit $?" >> "$OUT/status.txt"
cat "$OUT"/*/speed.md 2>/dev/null
