#!/usr/bin/env bash
# End-to-end tests of ./train and ./infer (make test runs this): bad input gets a clear one-line
# error and a non-zero exit, resume reproduces an uninterrupted run exactly, a failed run never
# damages the checkpoint, sampling and the loss-gap plot work. Ends with "N passed, N failed".
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0 failed=0

check() {   # check NAME CONDITION-STATUS [details]
    if [ "$2" -eq 0 ]; then echo "PASS $1"; passed=$((passed + 1)); else echo "FAIL $1 ${3:-}"; failed=$((failed + 1)); fi
}

# expect_error NAME EXIT-CODE PATTERN -- command...: fails with that code and prints PATTERN on stderr
expect_error() {
    local name=$1 code=$2 pattern=$3
    shift 4
    "$@" >"$work/out" 2>"$work/err"
    local rc=$?
    if [ "$rc" -eq "$code" ] && grep -q -- "$pattern" "$work/err" && [ "$(wc -l <"$work/err")" -le 2 ]; then
        check "$name (exit $rc: $(head -n 1 "$work/err"))" 0
    else
        check "$name" 1 "(exit $rc, stderr: $(head -c 300 "$work/err"))"
    fi
}

# a small, fast model on the real corpus (GPT-2 vocabulary)
small=(--set d_model=64 --set n_layers=2 --set n_heads=2 --set kv_lora_rank=32 --set moe_inter_dim=64
       --set dense_inter_dim=192 --batch 2 --seq-len 32 --steps 8 --eval-every 4 --eval-batches 1 --threads 2)

# --- flags ---------------------------------------------------------------------------------------
./train --help >/dev/null; check "train --help exits 0" $?
expect_error "train: unknown flag" 2 "unknown flag" -- ./train --frobnicate 3
expect_error "train: bad number" 2 "bad value" -- ./train --lr abc
expect_error "train: out-of-range steps" 2 "out of range" -- ./train --steps 0
expect_error "train: out-of-range streams" 2 "out of range" -- ./train --streams 99
expect_error "train: unknown preset" 2 "unknown preset" -- ./train --preset huge
expect_error "train: unknown --set field" 2 "unknown config field" -- ./train --set nonsense=1
expect_error "train: bad --precision" 2 "bad value 'fp8' for --precision" -- ./train --precision fp8
expect_error "train: --recompute on the CPU build" 2 "needs the GPU build" -- ./train --recompute
expect_error "train: --expert-wgmma on the CPU build" 2 "needs the GPU build" -- ./train --expert-wgmma
expect_error "train: --attention-wgmma on the CPU build" 2 "attention-wgmma needs the GPU build" -- ./train --attention-wgmma
expect_error "infer: unknown flag" 2 "unknown flag" -- ./infer x.safetensors --frobnicate 1
expect_error "infer: no checkpoint" 2 "no checkpoint" -- ./infer
expect_error "infer: --graph out of range" 2 "bad value for --graph" -- ./infer x.safetensors --graph 2
expect_error "infer: unknown precision" 2 "--precision takes fp32 or bf16, not fp16" -- ./infer x.safetensors --precision fp16
./train --preset 27b --dry-run >"$work/dry" 2>&1
grep -q "total 27048293460" "$work/dry" && grep -q "active 4138873940" "$work/dry"
check "train --preset 27b --dry-run prints the SPEC parameter counts" $?
if [ -x ./train_gpu ]; then      # the CUDA build's --dry-run sizes its buffers without touching a GPU
    gib() { sed -n 's/^memory .* per forward .*: \([0-9.]*\) GiB$/\1/p'; }
    full=$(./train_gpu --preset 3b --batch 2 --dry-run | gib)
    less=$(./train_gpu --preset 3b --batch 2 --recompute --dry-run | gib)
    awk "BEGIN { exit !($less > 0 && $less < $full / 2) }"
    check "train_gpu --dry-run: --recompute needs under half the activation memory (3b, 2 x 4096: $full -> $less GiB)" $?
    expect_error "train_gpu: --expert-wgmma without bf16" 2 "needs --precision bf16" -- ./train_gpu --expert-wgmma --dry-run
    expect_error "train_gpu: --attention-wgmma without bf16" 2 "attention-wgmma needs --precision bf16" -- ./train_gpu --attention-wgmma --dry-run
