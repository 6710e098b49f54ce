#!/usr/bin/env bash
# dev/ncu_lines.sh - where a kernel's warps wait, instruction by instruction: one launch of each kernel
# named in KERNELS under Nsight Compute's warp-state sampling (SourceCounters, WarpStateStats), then the
# SASS instructions with the most stall samples and their stall reasons (dev/ncu_lines_top.py). By
# default the kernels are decode's, in infer_gpu (a checkpoint of PRESET, default small, is made first);
# with CMD set, those of that command, e.g. the training attention kernels:
#   KERNELS="attention_backward_kv_kernel attention_forward_kernel" SKIP=24 CMD="./dev/bench_attention 3b 2 4096" bash dev/ncu_lines.sh
# (SKIP launches of the kernel go by first: in bench_attention each kernel runs 21 times in TF32, then in
# bf16, so 24 lands on a bf16 launch.)
# ncu's default sampling period leaves a 20 us kernel with about 100 samples (H100, 2026-11-23): enough
# for the FFN kernels, too few for the pre-stage. Writes $OUT/lines_<kernel>.txt (OUT defaults to
# runs/ncu_lines). Needs `make gpu` done, the default corpus; a GPU.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/ncu_lines}
KERNELS=${KERNELS:-"mhc_coeffs_pre_forward_kernel mla_decode_attention_kernel ffn_decode_up_kernel ffn_decode_down_kernel matvec_kernel"}
mkdir -p "$OUT" runs/ncu_lines_scratch
ncu --version | tail -n 1
CK=runs/ncu_lines_scratch/ckpt
if [ -z "${CMD:-}" ]; then
    [ -f $CK/model.safetensors ] || ./train_gpu --preset "${PRESET:-small}" --batch 1 --seq-len 256 --steps 1 --eval-every 1 \
        --eval-batches 1 --out $CK >/dev/null 2>&1 || { echo "ncu_lines: no checkpoint"; exit 1; }
    CMD="./infer_gpu $CK/model.safetensors --prompt The --max-tokens 16 --temperature 0 --graph 0"
fi
for k in $KERNELS; do
    rep=runs/ncu_lines_scratch/$k
    ncu -f -k "regex:$k" --launch-skip "${SKIP:-40}" -c 1 --section SourceCounters --section WarpStateStats \
        --section SpeedOfLight -o "$rep" $CMD >"$rep.log" 2>&1
    [ -f "$rep.ncu-rep" ] || { tail -8 "$rep.log"; continue; }
    { ncu -i "$rep.ncu-rep" --page details --print-units base 2>&1 | grep -E "Duration|Warp Cycles Per Issued|Stall|Elapsed Cycles|Registers" | head -12
      ncu -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.csv" 2>"$rep.err" || cat "$rep.err"
      python3 dev/ncu_lines_top.py "$rep.csv" "${TOP:-25}"
    } >"$OUT/lines_$k.txt" 2>&1
    head -4 "$OUT/lines_$k.txt"
done
