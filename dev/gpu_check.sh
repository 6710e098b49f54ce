#!/usr/bin/env bash
# dev/gpu_check.sh - the checks one call on the GPU machine should make, logs under $OUT (default
# runs/gpu_check): `make gpu`, the GPU test group, the mHC kernels' bandwidth (dev/bench_mhc) and the
# training attention kernels' FLOP rates (dev/bench_attention, also with MHC_ATT_MIN_BLOCKS=2), and where
# a training step's time goes (dev/profile.sh) for small and the 3b preset cut to 4 layers, where small's
# batch-1 decode time goes (with overlapped launches and without: MHC_OVERLAPPED_LAUNCH), and what limits
# the mHC kernels (with NCU=1: ncu sections; the full report in ncu_mhc.txt). About 3 minutes on an H100
# (2026-11-23); the full benchmark table is dev/bench.sh. Needs the default corpus. At most eight files
# under $OUT, the most one device call brings back.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
nvidia-smi -L
make -j8 gpu >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
./tests_gpu gpu >"$OUT/tests_gpu.log" 2>&1
grep FAIL "$OUT/tests_gpu.log"
tail -n 1 "$OUT/tests_gpu.log"
{ timeout 120 ./dev/bench_mhc; echo; timeout 120 ./dev/bench_attention; } >"$OUT/bench_kernels.md" 2>&1
# the attention kernels again with two blocks per SM asked of ptxas (MHC_ATT_MIN_BLOCKS=2: 128 registers)
nvcc -O3 -arch=sm_90 -std=c++17 -x cu --default-stream per-thread -Xcompiler -fopenmp -DMHC_ATT_MIN_BLOCKS=2 -I. \
    dev/bench_attention.c -o runs/bench_attention_mb2 -lcublas >>"$OUT/build.log" 2>&1 \
    && { echo; echo "MHC_ATT_MIN_BLOCKS=2:"; timeout 120 ./runs/bench_attention_mb2; } >>"$OUT/bench_kernels.md" 2>&1 \
    || echo "gpu_check: the MHC_ATT_MIN_BLOCKS=2 build failed"
cat "$OUT/bench_kernels.md"
# step times without the profiler, to set the kernel sums against; recompute's cost and memory
for run in "mhc" "plain" "mhc --recompute"; do
    echo "== $run" | tee -a "$OUT/train_small.log"
    ./train_gpu --preset small --batch 32 --seq-len 1024 --residual $run --steps 8 --bench --out runs/gpu_check \
        >"$OUT/train.log" 2>&1
    grep -E "^step +[5-8]|^gpu memory" "$OUT/train.log" | tail -4 | tee -a "$OUT/train_small.log"
done
rm -f "$OUT/train.log"
NAME=profile_small timeout 200 bash dev/profile.sh --preset small --batch 32 --seq-len 1024 | head -18
NAME=profile_3b timeout 200 bash dev/profile.sh --preset 3b --set n_layers=4 --batch 2 --seq-len 4096 | head -18
# decode of small at batch 1: its time per token, then its kernels per token (is it kernels or launches?)
./train_gpu --preset small --batch 1 --seq-len 256 --steps 1 --eval-every 1 --eval-batches 1 --out runs/gpu_check_ckpt \
    >/dev/null 2>&1 || echo "gpu_check: the decode checkpoint failed"
for graph in 1 0; do                   # each token one CUDA graph, then kernel by kernel
    ./infer_gpu runs/gpu_check_ckpt/model.safetensors --prompt "The state of the Union" --max-tokens 64 --temperature 0 \
        --graph $graph 2>&1 >/dev/null | tail -n 1
done
# the same with plain launches (MHC_OVERLAPPED_LAUNCH=0), twice each way, to tell what overlapped launches give
nvcc -O3 -arch=sm_90 -std=c++17 -x cu --default-stream per-thread -Xcompiler -fopenmp -DMHC_OVERLAPPED_LAUNCH=0 infer.c \
    -o runs/infer_gpu_plain -lcublas >>"$OUT/build.log" 2>&1 || echo "gpu_check: the plain-launch build failed"
for bin in ./runs/infer_gpu_plain ./infer_gpu ./runs/infer_gpu_plain ./infer_gpu; do
    for graph in 1 0; do
        printf '%s --graph %s: ' "$bin" "$graph"
        $bin runs/gpu_check_ckpt/model.safetensors --prompt "The state of the Union" --max-tokens 256 --temperature 0 \
            --graph $graph 2>&1 >/dev/null | tail -n 1
    done
done
# sampled (--temperature 0.8, top-k 40 on the GPU), then a step's parts: logits to the host, greedy, sampled
./infer_gpu runs/gpu_check_ckpt/model.safetensors --prompt "The state of the Union" --max-tokens 64 2>&1 >/dev/null | tail -n 1
timeout 120 ./dev/bench_decode small
NAME=profile_decode timeout 200 bash dev/profile.sh --infer runs/gpu_check_ckpt/model.safetensors \
    --prompt "The state of the Union" | head -24
# what limits the mHC kernels (NCU=1): one launch of each under Nsight Compute's throughput, occupancy and stall sections
[ "${NCU:-0}" = 1 ] || exit 0
for k in mhc_coeffs_pre_forward_kernel mhc_coeffs_pre_backward_kernel sinkhorn_backward_kernel stream_merge_backward_kernel; do
    timeout 120 ncu -k "$k" -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis ./dev/bench_mhc >"$OUT/ncu.txt" 2>&1
    cat "$OUT/ncu.txt" >>"$OUT/ncu_mhc.txt"
    grep -E "Duration|Throughput|Achieved Occupancy|Theoretical Occupancy|Block Limit|Registers Per|Warp Cycles|Issued Warp|No Eligible|L1/TEX Hit|L2 Hit" \
        "$OUT/ncu.txt" | head -18
done
rm -f "$OUT/ncu.txt"