fi

# --- shards ----------------------------------------------------------------------------------------
expect_error "train: missing shard" 1 "cannot open shard" -- ./train "${small[@]}" --train "$work/none.bin" --out "$work/r"
head -c 2000 data/sotu_train.bin >"$work/trunc.bin"
expect_error "train: truncated shard" 1 "header says" -- ./train "${small[@]}" --train "$work/trunc.bin" --out "$work/r"
cp data/sotu_val.bin "$work/magic.bin"
printf '\x01\x02\x03\x04' | dd of="$work/magic.bin" conv=notrunc status=none
expect_error "train: shard with a bad magic" 1 "unknown magic" -- ./train "${small[@]}" --train "$work/magic.bin" --out "$work/r"

# --- resume is exact -----------------------------------------------------------------------------------
./train "${small[@]}" --out "$work/full" >/dev/null 2>&1; check "train: 8 uninterrupted steps" $?
./train "${small[@]}" --out "$work/part" --stop-after 4 >/dev/null 2>&1 &&
    ./train "${small[@]}" --out "$work/part" --resume >/dev/null 2>&1
check "train: 4 steps, stop, --resume to 8" $?
cut -d, -f1-3 "$work/full/log.csv" >"$work/a"
cut -d, -f1-3 "$work/part/log.csv" >"$work/b"
cmp -s "$work/a" "$work/b"
check "train: the resumed loss sequence equals the uninterrupted one, bit for bit" $? "($(diff "$work/a" "$work/b" | head -4 | tr '\n' ' '))"
for f in model.safetensors optim.safetensors log.csv loss.png grad_norm.png gains.png hres.png diagnostics.csv; do
    [ -s "$work/full/$f" ] || { check "train writes $f" 1; continue; }
done
check "train writes the checkpoint, log and plots" 0

# --- checkpoints ---------------------------------------------------------------------------------------
expect_error "train: resume with flags that contradict the checkpoint" 1 "has d_model = 64" -- ./train "${small[@]}" --set d_model=128 --out "$work/full" --resume
expect_error "train: resume without a checkpoint" 1 "cannot resume" -- ./train "${small[@]}" --out "$work/empty" --resume
cp -r "$work/full" "$work/trunc"
head -c 100000 "$work/full/model.safetensors" >"$work/trunc/model.safetensors"
expect_error "infer: truncated checkpoint" 1 "safetensors" -- ./infer "$work/trunc/model.safetensors"
expect_error "train: resume from a truncated checkpoint" 1 "cannot resume" -- ./train "${small[@]}" --out "$work/trunc" --resume
cp "$work/full/model.safetensors" "$work/corrupt.safetensors"
printf 'XXXXXXXXXXXX' | dd of="$work/corrupt.safetensors" bs=1 seek=9 conv=notrunc status=none
expect_error "infer: corrupt checkpoint header" 1 "corrupt safetensors header" -- ./infer "$work/corrupt.safetensors"
expect_error "infer: missing checkpoint" 1 "cannot open" -- ./infer "$work/none.safetensors"
cp -r "$work/full" "$work/optim"
head -c 5000 "$work/full/optim.safetensors" >"$work/optim/optim.safetensors"
expect_error "train: resume with a truncated optimizer state" 1 "cannot resume" -- ./train "${small[@]}" --out "$work/optim" --resume

