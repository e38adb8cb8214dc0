"""K-fold cross-validation of one recipe: train.py on every fold with the same flags, then predict.py --eval on each
fold's validation photos (out-of-fold predictions); per-fold figures, mean ± sd, and the out-of-fold mIoU.

    python cv.py --folds-dir data/folds --output-dir runs/cv_lite0 -- --amp          # flags after -- go to train.py
    python cv.py --folds-dir F --output-dir runs/cv_mnv2 --folds 0,2 --tta -- --backbone mobilenet_v2 --amp
    python cv.py --compare runs/cv_lite0 runs/cv_mnv2                                # two recipes, paired by fold
    python cv.py --compare runs/ga_a runs/ga_b runs/cv_a runs/cv_b                   # pairs on two sets, pooled
    python cv.py --folds-dir F --output-dir runs/cv_student -- --pseudo preds/pl/fold{fold} --amp  # {fold}: the fold

--output-dir holds fold<i>/ (train.py's run), oof/fold<i>/ (predict.py --eval on val_fold<i>.json: probs/, masks/,
metrics.json; what `ensemble.py --search-weights` takes) and cv.json. Running the same command again skips finished
folds and resumes an interrupted one from its last.pt (a stop loses at most that fold's current epoch).
The out-of-fold predictions come from each fold's last.pt: best.pt's epoch was chosen on the very photos it would be
scored on, which flatters it (--checkpoint best to use it anyway).
"""
import argparse
import ctypes
import hashlib
import json
import shlex
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from checkpoint import load_state_file
from coco import DataError
from metrics import segmentation_metrics
from outputs import write_json

HERE = Path(__file__).resolve().parent
MANAGED = {"--fold", "--folds-dir", "--output-dir", "--train-json", "--val-json", "--resume", "--force",
           "--test-only"}  # train.py flags that cv.py sets itself


class CVError(ValueError):
    """A cross-validation cannot go on: the message names the file or flag and what to do."""


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folds-dir", help="folds.py's output: train_fold<i>.json and val_fold<i>.json")
    p.add_argument("--output-dir", help="where the folds' runs, oof/ and cv.json go")
    p.add_argument("--folds", help="comma-separated folds to run, e.g. 0,2 (default: every val_fold<i>.json)")
    p.add_argument("--tta", action="store_true", help="predict the out-of-fold photos with flip TTA")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last", help="which checkpoint predicts them")
    p.add_argument("--force", action="store_true",
                   help="train and predict every fold afresh, even where --output-dir holds finished folds")
    p.add_argument("--compare", nargs="+", metavar="A B",
                   help="two cv.py output dirs, paired by fold; several pairs (A B A2 B2 ..., e.g. one per data set) "
                        "are also pooled: B wins when it wins most folds, its mean gain exceeds twice its standard "
                        "error, and no pair's mean goes against it beyond that pair's spread")
    return p


