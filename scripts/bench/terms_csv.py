"""runs.jsonl of `scripts/bench-peers.sh transfer` (one line per run: implementation, target,
run, report) -> the per-run terms table of experiments/004 on stdout, plus a summary per
(implementation, target) on stderr: mean (min-max) of each term.

Usage: terms_csv.py DIR/runs.jsonl > results/side-by-side/terms.csv
"""
import json
import sys

COLUMNS = ["bound", "reference_loss", "label_entropy", "wasserstein", "tau", "tau_reference",
           "reference_accuracy", "target_accuracy", "target_loss"]


def label_map_argmax(report):
    if "label_map_argmax" in report:
        return report["label_map_argmax"]
    # taskrel reports B (target x reference); the argmax over target classes per reference class.
    b = report["label_map"]
    return [max(range(len(b)), key=lambda k: b[k][j]) for j in range(len(b[0]))]


def seconds(report):
    s = report.get("seconds_total", report.get("seconds"))
    return s["total"] if isinstance(s, dict) else s


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    print(",".join(["implementation", "target", "run"] + COLUMNS + ["label_map_argmax", "seconds"]))
    groups = {}
    for row in rows:
        r = row["report"]
        values = [r[c] for c in COLUMNS]
        print(",".join([row["implementation"], row["target"], str(row["run"])]
                       + [f"{v:.4f}" for v in values]
                       + [" ".join(map(str, label_map_argmax(r))), f"{seconds(r):.1f}"]))
        groups.setdefault((row["implementation"], row["target"]), []).append(values + [seconds(r)])
    for (impl, target), runs in groups.items():
        parts = []
        for i, name in enumerate(COLUMNS + ["seconds"]):
            v = [run[i] for run in runs]
            parts.append(f"{name} {sum(v) / len(v):.4f} ({min(v):.4f}-{max(v):.4f})")
        print(f"{impl} {target}: " + "; ".join(parts), file=sys.stderr)


if __name__ == "__main__":
    main()
