#!/usr/bin/env bash
# dev/gpu_check.sh - everything one GPU session checks and times, in one call that fits the lease (15
# minutes of device time a session, the machine's start included; 10 minutes a command). In order of
# what matters most, each step under a time limit, so that what did not fit is the least important:
#   1. the GPU test group (./tests_gpu gpu): every kernel against the CPU reference;
#   2. train_gpu against its build of commit BASE (below) on small and the 3b cut in bf16, and with
#      --expert-wgmma, --attention-wgmma: the losses, which should agree to about 4 decimals, and the step
#      times;
#   3. which shared-memory layouts wgmma reads as a kernel of ours would lay them out (dev/wgmma_probe, a
#      second), and compute-sanitizer's synccheck on it and racecheck on one bf16 step of tiny with the wgmma
#      expert and attention kernels; the training attention kernels one by one (dev/bench_attention), as built and with
#      MHC_ATT_MIN_BLOCKS=2 (two blocks per SM asked of ptxas), and the routed-expert GEMMs, ours and
#      cuBLAS's (bench_expert), with the wgmma kernel's rows again for one batch of products in flight
#      (MHC_EXPERT_WGMMA_INFLIGHT=1, over 3 and 4 stages);
#   4. the benchmark table (dev/bench.sh: ours against PyTorch, mHC overhead, the 3b cut with 8 micro-batches
#      a step (ACCUM=8), decode against its bound, the mHC stream kernels), with what time is left but the
#      last two steps' share;
#   5. decode of small at batch 1 with overlapped launches and without (MHC_OVERLAPPED_LAUNCH=0);
#   6. where a bf16 training step of the 3b cut spends its kernel time (dev/profile.sh under ncu).
#
#   bash dev/gpu_check.sh --pack   here, without a GPU: builds the GPU binaries and the variants into
#                                  runs/gpu_carry/ (about 4 minutes on 2 cores), so the GPU machine
#                                  spends none of its time compiling
#   bash dev/gpu_check.sh          on the GPU machine; device call:
#       carry: runs/gpu_carry data/sotu_train.bin data/sotu_val.bin data/gpt2.tok;  timeout_s 600
#
# The packed binaries are used when their stamp (a checksum of the sources they were built from) matches
# the tree and they start there; else everything is built on the GPU machine (make -j16). BUDGET_S
# (default 560) is the whole run. At most eight files under $OUT (default runs/gpu_check), the most one
# device call brings back: summary.txt (each step's status and time, also printed last), build.log,
# (only where it built) tests_gpu.log, ab.md (steps 2 and 5), kernels.md, bench.md, bench_logs.tar.gz,
# profile_3b_bf16.md.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:/usr/local/cuda/bin"
CARRY=runs/gpu_carry
SOURCES=(Makefile mhc.h mhc_cuda.cuh train.c infer.c tests.c data/tokenizer.h dev/bench_mhc.c dev/bench_decode.c
         dev/bench_attention.c dev/bench_expert.c dev/bench_util.cuh dev/wgmma_probe.cu)
BINARIES=(train_gpu infer_gpu tests_gpu dev/bench_mhc dev/bench_decode dev/bench_attention dev/bench_expert dev/wgmma_probe)
NVCC_ONE=(nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -std=c++17 -x cu --default-stream per-thread -Xcompiler -fopenmp -I.)

stamp() { sha256sum "${SOURCES[@]}" | sha256sum | cut -c1-16; }

# --build JOBS: the binaries of `make gpu` and the variants the steps compare (attention with two blocks
# per SM, the expert wgmma kernel with one batch of products in flight over 3 and 4 stages, decode with
# plain launches, and train_gpu as of commit BASE), all at once. BASE is the commit
# before the routed-expert GEMMs' cp.async pipeline and the one-pass mHC pre-stage backward, the changes
# step 2 measures together (bench_expert and bench_mhc time each alone); its tree comes from git.
BASE=${BASE:-c627ff5}
if [ "${1:-}" = --build ]; then
    mkdir -p runs/variants
    make -j"${2:-2}" gpu &
    "${NVCC_ONE[@]}" -DMHC_ATT_MIN_BLOCKS=2 dev/bench_attention.c -o runs/variants/bench_attention_mb2 -lcublas &
    "${NVCC_ONE[@]}" -DMHC_OVERLAPPED_LAUNCH=0 infer.c -o runs/variants/infer_gpu_plain -lcublas &
    for stages in 3 4; do
        "${NVCC_ONE[@]}" -DMHC_EXPERT_WGMMA_INFLIGHT=1 -DMHC_EXPERT_WGMMA_STAGES=$stages dev/bench_expert.c \
            -o runs/variants/bench_expert_inflight_s$stages -lcublas &
    done
    jobs=5
    rm -rf runs/base_src
    if mkdir -p runs/base_src && git archive "$BASE" | tar -x -C runs/base_src; then
        (cd runs/base_src && "${NVCC_ONE[@]}" train.c -o ../variants/train_gpu_base -lcublas) &
        jobs=6
    else
        echo "gpu_check --build: no tree of commit $BASE (git); no base build" >&2
    fi
    failed=0
    for job in $(seq $jobs); do wait -n || failed=1; done
    exit $failed