# a checkpoint whose LM head is 3e38 makes the logits overflow: the loss is NaN
./train "${small[@]}" --out "$work/nan" --stop-after 4 >/dev/null 2>&1
python3 - "$work/nan/model.safetensors" <<'EOF'
import json, struct, sys
path = sys.argv[1]
data = bytearray(open(path, 'rb').read())
n = struct.unpack('<Q', data[:8])[0]
head = json.loads(data[8:8 + n])['head']
begin, end = head['data_offsets']
data[8 + n + begin:8 + n + end] = struct.pack('<f', 3e38) * ((end - begin) // 4)
open(path, 'wb').write(data)
EOF
sum_before=$(sha256sum "$work/nan/model.safetensors" "$work/nan/optim.safetensors")
expect_error "train: a NaN loss stops the run" 1 "loss is" -- ./train "${small[@]}" --out "$work/nan" --resume
[ "$sum_before" = "$(sha256sum "$work/nan/model.safetensors" "$work/nan/optim.safetensors")" ]
check "train: the checkpoint is untouched after the NaN stop" $?

# --- sampling ----------------------------------------------------------------------------------------
./infer "$work/full/model.safetensors" --prompt "The Congress" --max-tokens 8 --seed 3 >"$work/s1" 2>"$work/s1e"
check "infer: samples from a checkpoint" $? "$(cat "$work/s1e")"
grep -q "tokens/s" "$work/s1e"; check "infer: reports tokens/s" $?
./infer "$work/full/model.safetensors" --prompt "The Congress" --max-tokens 8 --seed 3 >"$work/s2" 2>/dev/null
cmp -s "$work/s1" "$work/s2"; check "infer: the same seed gives the same text" $?
./infer "$work/full/model.safetensors" --prompt "The Congress" --max-tokens 8 --temperature 0 >"$work/g1" 2>/dev/null
./infer "$work/full/model.safetensors" --prompt "The Congress" --max-tokens 8 --temperature 5 --top-k 1 >"$work/g2" 2>/dev/null
cmp -s "$work/g1" "$work/g2"; check "infer: --top-k 1 at temperature 5 gives the greedy text" $?
./infer "$work/full/model.safetensors" --prompt "The Congress" --max-tokens 8 --temperature 0 --precision bf16 >"$work/b1" \
    2>"$work/b1e"
check "infer: decodes with bf16 weights" $? "$(cat "$work/b1e")"
[ "$(wc -c <"$work/b1")" -gt "$(printf 'The Congress' | wc -c)" ]; check "infer: bf16 weights give text" $?
expect_error "infer: prompt longer than the context" 2 "exceeds the model's context" -- ./infer "$work/full/model.safetensors" --max-tokens 100
expect_error "infer: missing tokenizer" 1 "none.tok" -- ./infer "$work/full/model.safetensors" --tokenizer "$work/none.tok"
head -c 1000 data/gpt2.tok >"$work/trunc.tok"
expect_error "infer: truncated tokenizer" 1 "" -- ./infer "$work/full/model.safetensors" --tokenizer "$work/trunc.tok"

# --- loss gap ----------------------------------------------------------------------------------------
./train "${small[@]}" --residual plain --out "$work/plain" >/dev/null 2>&1 &&
    ./train --loss-gap "$work/gap.png" "$work/plain" "$work/full" >/dev/null 2>&1 && [ -s "$work/gap.png" ]
check "train --loss-gap draws the gap of mhc vs plain" $?

# --- bench mode (dev/bench.sh): the same losses, only log.csv written ----------------------------------
./train "${small[@]}" --bench --out "$work/bench" >/dev/null 2>&1 && [ -s "$work/bench/log.csv" ] &&
    [ ! -e "$work/bench/model.safetensors" ] && [ ! -e "$work/bench/loss.png" ] &&
    cmp -s <(cut -d, -f1-3 "$work/full/log.csv") <(cut -d, -f1-3 "$work/bench/log.csv")
check "train --bench: same losses as a normal run, log.csv only" $?

# --- gradient accumulation: 2 micro-batches of 1 sequence follow the 8 steps of batch 2 (rounding only) ----
expect_error "train: --grad-accum that does not divide the batch" 2 "does not divide" -- ./train "${small[@]}" --grad-accum 3 --out "$work/ga"
./train "${small[@]}" --grad-accum 2 --bench --out "$work/accum" >/dev/null 2>&1 &&
    paste -d, <(cut -d, -f2 "$work/full/log.csv") <(cut -d, -f2 "$work/accum/log.csv") | awk -F, '
        NR > 1 { d = ($1 - $2) / $1; if (d < 0) d = -d; if (d > worst) worst = d; rows++ }
        END { printf "%d steps, worst relative loss difference %.1e\n", rows, worst > "/dev/stderr"; exit !(rows == 8 && worst < 1e-4) }' 2>"$work/ga_diff"
check "train --grad-accum 2: the losses of batch 2 in one pass ($(cat "$work/ga_diff"), tol 1e-4)" $?

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
