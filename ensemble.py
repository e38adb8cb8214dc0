"""Combine predictions of several runs (predict.py output dirs, or bare submission CSVs) into one.

    python ensemble.py preds/* --output-dir ensembles/soft
    python ensemble.py preds/a preds/b --weights 2 1 --mode hard --eval --data-dir data --json val.json
    python ensemble.py oof/a oof/b --search-weights --eval --json folds/val_fold0.json --output-dir ensembles/oof
    python ensemble.py preds/a preds/b --weights-from ensembles/oof/weights.json   # the chosen weights on test

Soft voting (default when every input has probs/): the weighted average of the class probabilities, resized to
each image's size, then argmax. Hard voting (--mode hard, or when an input has no probs): per pixel, the class with
the largest summed weight of the inputs' masks. Hard-vote ties go to the tied class with the largest summed
probability when every input has probs, else to the tied class of the first input (in command-line order) that
voted for one. Bare CSV inputs vote hard at the CSV's resolution and give a CSV only.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cleanup import remove_small_regions
from coco import DataError, default_cache_dir, load_coco, load_mask, open_mask_cache, read_mask
from metrics import confusion_matrix, segmentation_metrics
from outputs import (CONFIDENCE_BINS, PSEUDO_BALANCE, OutputError, add_confidences, balanced_thresholds, csv_row,
                     mask_name, prepare_output_dir, read_predictions, read_probs, save_pseudo, write_json,
                     pseudo_rule, write_pseudo, write_results, write_submission)


def read_input(path):
    """A predict.py output dir (its predictions.json) or a submission CSV -> dict describing it."""
    path = Path(path)
    if path.is_dir():
        info = read_predictions(path)
        return {"path": path, "kind": "dir", "class_names": info["class_names"], "data_dir": info.get("data_dir"),
                "images": {e["file_name"]: e for e in info["images"]},
                "order": [e["file_name"] for e in info["images"]],
                "has_probs": all("probs" in e for e in info["images"])}
    if path.suffix == ".csv" and path.is_file():
        csv.field_size_limit(1 << 30)  # a row holds 65,536 ids: far past the csv module's default limit
        rows = {}
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != ["image_id", "PredictionString"]:
                raise OutputError(f"{path}: header is {header}, expected image_id,PredictionString")
            for image_id, prediction in reader:
                rows[image_id] = np.array(prediction.split(), dtype=np.uint8)
        side = {int(round(len(v) ** 0.5)) for v in rows.values()}
        if len(side) != 1 or any(len(v) != next(iter(side)) ** 2 for v in rows.values()):
            raise OutputError(f"{path}: rows are not all square masks of one size")
        s = side.pop()
        return {"path": path, "kind": "csv", "class_names": None, "order": list(rows), "has_probs": False,
                "images": {k: {"file_name": k, "height": s, "width": s, "csv_mask": v.reshape(s, s)}
                           for k, v in rows.items()}}
    raise OutputError(f"{path}: neither a predict.py output dir nor a .csv file")


def check_inputs(inputs):
    """Same images with the same sizes (and class lists) everywhere, or an error naming what differs."""
    first = inputs[0]
    names = [i["class_names"] for i in inputs if i["class_names"]]
    if any(n != names[0] for n in names):
        raise OutputError("inputs have different class lists: " +
                           "; ".join(f"{i['path']}: {len(i['class_names'])} classes" for i in inputs if i["class_names"]))
    for other in inputs[1:]:
        a, b = set(first["images"]), set(other["images"])
        if a != b:
            diff = sorted(a ^ b)
            raise OutputError(f"{other['path']} and {first['path']} cover different images; differing image ids: "
                               f"{', '.join(diff[:10])}{' ...' if len(diff) > 10 else ''}")
        if other["kind"] == first["kind"] == "dir":
            sizes = [k for k in a if (first["images"][k]["height"], first["images"][k]["width"]) !=
                     (other["images"][k]["height"], other["images"][k]["width"])]
            if sizes:
                raise OutputError(f"{other['path']} and {first['path']} differ in image size for: "
                                   f"{', '.join(sorted(sizes)[:10])}")
    if len({i["kind"] for i in inputs}) > 1:
        raise OutputError("mix of CSV and directory inputs: give all of one kind")


def load_probs(inp, file_name, height, width):
    return read_probs(inp["path"], inp["images"][file_name], height, width)


def hard_vote(masks, weights, num_classes, tie_scores=None):
    """Per-pixel weighted majority of uint8 masks. Ties: largest tie_score (C, H, W) when given, else the class
    of the first mask that voted for a tied class."""
    votes = np.zeros((num_classes,) + masks[0].shape, np.float64)
    for mask, w in zip(masks, weights):
        np.add.at(votes, (mask.astype(np.int64),) + tuple(np.indices(mask.shape)), w)
    best = votes.max(0)
    tied = np.isclose(votes, best[None])
    if tie_scores is not None:
        return np.where(tied, tie_scores, -np.inf).argmax(0).astype(np.uint8)
    choice = np.full(masks[0].shape, 255, np.int64)
    for mask in masks:
        take = (choice == 255) & np.take_along_axis(tied, mask[None].astype(np.int64), 0)[0]
        choice[take] = mask[take]
    return choice.astype(np.uint8)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="predict.py output dirs, or submission CSVs")
    p.add_argument("--output-dir", default="ensembles/ensemble",
                   help="default ensembles/ensemble: outside preds/, so that preds/* stays the members")
    p.add_argument("--mode", choices=("soft", "hard"), help="default: soft when every input has probs/")
    p.add_argument("--weights", type=float, nargs="+", help="one per input (default all 1)")
    p.add_argument("--search-weights", action="store_true",
                   help="with --eval: choose the weights that maximise mIoU on --json (out-of-fold predictions), "
                        "print what was tried, write weights.json")
    p.add_argument("--weights-from", metavar="FILE", help="the weights a --search-weights run wrote (weights.json)")
    p.add_argument("--min-region", type=int, default=0, metavar="N",
                   help="regions (specks, holes) under N pixels at the image's size take the class around them")
    p.add_argument("--pseudo", action="store_true", help="write pseudo.json from the averaged probabilities")
    p.add_argument("--pseudo-threshold", type=float, metavar="T",
                   help="with --pseudo: one threshold for all classes in place of class-balanced selection: pixels "
                        "whose averaged top probability is below T are ignored in training (0: every pixel)")
    p.add_argument("--pseudo-balance", type=float, metavar="P",
                   help="with --pseudo: each predicted class keeps its P%% most confident pixels over all images (one "
                        f"threshold per class; the default, at {PSEUDO_BALANCE}, unless --pseudo-threshold is given)")
    p.add_argument("--csv-size", type=int, default=256)
    p.add_argument("--eval", action="store_true", help="score against --json's annotations")
    p.add_argument("--data-dir", help="default: the one predict.py used")
    p.add_argument("--json", help="labeled JSON for --eval")
    p.add_argument("--vis", type=int, default=0, metavar="N")
    p.add_argument("--mask-cache", default=str(default_cache_dir()))
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    try:
        run(args)
    except (OutputError, DataError) as e:  # a WriteError is an OutputError
        sys.exit(f"error: {e}")
    except OSError as e:  # a folder that cannot be made: the message names it
        sys.exit(f"error: {e}")


def vote_csvs(inputs, weights, out_dir, csv_size):
    """Hard vote of bare CSVs at the CSV's resolution; no class list, so ids 0..the largest seen."""
    num_classes = 1 + max(int(i["images"][k]["csv_mask"].max()) for i in inputs for k in i["order"])
    rows = [csv_row(name, hard_vote([i["images"][name]["csv_mask"] for i in inputs], weights, num_classes), csv_size)
            for name in inputs[0]["order"]]
    write_submission(out_dir / "submission.csv", rows)
    print(f"wrote {out_dir / 'submission.csv'} ({len(rows)} rows)")


