"""Pictures of finished or running runs, from what they already wrote (log.jsonl, metrics.json): no plotting
dependency, pillow only.

    python plots.py runs/a runs/b --metric mIoU -o compare.png     # validation curves of several runs on one chart
    python plots.py runs/a --metric Paper -o paper.png              # one class's IoU
    python plots.py runs/a                                          # curves.png and confusion.png of one run
    python plots.py --cv "garbage=runs/ga_15min" "garbage=runs/ga_60min" "camvid=runs/cv_15min" -o time.png
                                  # cv.py results: mean mIoU against training minutes, one line per label
    python plots.py --cv "garbage vote=runs/ga_vote" ...  # ensemble.py --eval dirs, one per fold (ga_vote/fold0 ...)
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


def cv_points(specs):
    """[(label, color, minutes, mIoU %)] from 'LABEL=DIR' specs of cv.py output dirs (cv.json), one series per
    label, its points ordered by minutes."""
    by_label = {}
    for spec in specs:
        label, sep, folder = spec.rpartition("=")
        if not sep or not label:
            raise OutputError(f"--cv takes LABEL=DIR (e.g. garbage=runs/ga_15min), not '{spec}'")
        path = Path(folder) / "cv.json"
        if path.is_file():
            mean = json.loads(path.read_text())["summary"]["mean"]
            by_label.setdefault(label, []).append((mean["train_minutes"][0], 100 * mean["mIoU"][0]))
        else:
            by_label.setdefault(label, []).append(vote_point(Path(folder)))
    series = []
    for i, (label, points) in enumerate(by_label.items()):
        points.sort()
        series.append((label, DISTINCT_RUN_COLORS[i % len(DISTINCT_RUN_COLORS)], [p[0] for p in points],
                       [p[1] for p in points]))
    return series


def vote_point(folder):
    """(minutes, mIoU %) of votes fold by fold: folder/*/metrics.json written by `ensemble.py --eval` over cv.py's
    oof/foldN dirs. A vote costs its members' training minutes summed (from their cv.json); means over the folds."""
    metrics_paths = sorted(folder.glob("*/metrics.json"))
    if not metrics_paths:
        raise OutputError(f"{folder}: no cv.json (not a finished cv.py output dir) and no */metrics.json "
                          f"(not ensemble.py --eval outputs, one per fold)")
    minutes, mious = [], []
    for metrics_path in metrics_paths:
        metrics = json.loads(metrics_path.read_text())
        if not metrics.get("inputs") or "mIoU" not in metrics:
            raise OutputError(f"{metrics_path}: not an ensemble.py --eval result (no inputs or no mIoU)")
        total = 0.0
        for member in map(Path, metrics["inputs"]):
            cv_json = member.parent.parent / "cv.json"
            rows = json.loads(cv_json.read_text())["folds"] if cv_json.is_file() else []
            row = next((r for r in rows if f"fold{r['fold']}" == member.name), None)
            if row is None or row.get("train_minutes") is None:
                raise OutputError(f"{metrics_path}: its member {member} is not a cv.py oof/foldN dir whose cv.json "
                                  f"has the fold's training minutes")
            total += row["train_minutes"]
        minutes.append(total)
        mious.append(100 * metrics["mIoU"])
    return sum(minutes) / len(minutes), sum(mious) / len(mious)


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
    p.add_argument("runs", nargs="*", help="train.py output dirs")
    p.add_argument("--cv", nargs="+", metavar="LABEL=DIR",
                   help="instead of runs: cv.py output dirs, mean mIoU against mean training minutes; dirs with "
                        "one label form one line; a dir of ensemble.py --eval outputs (one per fold) counts its "
                        "members' minutes summed")
    p.add_argument("--metric", default="mIoU", help="mIoU, mAcc, aAcc, or a class name for its IoU")
    p.add_argument("-o", "--output", help="PNG to write (default: compare.png; one run without --metric: its "
                                          "curves.png)")
    args = p.parse_args(argv)
    if bool(args.cv) == bool(args.runs):
        p.error("give train.py output dirs, or --cv LABEL=DIR ...")
    try:
        if args.cv:
            out = Path(args.output or "time_to_quality.png")
            save_picture(line_chart(cv_points(args.cv), "mean mIoU over the folds (%) against training minutes",
                                    "training minutes (mean per fold)", "mIoU %", size=(760, 380)), out)
        elif len(args.runs) == 1 and not args.output and "--metric" not in (argv or sys.argv[1:]):
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