fi

if [ "${1:-}" = --pack ]; then
    rm -rf "$CARRY"
    mkdir -p "$CARRY"
    bash "$0" --build 2 || { echo "gpu_check --pack: the build failed" >&2; exit 1; }
    tar czf "$CARRY/bin.tar.gz" "${BINARIES[@]}" runs/variants
    stamp >"$CARRY/stamp"
    echo "packed $(du -h "$CARRY/bin.tar.gz" | cut -f1) of binaries, stamp $(cat "$CARRY/stamp"); carry: $CARRY" \
         "data/sotu_train.bin data/sotu_val.bin data/gpt2.tok"
    exit 0
fi

export OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
T0=$(date +%s)
DEADLINE=$((T0 + ${BUDGET_S:-560}))
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
exec 3>&1                                   # the notes go to the call's output whatever a step's output is
note() { printf '[%4ss] %s\n' "$(($(date +%s) - T0))" "$*" | tee -a "$SUMMARY" >&3; }
left() { echo $((DEADLINE - $(date +%s))); }

# step NAME CAP RESERVE CMD...: CMD under a timeout of CAP seconds, or less so that RESERVE seconds stay for
# the steps after it; skipped when under 20 seconds would be left for it
step() {
    local name=$1 cap=$2 reserve=$3 limit rc t
    shift 3
    limit=$(($(left) - reserve))
    [ "$limit" -lt "$cap" ] || limit=$cap
    if [ "$limit" -lt 20 ]; then note "$name: skipped ($(left) s left)"; return 1; fi
    t=$(date +%s)
    timeout -k 5 "$limit" "$@"
    rc=$?
    note "$name: exit $rc in $(($(date +%s) - t)) s (limit $limit s)"
    return $rc
}

note "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
note "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' + local changes')"

# ---- 0. binaries: the packed ones where they match the tree and start, else built here --------------
packed=0
if [ -f "$CARRY/bin.tar.gz" ] && [ "$(cat "$CARRY/stamp" 2>/dev/null)" = "$(stamp)" ]; then
    tar xzf "$CARRY/bin.tar.gz" && ./train_gpu --help >/dev/null 2>runs/gpu_check_probe.log && packed=1
    [ "$packed" = 1 ] && note "binaries: packed ones (stamp $(stamp))" ||
        note "binaries: the packed ones do not start here: $(tail -n 1 runs/gpu_check_probe.log)"
elif [ -f "$CARRY/bin.tar.gz" ]; then
    note "binaries: the packed ones are of other sources (stamp $(cat "$CARRY/stamp" 2>/dev/null), tree $(stamp))"
fi
if [ "$packed" = 0 ]; then
    step build 300 200 bash "$0" --build 16 >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
fi

# ---- 1. the GPU tests -------------------------------------------------------------------------
step tests_gpu 150 200 ./tests_gpu gpu >"$OUT/tests_gpu.log" 2>&1
note "tests_gpu: $(tail -n 1 "$OUT/tests_gpu.log")"
grep FAIL "$OUT/tests_gpu.log" | head -20 | tee -a "$SUMMARY"

