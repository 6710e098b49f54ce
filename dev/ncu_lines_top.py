"""dev/ncu_lines_top.py CSV TOP: the TOP lines of an ncu source page (--page source --csv) with the most
warp-state samples, each with its share of all samples and its stall-reason columns that are non-zero."""
import csv, sys

rows = list(csv.reader(open(sys.argv[1])))
head = next((i for i, r in enumerate(rows) if any("Sampl" in c for c in r)), None)
if head is None:
    print("no sampling column; first rows:")
    for r in rows[:6]:
        print(r[:10])
    sys.exit()
h = rows[head]
col = next(i for i, c in enumerate(h) if "Sampl" in c and "Not" not in c)


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


body = [r for r in rows[head + 1:] if len(r) == len(h)]
total = sum(num(r[col]) for r in body) or 1
print(f"{len(body)} lines, {total:.0f} samples in '{h[col]}'; columns: {h}")
src = next((i for i, c in enumerate(h) if c == "Source"), 1)
stalls = [i for i, c in enumerate(h) if "stall" in c.lower() or "Sampl" in c]
for r in sorted(body, key=lambda r: -num(r[col]))[: int(sys.argv[2])]:
    reasons = ", ".join(f"{h[i]}={r[i]}" for i in stalls if i != col and num(r[i]) > 0.02 * num(r[col]))
    print(f"{100 * num(r[col]) / total:5.1f}% | {r[0]} | {r[src][:110]} | {reasons[:300]}")