def load_targets(data_dir, json_name, class_names, file_names, cache_flag):
    """Ground-truth masks of the predicted images, from a labeled JSON of the same images."""
    if not json_name:
        raise OutputError("--eval needs --json (a labeled JSON of the same images)")
    coco = load_coco(data_dir, json_name, class_names=class_names)
    if not coco.labeled:
        raise OutputError(f"{coco.json_path}: --eval needs annotations, and this JSON has none")
    index = {img["file_name"]: i for i, img in enumerate(coco.images)}
    missing = [k for k in file_names if k not in index]
    if missing:
        raise OutputError(f"{coco.json_path} lacks predicted images: {', '.join(missing[:10])}")
    cache = open_mask_cache(cache_flag)
    return {k: load_mask(coco, index[k], cache) for k in file_names}


def member_outputs(inputs, name, mode, soft_possible):
    """What the inputs say about one image, read once: (probabilities at the image's size or None, masks for a hard
    vote or None)."""
    h, w = inputs[0]["images"][name]["height"], inputs[0]["images"][name]["width"]
    probs = [load_probs(i, name, h, w) for i in inputs] if soft_possible else None
    masks = [read_mask(i["path"] / i["images"][name]["mask"]) for i in inputs] if mode == "hard" else None
    return probs, masks


