"""Measure review.py against the truth file of tools/corrupt_labels.py (a benchmark: prints figures, writes JSON).

    python tools/review_bench.py --data-dir D --json /tmp/noisy.json --truth /tmp/truth.json \
        --review-dir review --oof-dirs runs/cv/oof/fold*

Suspect annotations: precision among the top K (K = the corrupted annotations still present: swaps, grown and
shrunk outlines) and recall at 2K, overall and per kind (K = that kind's count; also the kind's recall among the 2K
most doubtful of all); for swaps also how often the suggested class is the original one. Missing regions: matched
to deleted annotations of the same image at IoU >= 0.5 (each deletion once), precision among the top K
(K = deletions) and recall at 2K. Images ("has any corruption"):
average precision and AUROC of review.py's image score, of cleanlab's softmin label quality
(segmentation.rank.get_label_quality_scores, when cleanlab is installed: requirements-bench.txt) on the same
probabilities and noisy labels, and of the mean cross-entropy per image (what predict.py's per_image.csv holds).
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from coco import annotation_bitmap, load_coco, paint_mask  # noqa: E402
from outputs import read_predictions, read_probs, write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--json", required=True, help="the noisy JSON that was reviewed")
    p.add_argument("--truth", required=True)
    p.add_argument("--review-dir", required=True)
    p.add_argument("--oof-dirs", nargs="+", help="the predictions reviewed: adds the softmin and loss baselines")
    p.add_argument("--output", help="write the figures as JSON here")
    return p.parse_args(argv)


def average_precision(scores, positive):
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = np.asarray(positive, bool)[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def auroc(scores, positive):
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="stable")
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # ties share their mean rank
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def judged_annotations(coco, min_area):
    """Ids of the annotations with at least min_area pixels (the COCO area; review.py judges its visible pixels, a
    little fewer where annotations overlap): the ones review.py can rank at its --min-area."""
    judged = set()
    for img in coco.images:
        for ann in coco.anns_by_image.get(img["id"], []):
            if (ann.get("area") or annotation_bitmap(ann, img["height"], img["width"]).sum()) >= min_area:
                judged.add(ann["id"])
    return judged


def annotation_figures(suspects, truth, judged):
    ranked = [int(r["annotation"]) for r in suspects if r["annotation"] != "missing"]
    suggestion = {int(r["annotation"]): r["suggested"] for r in suspects if r["annotation"] != "missing"}
    kinds = {r["annotation"]: r for r in truth if r["kind"] != "delete"}
    out = {}
    total = len(kinds)
    for kind in ("all", "swap", "grow", "shrink"):
        wanted = {a for a, r in kinds.items() if kind == "all" or r["kind"] == kind}
        k = len(wanted)
        if not k:
            continue
        top_k, top_2k = ranked[:k], ranked[:2 * k]
        out[kind] = {"K": k, "precision_at_K": sum(a in wanted for a in top_k) / k,
                     "recall_at_2K": sum(a in wanted for a in top_2k) / k,
                     # the kind's share found among the 2K most doubtful of all (K = every corrupted annotation)
                     "recall_at_2K_all": sum(a in wanted for a in ranked[:2 * total]) / k}
        # the same among those large enough to be judged at review.py's --min-area: what its ranking can reach
        judgeable = wanted & judged
        if judgeable and len(judgeable) < k:
            out[kind]["K_judged"] = len(judgeable)
            out[kind]["precision_at_K_judged"] = sum(a in judgeable for a in ranked[:len(judgeable)]) / len(judgeable)
        if kind == "swap":
            found = [a for a in top_k if a in wanted]
            right = sum(suggestion[a] == kinds[a]["category"] for a in found)
            out[kind]["suggestion_right"] = right / len(found) if found else float("nan")
    return out


def missing_figures(review_dir, truth, images):
    """Deleted annotations found as missing regions (IoU >= 0.5, same image, each deletion once), in rank order."""
    found = json.loads((Path(review_dir) / "missing.json").read_text())["annotations"]
    deleted = [r for r in truth if r["kind"] == "delete"]
    k = len(deleted)
    if not k:
        return {}
    by_image = {}
    for r in deleted:
        img = images[r["image"]]
        by_image.setdefault(img["id"], []).append([annotation_bitmap(r, img["height"], img["width"]).astype(bool),
                                                   False, r["category"]])
    by_id = {img["id"]: img for img in images.values()}
    hits = []
    for region in found[:2 * k]:
        img = by_id[region["image_id"]]
        pixels = annotation_bitmap(region, img["height"], img["width"]).astype(bool)
        hit = False
        for item in by_image.get(region["image_id"], []):
            union = (pixels | item[0]).sum()
            if not item[1] and union and (pixels & item[0]).sum() / union >= 0.5:
                item[1] = hit = True
                break
        hits.append(hit)
    return {"K": k, "regions": len(found), "precision_at_K": sum(hits[:k]) / k, "recall_at_2K": sum(hits) / k}


def baseline_scores(coco, oof_dirs):
    """Per image file_name: (1 - cleanlab softmin quality or None, mean cross-entropy) against the noisy labels."""
    try:
        from cleanlab.segmentation.rank import get_label_quality_scores
    except ImportError:
        get_label_quality_scores = None
        print("cleanlab is not installed (pip install -r requirements-bench.txt): no softmin column")
    entries = {}
    for folder in oof_dirs:
        for e in read_predictions(folder)["images"]:
            entries[e["file_name"]] = (folder, e)
    out = {}
    for img in coco.images:
        folder, entry = entries[img["file_name"]]
        probs = read_probs(folder, entry, img["height"], img["width"]).numpy()
        label = paint_mask(img, coco.annotations(img), coco.cat_to_class).astype(np.int64)
        picked = np.take_along_axis(probs, label[None], 0)[0]
        loss = float(-np.log(np.clip(picked, 1e-8, None)).mean())
        softmin = None
        if get_label_quality_scores:
            quality, _ = get_label_quality_scores(label[None], probs[None], method="softmin", verbose=False)
            softmin = 1 - float(quality[0])
        out[img["file_name"]] = (softmin, loss)
    return out


def main(argv=None):
    args = parse_args(argv)
    truth = json.loads(Path(args.truth).read_text())["corrupted"]
    suspects = read_csv(Path(args.review_dir) / "suspects.csv")
    coco = load_coco(args.data_dir, args.json, check_files=False)
    images = {img["file_name"]: img for img in coco.images}
    min_area = json.loads((Path(args.review_dir) / "review.json").read_text())["settings"]["min_area"]
    figures = {"annotations": annotation_figures(suspects, truth, judged_annotations(coco, min_area)),
               "missing": missing_figures(args.review_dir, truth, images)}
    score = {r["image"]: float(r["score"]) for r in read_csv(Path(args.review_dir) / "images.csv")}
    names = sorted(score)
    dirty = {r["image"] for r in truth}
    positive = [n in dirty for n in names]
    rankings = {"review": [score[n] for n in names]}
    if args.oof_dirs:
        base = baseline_scores(coco, args.oof_dirs)
        if base[names[0]][0] is not None:
            rankings["softmin (cleanlab)"] = [base[n][0] for n in names]
        rankings["loss (per_image.csv)"] = [base[n][1] for n in names]
    figures["images"] = {"images": len(names), "corrupted": sum(positive),
                         **{k: {"AP": average_precision(v, positive), "AUROC": auroc(v, positive)}
                            for k, v in rankings.items()}}
    for kind, f in figures["annotations"].items():
        right = f"  suggestion right {f['suggestion_right']:.3f}" if "suggestion_right" in f else ""
        if "K_judged" in f:
            right += f"  (>= {min_area:g} px: K {f['K_judged']}, precision@K {f['precision_at_K_judged']:.3f})"
        print(f"annotations {kind:6s} K {f['K']:5d}  precision@K {f['precision_at_K']:.3f}  recall@2K "
              f"{f['recall_at_2K']:.3f}  recall@2K(all) {f['recall_at_2K_all']:.3f}{right}")
    if figures["missing"]:
        m = figures["missing"]
        print(f"missing regions   K {m['K']:5d}  precision@K {m['precision_at_K']:.3f}  recall@2K "
              f"{m['recall_at_2K']:.3f}  ({m['regions']} regions listed)")
    for name, f in figures["images"].items():
        if isinstance(f, dict):
            print(f"images {name:22s} AP {f['AP']:.3f}  AUROC {f['AUROC']:.3f}")
    print(f"({figures['images']['corrupted']} of {figures['images']['images']} images corrupted)")
    if args.output:
        write_json(args.output, figures, indent=1)
    return figures


if __name__ == "__main__":
    main()
