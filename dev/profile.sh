#!/usr/bin/env bash
# dev/profile.sh - where a training step's GPU time goes: every kernel of a few train_gpu steps timed by
# Nsight Compute (ncu, one metric: gpu__time_duration), summed per kernel name, largest first. ncu runs
# the kernels one at a time, so the sum is GPU time without overlap; the step time train_gpu prints
# without ncu is the figure to compare it with. With --infer, the same for infer_gpu's decode, per token
# (prompt and generated tokens both run one decode step each); set against the time per token infer_gpu
# reports without ncu, it tells kernel time from launch and host overhead.
#
#   bash dev/profile.sh [train_gpu flags...]     e.g. --preset small --batch 8
#   bash dev/profile.sh --infer CKPT [infer_gpu flags...]    greedy, TOKENS (default 16) generated
#
# Writes $OUT/$NAME.md (NAME defaults to profile; OUT to runs/profile); the raw CSV and the run's files go
# to runs/profile-scratch. Needs `make gpu` done and the default corpus. STEPS (default 2) steps are run,
# all profiled (the first step's one-time kernels included); the table is per step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR=${OUT:-runs/profile}
STEPS=${STEPS:-2}
NAME=${NAME:-profile}
SCRATCH=runs/profile-scratch
mkdir -p "$OUTDIR" "$SCRATCH"
command -v ncu >/dev/null || { echo "profile: ncu (Nsight Compute) is not on the PATH" >&2; exit 1; }
if [ "${1:-}" = --infer ]; then
    shift
    CMD=(./infer_gpu "$@" --max-tokens "${TOKENS:-16}" --temperature 0) UNIT=token
else
    CMD=(./train_gpu "$@" --steps "$STEPS" --bench --out "$SCRATCH/run-$NAME") UNIT=step
fi
ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base --log-file "$SCRATCH/$NAME.csv" \
    "${CMD[@]}" >"$SCRATCH/$NAME.log" 2>&1 || { tail -20 "$SCRATCH/$NAME.log" "$SCRATCH/$NAME.csv" >&2; exit 1; }
if [ "$UNIT" = token ]; then    # infer's "prefill P tokens in ...; generated G tokens in ..." line: P + G decode steps
    STEPS=$(sed -n 's/.*prefill \([0-9]*\) tokens in .*; generated \([0-9]*\) tokens in.*/\1 \2/p' "$SCRATCH/$NAME.log" |
            awk '{ print $1 + $2 }' | tail -n 1)
    [ -n "$STEPS" ] || { echo "profile: no token count in $SCRATCH/$NAME.log" >&2; exit 1; }
fi
"${PYTHON:-python3}" - "$SCRATCH/$NAME.csv" "$STEPS" "${CMD[*]}" "$UNIT" >"$OUTDIR/$NAME.md" <<'PY'
import csv, sys, collections
path, steps, cmd, unit = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = list(csv.reader(open(path)))
at = next(i for i, r in enumerate(rows) if "Kernel Name" in r and "Metric Value" in r)
head, rows = rows[at], rows[at:]
name_col, val_col = head.index("Kernel Name"), head.index("Metric Value")
total = collections.Counter(); calls = collections.Counter()
for r in rows[1:]:
    try: ns = float(r[val_col].replace(",", ""))
    except ValueError: continue
    name = r[name_col].split("(")[0]
    total[name] += ns; calls[name] += 1
all_ns = sum(total.values())
launches = sum(calls.values())
print(f"{cmd}: {all_ns / 1e6 / steps:.3f} ms of kernel time per {unit} in {launches / steps:.0f} launches ({steps} {unit}s, ncu)\n")
print(f"| kernel | ms/{unit} | share | calls/{unit} | us/call |\n|---|---|---|---|---|")
for name, ns in total.most_common(40):
    print(f"| {name[:70]} | {ns / 1e6 / steps:.3f} | {100 * ns / all_ns:.1f}% | {calls[name] / steps:.1f} | {ns / 1e3 / calls[name]:.1f} |")
PY
cat "$OUTDIR/$NAME.md"