def split_argv(argv):
    """(cv.py's own arguments, train.py's flags: everything after the first '--')."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def fold_numbers(folds_dir, wanted):
    found = sorted(int(p.stem.removeprefix("val_fold")) for p in folds_dir.glob("val_fold*.json")
                   if p.stem.removeprefix("val_fold").isdigit())
    if not found:
        raise CVError(f"{folds_dir}: no val_fold<i>.json; make the folds with folds.py --output-dir {folds_dir}")
    if wanted is None:
        return found
    try:
        chosen = [int(x) for x in wanted.split(",")]
    except ValueError:
        raise CVError(f"--folds {wanted}: give fold numbers separated by commas, e.g. 0,2") from None
    missing = [i for i in chosen if i not in found]
    if missing:
        raise CVError(f"--folds {wanted}: {folds_dir} has no val_fold{missing[0]}.json (it has folds "
                      f"{', '.join(map(str, found))})")
    for i in chosen:
        if not (folds_dir / f"train_fold{i}.json").is_file():
            raise CVError(f"{folds_dir / f'train_fold{i}.json'}: missing; make the folds again with folds.py")
    return chosen


def val_photos_digest(path):
    """sha1 of a fold's validation file_names: two cross-validations pair only over the same photos."""
    try:
        names = sorted(image["file_name"] for image in json.loads(path.read_text())["images"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CVError(f"{path}: not a readable fold JSON ({e})") from None
    return hashlib.sha1("\n".join(names).encode()).hexdigest()


def stop_with_parent():
    """In the child, before it runs (Linux): SIGTERM when cv.py dies, even by kill -9, so that no training goes on
    unseen in a fold that the next cv.py would resume; train.py then stops at its next step."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the child outlives a killed cv.py


def run_child(cmd, what):
    """Run train.py or predict.py. The child has its own session, so Ctrl-C reaches only cv.py, which passes each
    stop signal on exactly once: the first stops training after its step, a second at once, as in train.py."""
    print("+ " + shlex.join(str(c) for c in cmd), flush=True)
    child = subprocess.Popen([str(c) for c in cmd], start_new_session=True,
                             preexec_fn=stop_with_parent if sys.platform.startswith("linux") else None)
    previous = {s: signal.signal(s, lambda signum, frame: child.send_signal(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code:
        raise SystemExit(f"cv.py: {what} ended with exit code {code} (see above); run the same cv.py command "
                         f"again to resume it")


def epochs_done(run_dir):
    """(epochs finished, epochs planned) of a fold's run, from its last.pt; None when there is none."""
    path = run_dir / "last.pt"
    if not path.is_file():
        return None
    ckpt = load_state_file(path, "checkpoint")
    planned = ckpt["args"]["epochs"]
    if ckpt["args"].get("stop_after") is not None:
        planned = min(planned, ckpt["args"]["stop_after"])
    return ckpt["epoch"] + 1, planned


def fold_flags(train_flags, i):
    """train.py's flags for fold i: '{fold}' in a flag becomes the fold number, so that each fold can take its own
    pseudo labels, teacher weights or exclude list (--pseudo preds/pl/fold{fold})."""
    return [flag.replace("{fold}", str(i)) for flag in train_flags]


def train_fold(i, out, folds_dir, train_flags, force):
    run_dir = out / f"fold{i}"
    done = None if force else epochs_done(run_dir)
    if done and done[0] >= done[1]:
        print(f"fold {i}: trained ({done[0]} epochs in {run_dir}), skipped", flush=True)
        return False
    cmd = [sys.executable, HERE / "train.py", *fold_flags(train_flags, i), "--fold", i, "--folds-dir", folds_dir,
           "--output-dir", run_dir]
    cmd += ["--resume"] if done else (["--force"] if force else [])
    run_child(cmd, f"training fold {i}")
    return True


def predict_fold(i, out, folds_dir, args, retrained):
    """predict.py --eval on the fold's validation photos with the fold's own model, unless already done for it."""
    run_dir, oof_dir = out / f"fold{i}", out / "oof" / f"fold{i}"
    ckpt = run_dir / f"{args.checkpoint}.pt"
    metrics = oof_dir / "metrics.json"
    if not retrained and not args.force and metrics.is_file() and metrics.stat().st_mtime >= ckpt.stat().st_mtime:
        print(f"fold {i}: predicted ({oof_dir}), skipped", flush=True)
        return
    config = json.loads((run_dir / "config.json").read_text())
    cmd = [sys.executable, HERE / "predict.py", "--ckpt", ckpt, "--data-dir", config["data_dir"],
           "--json", (folds_dir / f"val_fold{i}.json").resolve(), "--eval", "--output-dir", oof_dir, "--force",
           "--workers", config["workers"], "--mask-cache", config["mask_cache"]]
    cmd += (["--tta"] if args.tta else []) + (["--amp"] if config["amp"] else [])
    cmd += ["--device", config["device"]] if config.get("device") else []
    run_child(cmd, f"predicting fold {i}")


def fold_record(i, out, folds_dir):
    """One fold's figures: its out-of-fold metrics.json (the same file predict.py wrote) and its training minutes."""
    metrics = json.loads((out / "oof" / f"fold{i}" / "metrics.json").read_text())
    log = out / f"fold{i}" / "log.jsonl"
    epochs = [json.loads(line) for line in log.read_text().splitlines() if '"epoch_seconds"' in line]
    return {"fold": i, "mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"], "mAcc": metrics["mAcc"],
            "IoU": {name: c["IoU"] for name, c in metrics["per_class"].items()},
            "train_minutes": sum(e["epoch_seconds"] for e in epochs) / 60, "epochs": len(epochs),
            "val_photos_sha1": val_photos_digest(folds_dir / f"val_fold{i}.json"),
            "confusion": metrics["confusion"]}


def mean_sd(values):
    values = [v for v in values if v is not None and v == v]  # a class absent from a fold (null, NaN) does not count
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary(folds):
    """Mean ± sd over the folds, and the out-of-fold metrics from the folds' summed confusion matrices (each
    photo predicted by the model that did not train on it)."""
    names = list(folds[0]["IoU"])
    confusion = sum(torch.tensor(f["confusion"], dtype=torch.int64) for f in folds)
    oof = segmentation_metrics(confusion, names)
    return {"mean": {"mIoU": mean_sd([f["mIoU"] for f in folds]),
                     "train_minutes": mean_sd([f["train_minutes"] for f in folds]),
                     "IoU": {n: mean_sd([f["IoU"][n] for f in folds]) for n in names}},
            "oof": {"mIoU": oof["mIoU"], "aAcc": oof["aAcc"], "mAcc": oof["mAcc"],
                    "IoU": {n: c["IoU"] for n, c in oof["per_class"].items()}}}


def pct(x):
    return "-" if x is None or x != x else f"{100 * x:.2f}"


def print_table(folds, total):
    names = list(folds[0]["IoU"])
    print("| fold | mIoU | train min | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 3) + "|")
    for f in folds:
        print(f"| {f['fold']} | {pct(f['mIoU'])} | {f['train_minutes']:.1f} | "
              + " | ".join(pct(f["IoU"][n]) for n in names) + " |")
    m = total["mean"]
    print(f"| mean ± sd | {pct(m['mIoU'][0])} ± {pct(m['mIoU'][1])} | {m['train_minutes'][0]:.1f} | "
          + " | ".join(f"{pct(m['IoU'][n][0])} ± {pct(m['IoU'][n][1])}" for n in names) + " |")
    print(f"| out-of-fold | {pct(total['oof']['mIoU'])} | | " + " | ".join(pct(total["oof"]["IoU"][n]) for n in names)
          + " |")


def read_cv(path):
    try:
        return json.loads((Path(path) / "cv.json").read_text())
    except (OSError, ValueError) as e:
        raise CVError(f"{Path(path) / 'cv.json'}: cannot read a cv.py result ({e}); run cv.py there first") from None


def compare(a_dir, b_dir):
    """B against A, paired by fold: per fold, the mean difference, its sd, and on how many folds A won."""
    a, b = read_cv(a_dir), read_cv(b_dir)
    a_folds, b_folds = {f["fold"]: f for f in a["folds"]}, {f["fold"]: f for f in b["folds"]}
    shared = sorted(set(a_folds) & set(b_folds))
    if not shared:
        raise CVError(f"{a_dir} and {b_dir} share no fold")
    for i in shared:
        if a_folds[i]["val_photos_sha1"] != b_folds[i]["val_photos_sha1"]:
            raise CVError(f"fold {i}: {a_dir} and {b_dir} validated on different photos (other folds); "
                          f"pair only runs made on the same folds-dir")
    print(f"A = {a_dir}\nB = {b_dir}\n\n| fold | A mIoU | B mIoU | B - A | A min | B min |\n|---|---|---|---|---|---|")
    diffs = []
    for i in shared:
        fa, fb = a_folds[i], b_folds[i]
        diffs.append(fb["mIoU"] - fa["mIoU"])
        print(f"| {i} | {pct(fa['mIoU'])} | {pct(fb['mIoU'])} | {100 * diffs[-1]:+.2f} | "
              f"{fa['train_minutes']:.1f} | {fb['train_minutes']:.1f} |")
    mean, sd = mean_sd(diffs)
    a_wins = sum(d < 0 for d in diffs)
    verdict = "beyond" if abs(mean) > sd and len(diffs) > 1 else "within"
    print(f"\nB - A: mean {100 * mean:+.2f}, sd {100 * sd:.2f} over {len(diffs)} fold(s) ({verdict} the spread of "
          f"the paired differences); A won on {a_wins} of {len(diffs)}, B on {sum(d > 0 for d in diffs)}")
    print(f"out-of-fold mIoU: A {pct(a['summary']['oof']['mIoU'])}, B {pct(b['summary']['oof']['mIoU'])}")
    return {"diffs": diffs, "mean": mean, "sd": sd, "a_wins": a_wins}


def compare_pairs(dirs):
    """compare() on each pair of dirs, then the pooled verdict over all their folds (DEVELOPERS.md's rule)."""
    if len(dirs) % 2:
        raise CVError(f"--compare takes pairs of cv.py output dirs (A B, or A B A2 B2 ...), not {len(dirs)}")
    pairs = [compare(a, b) for a, b in zip(dirs[::2], dirs[1::2])]
    if len(pairs) > 1:
        pooled_verdict(pairs)
    return pairs


def pooled_verdict(pairs):
    diffs = [d for pair in pairs for d in pair["diffs"]]
    mean, sd = mean_sd(diffs)
    se = sd / len(diffs) ** 0.5
    b_wins, a_wins = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    against = [i for i, pair in enumerate(pairs) if pair["mean"] * mean < 0 and abs(pair["mean"]) > pair["sd"]]
    winner = "B" if mean > 0 else "A"
    won = (b_wins if mean > 0 else a_wins) > len(diffs) / 2 and abs(mean) > 2 * se and not against
    print(f"\npooled over {len(pairs)} pairs, {len(diffs)} folds: B - A mean {100 * mean:+.2f}, sd {100 * sd:.2f}, "
          f"standard error {100 * se:.2f}; B won {b_wins}, A won {a_wins}"
          + (f"; pair(s) {', '.join(str(i + 1) for i in against)} go against it beyond their spread" if against else ""))
    print(f"verdict: {winner + ' wins' if won else 'no winner (noise)'}")
    return won


def cross_validate(args, train_flags):
    managed = sorted({flag.split("=")[0] for flag in train_flags} & MANAGED)
    if managed:
        raise CVError(f"{', '.join(managed)} after '--': cv.py sets these itself for each fold")
    if not args.folds_dir or not args.output_dir:
        raise CVError("give --folds-dir and --output-dir (or --compare A B)")
    folds_dir, out = Path(args.folds_dir), Path(args.output_dir)
    folds = fold_numbers(folds_dir, args.folds)
    previous = out / "cv.json"
    if previous.is_file() and not args.force:
        before = json.loads(previous.read_text()).get("train_flags")
        if before != train_flags:
            raise CVError(f"{previous}: made with train.py flags {shlex.join(before or [])!r}, not "
                          f"{shlex.join(train_flags)!r}; use another --output-dir, or --force to start afresh")
    out.mkdir(parents=True, exist_ok=True)
    for i in folds:
        retrained = train_fold(i, out, folds_dir, train_flags, args.force)
        predict_fold(i, out, folds_dir, args, retrained)
    # every fold predicted so far, those of an earlier --folds subset too
    all_folds = fold_numbers(folds_dir, None)
    records = [fold_record(i, out, folds_dir) for i in all_folds if (out / "oof" / f"fold{i}" / "metrics.json").is_file()]
    total = summary(records)
    write_json(out / "cv.json", {"train_flags": train_flags, "folds_dir": str(folds_dir), "tta": args.tta,
                                 "checkpoint": args.checkpoint, "folds": records, "summary": total}, indent=1)
    print_table(records, total)
    print(f"wrote {out / 'cv.json'}; out-of-fold predictions in {out / 'oof'}")


def main(argv=None):
    own, train_flags = split_argv(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(own)
    try:
        if args.compare:
            compare_pairs(args.compare)
        else:
            cross_validate(args, train_flags)
    except (CVError, DataError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
