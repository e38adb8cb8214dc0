"""Pictures of finished or running runs, from what they already wrote (log.jsonl, metrics.json): no plotting
dependency, pillow only.

    python plots.py runs/a runs/b --metric mIoU -o compare.png     # validation curves of several runs on one chart
    python plots.py runs/a --metric Paper -o paper.png              # one class's IoU
    python plots.py runs/a                                          # curves.png and confusion.png of one run
"""
import argparse
import json
import sys
from pathlib import Path

from outputs import OutputError, read_log, save_picture
from pictures import DISTINCT_RUN_COLORS, confusion_picture, curves_picture, line_chart, nan_none


def validation_series(records, metric):
    """(epochs, values in %) of a run's validation records for a metric: mIoU, mAcc, aAcc or a class name (IoU)."""
    latest = {r["epoch"]: r["val"] for r in records if "val" in r}
    epochs, values = sorted(latest), []
    for epoch in epochs:
        val = latest[epoch]
        if metric in ("mIoU", "mAcc", "aAcc"):
            value = val[metric]
        elif metric in val["per_class"]:
            value = nan_none(val["per_class"][metric]["IoU"])
        else:
            raise OutputError(f"no metric '{metric}' in the log: mIoU, mAcc, aAcc or a class name "
                              f"({', '.join(val['per_class'])})")
        values.append(None if value is None else 100 * value)
    return [e + 1 for e in epochs], values


def run_records(run):
    log = Path(run) / "log.jsonl"
    if not log.is_file():
        raise OutputError(f"{run}: no log.jsonl (not a train.py output dir)")
    return read_log(log)


def redraw_run(run):
    """curves.png from log.jsonl, and confusion.png from best_metrics.json where there is one; returns what was
    written."""
    records = run_records(run)
    names = next((list(r["val"]["per_class"]) for r in records if "val" in r), [])
    save_picture(curves_picture(records, names, run.name), run / "curves.png")
    written = [run / "curves.png"]
    if (run / "best_metrics.json").is_file():
        best = json.loads((run / "best_metrics.json").read_text())
        save_picture(confusion_picture(best["confusion"], list(best["per_class"]), f"epoch {best['epoch']} (best): "
                                       f"rows ground truth, % of the row"), run / "confusion.png")
        written.append(run / "confusion.png")
    return " and ".join(map(str, written))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py output dirs")
    p.add_argument("--metric", default="mIoU", help="mIoU, mAcc, aAcc, or a class name for its IoU")
    p.add_argument("-o", "--output", help="PNG to write (default: compare.png; one run without --metric: its "
                                          "curves.png)")
    args = p.parse_args(argv)
    try:
        if len(args.runs) == 1 and not args.output and "--metric" not in (argv or sys.argv[1:]):
            out = redraw_run(Path(args.runs[0]))
        else:
            series = []
            for i, run in enumerate(args.runs):
                epochs, values = validation_series(run_records(run), args.metric)
                series.append((Path(run).name, DISTINCT_RUN_COLORS[i % len(DISTINCT_RUN_COLORS)], epochs, values))
            out = Path(args.output or "compare.png")
            save_picture(line_chart(series, f"validation {args.metric} (%)", "epochs", f"{args.metric} %",
                                    size=(760, 380)), out)
    except OutputError as e:  # a WriteError is an OutputError
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