# ---- 2. train_gpu against its build of commit BASE: about the same losses, and the step times ------
# ab_run BIN PRESET FLAGS...: one line of 12 steps: median tokens/s of steps 5-12, the last step's loss
ab_run() {
    local bin=$1 preset=$2 dir=runs/gpu_check_ab
    shift 2
    rm -rf $dir
    if ! timeout 60 "$bin" --preset "$preset" "$@" --steps 12 --bench --out $dir >$dir.log 2>&1; then
        echo "| $bin | $preset $* | failed: $(tail -n 1 $dir.log) |"
        return
    fi
    local median loss
    median=$(awk -F, 'NR > 5 { print $NF }' $dir/log.csv | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
    loss=$(tail -n 1 $dir/log.csv | cut -d, -f2)
    echo "| $bin | $preset $* | $median tokens/s | loss $loss |"
}
: >"$OUT/ab.md"
if [ -x runs/variants/train_gpu_base ]; then
    {
        echo "train_gpu now and as of commit $BASE (12 steps; median tokens/s of steps 5-12; the losses should agree"
        echo "to about 4 decimals: the expert GEMMs compute the same sums, the mHC pre-stage backward in another order)"
        echo
        for run in "small --batch 32 --seq-len 1024 --precision bf16" "3b --set n_layers=4 --batch 2 --seq-len 4096 --precision bf16"; do
            [ "$(left)" -gt 200 ] || { echo "(skipped: $(left) s left)"; break; }
            ab_run runs/variants/train_gpu_base $run
            ab_run ./train_gpu $run
            ab_run ./train_gpu $run --expert-wgmma
            ab_run ./train_gpu $run --attention-wgmma
        done
    } >"$OUT/ab.md" 2>&1
    note "train_gpu against commit $BASE: done"
    cat "$OUT/ab.md"
fi

# ---- 3. the training attention and routed-expert kernels one by one ------------------------------
{
    step wgmma_probe 20 190 ./dev/wgmma_probe
    echo
    echo "compute-sanitizer (what the emulation cannot see: barriers, shared-memory races), the last lines:"
    step synccheck_probe 20 185 bash -o pipefail -c 'compute-sanitizer --tool synccheck --error-exitcode 9 ./dev/wgmma_probe 2>&1 | tail -n 4'
    step racecheck_tiny 45 180 bash -o pipefail -c 'compute-sanitizer --tool racecheck --error-exitcode 9 ./train_gpu --preset tiny \
        --steps 1 --precision bf16 --expert-wgmma --attention-wgmma --out runs/gpu_check_race 2>&1 | tail -n 8'
    echo
    step bench_attention 45 180 ./dev/bench_attention
    echo
    echo "MHC_ATT_MIN_BLOCKS=2:"
    step bench_attention_mb2 45 150 ./runs/variants/bench_attention_mb2
    echo
    step bench_expert 45 150 ./dev/bench_expert
    echo
    echo "the wgmma kernel with one batch of products in flight (MHC_EXPERT_WGMMA_INFLIGHT=1), 3 and 4 stages:"
    step bench_expert_inflight_s3 25 140 ./runs/variants/bench_expert_inflight_s3 --wgmma-only
    step bench_expert_inflight_s4 25 135 ./runs/variants/bench_expert_inflight_s4 --wgmma-only
} >"$OUT/kernels.md" 2>&1
cat "$OUT/kernels.md"

# ---- 4. the benchmark table ---------------------------------------------------------------------
BENCH_OUT=runs/gpu_check_bench
rm -rf "$BENCH_OUT"
mkdir -p "$BENCH_OUT"
step bench 480 110 env OUT="$BENCH_OUT" PREBUILT=1 STEPS=14 SKIP=4 TORCH_STEPS=8 MODES=plain ACCUM=8 \
    BUDGET_S=$(($(left) - 115)) bash dev/bench.sh >/dev/null 2>"$BENCH_OUT/progress.txt" ||
    tail -n 5 "$BENCH_OUT/progress.txt"
cp "$BENCH_OUT/bench.md" "$OUT/bench.md" 2>/dev/null && cat "$OUT/bench.md"
tar czf "$OUT/bench_logs.tar.gz" -C "$BENCH_OUT" . 2>/dev/null

# ---- 5. decode with overlapped launches and without ---------------------------------------------
CK=runs/gpu_check_ckpt
{
    echo
    echo "decode of small, greedy, 256 tokens, with plain launches (infer_gpu_plain) and overlapped:"
    step decode_ckpt 40 80 ./train_gpu --preset small --batch 1 --seq-len 256 --steps 1 --eval-every 1 --eval-batches 1 \
        --out $CK >/dev/null 2>&1
    for bin in ./runs/variants/infer_gpu_plain ./infer_gpu ./runs/variants/infer_gpu_plain ./infer_gpu; do
        [ -f $CK/model.safetensors ] && [ "$(left)" -gt 90 ] || break
        printf '%s: ' "$bin"
        timeout 30 $bin $CK/model.safetensors --prompt "The state of the Union" --max-tokens 256 --temperature 0 \
            2>&1 >/dev/null | tail -n 1
    done
} >>"$OUT/ab.md" 2>&1
tail -n 6 "$OUT/ab.md"

# ---- 6. a bf16 training step of the 3b cut under ncu ----------------------------------------------
step profile_3b_bf16 200 5 env NAME=profile_3b_bf16 bash dev/profile.sh --preset 3b --set n_layers=4 --batch 2 \
    --seq-len 4096 --precision bf16 >/dev/null 2>&1
head -n 24 "$OUT/profile_3b_bf16.md" 2>/dev/null

note "done in $(($(date +%s) - T0)) s"
echo
cat "$SUMMARY"