def vote(outputs, weights, mode, num_classes):
    """(the voted uint8 mask, the weighted average of the probabilities or None) from member_outputs."""
    probs, masks = outputs
    summed = sum(wt * p for wt, p in zip(weights, probs)) / sum(weights) if probs else None
    if mode == "soft":
        return summed.argmax(0).to(torch.uint8).numpy(), summed
    return hard_vote(masks, weights, num_classes, None if summed is None else summed.numpy()), summed


def vote_image(inputs, weights, name, mode, soft_possible, num_classes, with_probs=False):
    """The voted uint8 mask of one image at its own size (with_probs: and the weighted average of the inputs'
    probabilities, None without them)."""
    mask, summed = vote(member_outputs(inputs, name, mode, soft_possible), weights, mode, num_classes)
    return (mask, summed) if with_probs else mask


SEARCH_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def ensemble_mious(inputs, weight_sets, targets, mode, soft_possible, class_names):
    """mIoU of each weighting, in one pass over the images (each read once, whatever the number of weightings)."""
    n = len(class_names)
    confusions = [torch.zeros(n, n, dtype=torch.int64) for _ in weight_sets]
    for name, target in targets.items():
        outputs, target = member_outputs(inputs, name, mode, soft_possible), torch.from_numpy(target)
        for confusion, weights in zip(confusions, weight_sets):
            confusion += confusion_matrix(torch.from_numpy(vote(outputs, weights, mode, n)[0]), target, n)
    return [segmentation_metrics(c, class_names)["mIoU"] for c in confusions]


def search_weights(inputs, weights, targets, mode, soft_possible, class_names, out_dir, args):
    """Coordinate ascent: each input's weight in turn over SEARCH_GRID, the others held, kept where mIoU on the
    labelled images rises; two passes. A weight of 0 leaves an input out. Each step scores its whole grid in one
    pass over the images. Prints the table, writes weights.json."""
    if not args.eval or not targets:
        raise OutputError("--search-weights needs --eval and a labelled --json of images no member trained on")
    labelled = {img["file_name"] for img in load_coco(args.data_dir or inputs[0]["data_dir"], args.json,
                                                       class_names=class_names).images}
    uncovered = sorted(labelled - set(inputs[0]["images"]))
    if uncovered:
        raise OutputError(f"the inputs do not cover {len(uncovered)} labelled images of {args.json} "
                          f"({', '.join(uncovered[:5])}): predict every one with each member")
    tried = {}

    def score(trials):  # scores the untried ones, in one pass
        new = [t for t in dict.fromkeys(tuple(t) for t in trials) if t not in tried]
        tried.update(zip(new, ensemble_mious(inputs, new, targets, mode, soft_possible, class_names)) if new else ())

    best, equal = tuple(weights), (1.0,) * len(inputs)
    score([best, equal])
    print("| " + " | ".join(str(i["path"]) for i in inputs) + " | mIoU |\n|" + "---|" * (len(inputs) + 1))
    for _ in range(2):
        for k in range(len(inputs)):
            trials = [t for t in (best[:k] + (v,) + best[k + 1:] for v in SEARCH_GRID) if sum(t) > 0 and t not in tried]
            score(trials)
            for trial in trials:
                print("| " + " | ".join(f"{w:g}" for w in trial) + f" | {100 * tried[trial]:.2f} |", flush=True)
                if tried[trial] > tried[best]:
                    best = trial
    print(f"chosen weights {list(best)}: mIoU {100 * tried[best]:.2f} (equal weights: {100 * tried[equal]:.2f})")
    write_json(out_dir / "weights.json", {"inputs": [str(i["path"]) for i in inputs], "weights": list(best),
                                          "mIoU": tried[best], "json": str(args.json),
                                          "tried": [{"weights": list(w), "mIoU": m} for w, m in tried.items()]}, 1)
    return list(best)


