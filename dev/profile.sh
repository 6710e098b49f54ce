#!/usr/bin/env bash
# dev/profile.sh - where a training step's GPU time goes: every kernel of a few train_gpu steps timed by
# Nsight Compute (ncu, one metric: gpu__time_duration), summed per kernel name, largest first. ncu runs
# the kernels one at a time, so the sum is GPU time without overlap; the step time train_gpu prints
# without ncu is the figure to compare it with.
#
#   bash dev/profile.sh [train_gpu flags...]     e.g. --preset small --batch 8
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
ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base --log-file "$SCRATCH/$NAME.csv" \
    ./train_gpu "$@" --steps "$STEPS" --bench --out "$SCRATCH/run-$NAME" >"$SCRATCH/$NAME.log" 2>&1 \
    || { tail -20 "$SCRATCH/$NAME.log" "$SCRATCH/$NAME.csv" >&2; exit 1; }
"${PYTHON:-python3}" - "$SCRATCH/$NAME.csv" "$STEPS" "$*" >"$OUTDIR/$NAME.md" <<'PY'
import csv, sys, collections
path, steps, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3]
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
print(f"train_gpu {flags}: {all_ns / 1e6 / steps:.1f} ms of kernel time per step ({steps} steps, ncu)\n")
print("| kernel | ms/step | share | calls/step | us/call |\n|---|---|---|---|---|")
for name, ns in total.most_common(40):
    print(f"| {name[:70]} | {ns / 1e6 / steps:.2f} | {100 * ns / all_ns:.1f}% | {calls[name] / steps:.0f} | {ns / 1e3 / calls[name]:.1f} |")
PY
cat "$OUTDIR/$NAME.md"
