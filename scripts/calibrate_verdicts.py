"""Derives `taskrel rank`'s verdict thresholds (rank_cmd.rs, WELL_LABELLED / WELL_UNLABELED)
from a digits study's cells.csv: for the labelled and the label-free bound, the largest bound,
rounded down to a multiple of 0.05, at or below which every cell reached at least 90 % test accuracy after
full fine-tuning. Prints how many cells fall at or below it, their lowest accuracy, and the
accuracy range of each quarter of the cells above it.

Usage: python3 scripts/calibrate_verdicts.py results/digits/cells.csv
"""
import csv
import math
import sys

ACCURACY = "accuracy_full"
FLOOR = 0.90


def calibrate(rows, column):
    cells = sorted((float(r[column]), float(r[ACCURACY])) for r in rows
                   if r[column] not in ("", "NaN") and r[ACCURACY] != "")
    # Walk up the bounds while every cell so far meets the floor.
    last_ok = None
    for i, (bound, _) in enumerate(cells):
        if min(acc for _, acc in cells[: i + 1]) < FLOOR:
            break
        last_ok = bound
    if last_ok is None:
        print(f"{column}: the cell with the smallest bound is below {FLOOR:.0%}: no threshold")
        return
    # Rounded down to a multiple of 0.05 (below the last cell that meets the floor).
    threshold = math.floor(last_ok * 20) / 20
    below = [acc for b, acc in cells if b <= threshold]
    above = [(b, acc) for b, acc in cells if b > threshold]
    print(f"{column}: threshold {threshold:.2f}: {len(below)} of {len(cells)} cells at or below, "
          f"lowest accuracy {min(below) if below else float('nan'):.3f}")
    for q in range(4):
        part = above[q * len(above) // 4:(q + 1) * len(above) // 4]
        if part:
            accs = [a for _, a in part]
            print(f"  quarter {q + 1} above: bounds {part[0][0]:.3f}-{part[-1][0]:.3f}, "
                  f"accuracy {min(accs):.3f}-{max(accs):.3f}")


if __name__ == "__main__":
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.DictReader(f))
    for column in ("bound", "bound_unlabeled"):
        calibrate(rows, column)