def read_weights(path):
    try:
        return [float(w) for w in json.loads(Path(path).read_text())["weights"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(f"{path}: not a weights.json of ensemble.py --search-weights ({e})") from None


def pseudo_threshold(inputs, weights, mode, soft_possible, class_names, args):
    """One threshold for all classes (--pseudo-threshold), or by default one per class (class-balanced, from a first
    pass over every image's averaged probabilities)."""
    threshold, balance = args.pseudo_threshold, args.pseudo_balance
    if balance is None:
        return threshold
    histogram = torch.zeros(len(class_names), CONFIDENCE_BINS, dtype=torch.int64)
    for name in inputs[0]["order"]:
        probs = vote_image(inputs, weights, name, mode, soft_possible, len(class_names), with_probs=True)[1]
        add_confidences(probs, histogram)
    thresholds = balanced_thresholds(histogram, balance / 100)
    print(f"class-balanced pseudo labels ({balance:g}% of each class): thresholds " +
          ", ".join(f"{n} {float(t):.3f}" for n, t, c in zip(class_names, thresholds, histogram.sum(1)) if c > 0))
    return thresholds


def run(args):
    args.pseudo_threshold, args.pseudo_balance = pseudo_rule(args.pseudo, args.pseudo_threshold, args.pseudo_balance)
    out_dir = Path(args.output_dir)
    paths = [Path(i) for i in args.inputs if Path(i).resolve() != out_dir.resolve()]  # `preds/*` may hold it
    # one input is enough to re-threshold its pseudo labels or clean its masks without running the network again
    if len(paths) < (1 if args.pseudo or args.min_region else 2):
        raise OutputError(f"need at least two inputs besides {out_dir} (one with --pseudo or --min-region), "
                          f"got {len(paths)}")
    weights = read_weights(args.weights_from) if args.weights_from else args.weights or [1.0] * len(paths)
    if len(weights) != len(paths):
        raise OutputError(f"{len(weights)} weights for {len(paths)} inputs")
    inputs = [read_input(p) for p in paths]
    check_inputs(inputs)
    soft_possible = all(i["has_probs"] for i in inputs)
    mode = args.mode or ("soft" if soft_possible else "hard")
    if mode == "soft" and not soft_possible:
        raise OutputError("soft voting needs probs/ in every input: " +
                          ", ".join(str(i["path"]) for i in inputs if not i["has_probs"]))
    first = inputs[0]
    out_dir = prepare_output_dir(out_dir, args.force)
    print(f"{mode} voting over {len(inputs)} inputs ({', '.join(map(str, paths))}), weights {weights} -> {out_dir}")
    if first["kind"] == "csv":
        return vote_csvs(inputs, weights, out_dir, args.csv_size)
    class_names, data_dir = first["class_names"], args.data_dir or first["data_dir"]
    targets = load_targets(data_dir, args.json, class_names, first["order"], args.mask_cache) if args.eval else {}
    if args.search_weights:
        weights = search_weights(inputs, weights, targets, mode, soft_possible, class_names, out_dir, args)
    if args.pseudo and not soft_possible:
        raise OutputError("--pseudo needs probs/ in every input: pseudo labels come from the averaged probabilities")
    threshold = pseudo_threshold(inputs, weights, mode, soft_possible, class_names, args) if args.pseudo else None
    results, manifest = [], []
    kept = torch.zeros(len(class_names), 2, dtype=torch.int64)
    for name in first["order"]:
        mask, probs = vote_image(inputs, weights, name, mode, soft_possible, len(class_names), with_probs=True)
        results.append((name, remove_small_regions(mask, args.min_region), targets.get(name)))
        manifest.append({"file_name": name, "height": first["images"][name]["height"],
                         "width": first["images"][name]["width"], "mask": mask_name(name)})
        if args.pseudo:
            manifest[-1]["pseudo_mask"] = save_pseudo(out_dir, name, probs, threshold, class_names, kept)
    write_results(out_dir, class_names, results, data_dir, args.csv_size, args.vis, bool(args.eval),
                  {"inputs": [str(p) for p in paths], "weights": weights, "mode": mode})
    write_json(out_dir / "predictions.json", {"class_names": class_names, "data_dir": data_dir, "mode": mode,
                                              "inputs": [str(p) for p in paths], "images": manifest})
    if args.pseudo:
        write_pseudo(out_dir, class_names, manifest, threshold, kept)
    print(f"wrote {out_dir / 'submission.csv'} ({len(results)} rows)")


if __name__ == "__main__":
    main()
