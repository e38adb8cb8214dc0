"""Find the doubtful labels of a COCO JSON from out-of-fold predictions: single annotations whose pixels the models
confidently call another class, and Background regions they confidently call an object (missing annotations).

    python review.py runs/cv/oof/fold* --data-dir D --json train_all.json --output-dir review --vis 24
    python train.py --exclude review/exclude.txt ...            # retrain without the doubtful photos
    python train.py --train-json review/relabel.json ...        # or on the suggestions, once checked

Inputs: predict.py --eval folders with probs/ that together cover the JSON's labelled images once each, each image
predicted by a model that did not train on it (cv.py writes them as <run>/oof/fold<i>). One image's probabilities
are read at a time, so memory does not grow with the set.

Scores, with T = --threshold:
- annotation (of >= --min-area visible pixels): its visible pixels are those it keeps once larger annotations are
  painted under it (what training sees). share = the fraction of them whose top class is another class with
  probability >= T; suggested = the most common such class; confidence = the mean probability of `suggested` over
  its pixels; doubt = share x confidence.
- missing region: a connected region (4-neighbours) of >= --min-area pixels, at the image's own size, that the label
  calls Background and the models call one object class with probability >= T. share = its part of the predicted
  object around it (a whole object unlabelled: 1; a rim an outline left out: small); doubt = share x confidence.
- image: by default (--image-score own) 1 - the probability the models give each pixel's labelled class, at the
  image's 5th percentile: its worst 5% of pixels, small annotations, outlines and unlabelled objects included, so one
  wrong annotation spoils a photo however many right ones lie beside it; `max` is the doubt of its most doubtful
  suspect, `sum` adds the doubts up, `area` is the share of its pixels whose top class differs from the label with
  probability >= T. `own` ranked photos above `max` on every noisy copy measured, `max` above `sum` and `area`
  (docs/results.md).
Outputs: suspects.csv (most doubtful first), images.csv (worst first), exclude.txt (images scoring >= --exclude-above,
for --exclude), relabel.json (the input with suggested classes written in; see --relabel-above), missing.json (the
missing regions as COCO annotations), review.json (counts, settings, time), vis/ (--vis N).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from cleanup import region_labels
from coco import DataError, annotation_bitmap, load_coco, paint_owners, read_image, read_json, resolve_json, rle_of
from outputs import (OutputError, read_predictions, read_probs, save_picture, write_json, write_review_images,
                     write_suspects, writing)
from pictures import suspect_picture

class ReviewError(ValueError):
    """The inputs cannot be reviewed: the message names the folder or file and what is wrong."""


OWN_QUANTILE = 0.05  # --image-score own: the worst 5% of an image's pixels
EXCLUDE_OWN, EXCLUDE_DOUBT = 0.95, 0.5  # --exclude-above's defaults, measured: docs/results.md


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("oof_dirs", nargs="+", help="predict.py --eval output folders with probs/ (out-of-fold)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--json", default="train_all.json", help="the labelled COCO JSON to review")
    p.add_argument("--output-dir", default="review")
    p.add_argument("--threshold", type=float, default=0.0, metavar="T",
                   help="a pixel disagrees when another class has top probability >= T (default %(default)s: "
                        "whenever another class is on top; the doubt still weighs by confidence; measured best)")
    p.add_argument("--min-area", type=int, default=1000, metavar="PX",
                   help="smallest annotation (visible pixels) or missing region judged, in pixels at the image's "
                        "size: a few pixels are no evidence (default %(default)s)")
    p.add_argument("--min-share", type=float, default=0.1,
                   help="suspects (annotations and missing regions) listed from this share on (default %(default)s)")
    p.add_argument("--image-score", choices=("own", "max", "sum", "area"), default="own")
    p.add_argument("--exclude-above", type=float, metavar="SCORE",
                   help=f"exclude.txt lists the images scoring at least this (default {EXCLUDE_OWN} for the image "
                        f"score own: 5%% of the pixels at most {1 - EXCLUDE_OWN:.2f} sure of their label; "
                        f"{EXCLUDE_DOUBT} for the others)")
    p.add_argument("--relabel-above", type=float, default=0.5, metavar="DOUBT",
                   help="relabel.json takes suggestions from this doubt on (default %(default)s)")
    p.add_argument("--vis", type=int, default=0, metavar="N", help="pictures of the N most doubtful suspects")
    p.add_argument("--partial", action="store_true", help="review only the labelled images the folders cover")
    p.add_argument("--force", action="store_true", help="replace the outputs of an existing --output-dir")
    args = p.parse_args(argv)
    if args.exclude_above is None:
        args.exclude_above = EXCLUDE_OWN if args.image_score == "own" else EXCLUDE_DOUBT
    return args


# ----------------------------------------------------------------------------- inputs

def read_oof(dirs):
    """file_name -> (folder, entry) over disjoint predict.py folders that all hold probs; and their class list."""
    by_image, class_names = {}, None
    for folder in map(Path, dirs):
        info = read_predictions(folder)
        if class_names is None:
            class_names = info["class_names"]
        elif info["class_names"] != class_names:
            raise ReviewError(f"{folder}: its class list differs from {dirs[0]}'s")
        if not (folder / "probs").is_dir() or any("probs" not in e for e in info["images"] if "skipped" not in e):
            raise ReviewError(f"{folder}: no probs/ folder (predict.py --no-probs?): review needs the probabilities")
        for entry in info["images"]:
            if "skipped" in entry:
                continue
            if entry["file_name"] in by_image:
                raise ReviewError(f"{entry['file_name']} is predicted twice, in {by_image[entry['file_name']][0]} and "
                                  f"{folder}: give each image's out-of-fold prediction once")
            by_image[entry["file_name"]] = (folder, entry)
    return by_image, class_names


def match_images(coco, by_image, partial):
    """The labelled images to review, in JSON order; an uncovered one is an error unless partial."""
    images = [img for img in coco.images if img["file_name"] in by_image]
    missing = [img["file_name"] for img in coco.images if img["file_name"] not in by_image]
    if missing and not partial:
        raise ReviewError(f"{coco.json_path}: {len(missing)} labelled image(s) have no out-of-fold prediction, e.g. "
                          f"{', '.join(missing[:5])}; predict every fold, or --partial to review the rest")
    extra = set(by_image) - {img["file_name"] for img in coco.images}
    if extra:
        print(f"note: {len(extra)} predicted image(s) are not in {coco.json_path}; ignored")
    for img in images:
        entry = by_image[img["file_name"]][1]
        if (entry["height"], entry["width"]) != (img["height"], img["width"]):
            raise ReviewError(f"{img['file_name']}: predicted at {entry['width']}x{entry['height']} but "
                              f"{coco.json_path} says {img['width']}x{img['height']}")
    return images


def image_probs(source, image, num_classes):
    """An image's saved probabilities at its size, or a ReviewError naming the file."""
    folder, entry = source
    try:
        probs = read_probs(folder, entry, image["height"], image["width"])
    except (OSError, ValueError, EOFError) as e:
        raise ReviewError(f"{Path(folder) / entry['probs']}: cannot read the probabilities ({e})") from None
    if probs.ndim != 3 or probs.shape[0] != num_classes:
        raise ReviewError(f"{Path(folder) / entry['probs']}: shape {tuple(probs.shape)}, expected {num_classes} "
                          "classes first")
    return probs


# ----------------------------------------------------------------------------- scoring one image

def score_annotations(owner, label, top, confidence, num_anns, num_classes, threshold):
    """Per annotation: visible pixels, share, suggested class, its mean probability (arrays of length num_anns)."""
    shown = owner >= 0
    who, cls = owner[shown], top[shown]
    disagree = (cls != label[shown]) & (confidence[shown] >= threshold)
    visible = np.bincount(who, minlength=num_anns)
    pair = who[disagree] * num_classes + cls[disagree]
    counts = np.bincount(pair, minlength=num_anns * num_classes).reshape(num_anns, num_classes)
    sums = np.bincount(pair, weights=confidence[shown][disagree],
                       minlength=num_anns * num_classes).reshape(num_anns, num_classes)
    suggested = counts.argmax(1)
    rows = np.arange(num_anns)
    share = counts.sum(1) / np.maximum(visible, 1)
    mean_conf = sums[rows, suggested] / np.maximum(counts[rows, suggested], 1)
    return visible, share, suggested, mean_conf


def missing_regions(label, top, confidence, threshold, min_area):
    """[(region as RLE, class, area, share, confidence)] of confidently predicted unlabelled objects."""
    candidate = np.where((label == 0) & (top != 0) & (confidence >= threshold), top, 0).astype(np.uint8)
    if not candidate.any():
        return []
    regions = region_labels(candidate)
    sizes = np.bincount(regions.ravel(), minlength=regions.size)
    objects = region_labels(top.astype(np.uint8))  # the predicted object each candidate region lies in
    object_sizes = np.bincount(objects.ravel(), minlength=objects.size)
    found = []
    for r in np.unique(regions[candidate > 0]):
        if sizes[r] < min_area:
            continue
        pixels = regions == r
        at = np.unravel_index(r, regions.shape)  # a region's label is the flat index of one of its pixels
        found.append((rle_of(pixels), int(candidate[at]), int(sizes[r]), float(sizes[r] / object_sizes[objects[at]]),
                      float(confidence[pixels].mean())))
    return found


def review_image(image, anns, probs, cat_to_class, class_names, args):
    """Suspects of one image (dicts with the suspects.csv fields plus doubt, and the region mask of missing ones), and
    its pixel-based image scores (area, own)."""
    label, owner, anns = paint_owners(image, anns, cat_to_class)
    confidence, top = probs.max(0)
    confidence, top = confidence.numpy(), top.numpy().astype(np.int64)
    visible, share, suggested, mean_conf = score_annotations(owner, label, top, confidence, len(anns),
                                                             len(class_names), args.threshold)
    own = torch.gather(probs, 0, torch.from_numpy(label).long()[None])[0].numpy()  # each pixel's probability of its label
    shown = owner >= 0
    own_mean = np.bincount(owner[shown], weights=own[shown], minlength=len(anns)) / np.maximum(visible, 1)
    suspects = []
    for i, ann in enumerate(anns):
        if visible[i] >= args.min_area and share[i] > 0 and share[i] >= args.min_share:
            suspects.append({"image": image["file_name"], "annotation": ann.get("id"),
                             "labelled": class_names[cat_to_class[ann["category_id"]]],
                             "suggested": class_names[suggested[i]], "share": float(share[i]),
                             "confidence": float(mean_conf[i]), "area": int(visible[i]),
                             "own": float(own_mean[i]), "doubt": float(share[i] * mean_conf[i])})
    for rle, cls, area, region_share, conf in missing_regions(label, top, confidence, args.threshold,
                                                                 args.min_area):
        if region_share < args.min_share:
            continue
        suspects.append({"image": image["file_name"], "annotation": "missing", "labelled": "",
                         "suggested": class_names[cls], "share": region_share, "confidence": conf, "area": area,
                         "doubt": region_share * conf, "rle": rle})
    pixels = {"area": float(((top != label) & (confidence >= args.threshold)).mean()),
              "own": 1 - float(np.quantile(own, OWN_QUANTILE))}
    return suspects, pixels


def image_score(suspects, pixels, how):
    """max: the most doubtful suspect's doubt; sum: all doubts added; area: the share of the image's pixels whose
    top class differs from the label with probability >= T; own: 1 - the labelled class's probability at the
    OWN_QUANTILE of the image's pixels."""
    if how in pixels:
        return pixels[how]
    doubts = [s["doubt"] for s in suspects]
    if not doubts:
        return 0.0
    return max(doubts) if how == "max" else float(sum(doubts))


# ----------------------------------------------------------------------------- outputs

def write_exclude(path, scores, above, how):
    names = [name for name, score, _ in scores if score >= above]
    with writing(path, path):
        Path(path).write_text(f"# review.py: {len(names)} image(s) whose image score ({how}) is >= {above}\n" +
                              "".join(name + "\n" for name in names))
    return len(names)


def category_ids(raw, cat_to_class):
    """class index -> the JSON's category id (the first category mapped to it)."""
    ids = {}
    for cat in raw.get("categories", []):
        ids.setdefault(cat_to_class[cat["id"]], cat["id"])
    return ids


def write_relabel(path, raw, suspects, image_ids, cat_to_class, class_names, above):
    """The input JSON with suggestions from `above` on: a suspect annotation takes its suggested class (one suggested
    as Background is only marked), a missing region becomes a new annotation; each carries a "review" record."""
    index_of = {name: i for i, name in enumerate(class_names)}
    ids = category_ids(raw, cat_to_class)
    by_id = {a.get("id"): a for a in raw.get("annotations", [])}
    next_id = max([a.get("id", 0) for a in raw.get("annotations", []) if isinstance(a.get("id"), int)] + [0]) + 1
    changed = added = 0
    for s in suspects:
        record = {"suggested": s["suggested"], "share": round(s["share"], 4), "confidence": round(s["confidence"], 4)}
        target = ids.get(index_of[s["suggested"]])
        if s["annotation"] != "missing":
            ann = by_id.get(s["annotation"])
            if ann is None:
                continue
            ann["review"] = dict(record, labelled=s["labelled"], own=round(s["own"], 4))
            if s["doubt"] >= above and target is not None:
                ann["category_id"] = target
                changed += 1
        elif s["doubt"] >= above and target is not None:
            raw["annotations"].append({"id": next_id, "image_id": image_ids[s["image"]], "category_id": target,
                                       "segmentation": s["rle"], "area": int(s["area"]), "iscrowd": 0,
                                       "bbox": [float(v) for v in mask_utils.toBbox(s["rle"])],
                                       "review": dict(record, missing=True)})
            next_id += 1
            added += 1
    write_json(path, raw)
    return changed, added


def write_missing(path, raw, suspects, image_ids, cat_to_class, class_names):
    """Every missing region as an annotation of a COCO file over the input's images and categories (ids from 1;
    "review" holds share and confidence), to look at in an annotation tool or to match against known deletions."""
    index_of = {name: i for i, name in enumerate(class_names)}
    ids = category_ids(raw, cat_to_class)
    anns = [{"id": n + 1, "image_id": image_ids[s["image"]], "category_id": ids.get(index_of[s["suggested"]]),
             "segmentation": s["rle"], "area": s["area"], "iscrowd": 0,
             "bbox": [float(v) for v in mask_utils.toBbox(s["rle"])],
             "review": {"share": round(s["share"], 4), "confidence": round(s["confidence"], 4)}}
            for n, s in enumerate(x for x in suspects if x["annotation"] == "missing")]
    write_json(path, {"images": raw["images"], "categories": raw.get("categories", []), "annotations": anns})


def draw_suspect(out_path, data_dir, suspect, pixels, label, pred, class_names):
    what = (f"annotation {suspect['annotation']}: {suspect['labelled']} -> {suspect['suggested']}"
            if suspect["annotation"] != "missing" else f"missing {suspect['suggested']} ({suspect['area']} px)")
    photo = read_image(Path(data_dir) / suspect["image"]).permute(1, 2, 0).numpy()
    save_picture(suspect_picture(photo, pixels, label, pred, class_names, suspect["image"],
                                 f"{what}, share {suspect['share']:.2f}, confidence {suspect['confidence']:.2f}"),
                 out_path)


def write_gallery(out_dir, worst, coco, by_image, class_names, args):
    """Pictures of the most doubtful suspects, one image's probabilities read again at a time."""
    by_name = {img["file_name"]: img for img in coco.images}
    out_dir.mkdir(parents=True, exist_ok=True)
    for rank, s in enumerate(worst):
        image = by_name[s["image"]]
        label, owner, anns = paint_owners(image, coco.annotations(image), coco.cat_to_class)
        pred = image_probs(by_image[s["image"]], image, len(class_names)).argmax(0).numpy().astype(np.uint8)
        if s["annotation"] == "missing":
            pixels = annotation_bitmap({"segmentation": s["rle"]}, image["height"], image["width"]).astype(bool)
        else:
            pixels = owner == next(i for i, a in enumerate(anns) if a.get("id") == s["annotation"])
        draw_suspect(out_dir / f"{rank:03d}_{Path(s['image']).stem}.png", args.data_dir, s, pixels,
                     label.astype(np.uint8), pred, class_names)


# ----------------------------------------------------------------------------- main

def prepare(out_dir, force):
    names = ("suspects.csv", "images.csv", "exclude.txt", "relabel.json", "missing.json", "review.json")
    if out_dir.exists() and any((out_dir / n).exists() for n in names) and not force:
        raise ReviewError(f"{out_dir} already holds a review; use --force to replace it or another --output-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "vis").glob("*.png"):
        old.unlink()


def run(args):
    started = time.time()
    by_image, class_names = read_oof(args.oof_dirs)
    coco = load_coco(args.data_dir, args.json, class_names, check_files=False)
    if not coco.labeled:
        raise ReviewError(f"{coco.json_path}: has no annotations to review")
    images = match_images(coco, by_image, args.partial)
    out_dir = Path(args.output_dir)
    if out_dir.resolve() == coco.json_path.parent.resolve():
        raise ReviewError(f"--output-dir {out_dir} is the JSON's folder: relabel.json must never sit beside "
                          "the data it was made from; choose another folder")
    prepare(out_dir, args.force)
    suspects, scores = [], []
    for n, image in enumerate(images):
        probs = image_probs(by_image[image["file_name"]], image, len(class_names))
        found, pixels = review_image(image, coco.annotations(image), probs, coco.cat_to_class, class_names, args)
        scores.append((image["file_name"], image_score(found, pixels, args.image_score), len(found)))
        suspects += found
        if (n + 1) % 200 == 0:
            print(f"{n + 1}/{len(images)} images")
    suspects.sort(key=lambda s: (-s["doubt"], -s["area"]))
    scores.sort(key=lambda row: -row[1])
    write_suspects(out_dir / "suspects.csv", suspects)
    write_review_images(out_dir / "images.csv", scores)
    excluded = write_exclude(out_dir / "exclude.txt", scores, args.exclude_above, args.image_score)
    if excluded > len(images) / 2:
        print(f"note: exclude.txt lists {excluded} of {len(images)} photos: the models doubt most of them, which says "
              "more about the models (trained too little to judge?) than the labels; read images.csv first")
    raw = read_json(resolve_json(args.data_dir, args.json))
    image_ids = {img["file_name"]: img["id"] for img in coco.images}
    write_missing(out_dir / "missing.json", raw, suspects, image_ids, coco.cat_to_class, class_names)
    changed, added = write_relabel(out_dir / "relabel.json", raw, suspects, image_ids, coco.cat_to_class,
                                   class_names, args.relabel_above)
    if args.vis:
        write_gallery(out_dir / "vis", suspects[:args.vis], coco, by_image, class_names, args)
    seconds = time.time() - started
    summary = {"json": str(coco.json_path), "oof_dirs": [str(d) for d in args.oof_dirs], "images": len(images),
               "suspect_annotations": sum(s["annotation"] != "missing" for s in suspects),
               "missing_regions": sum(s["annotation"] == "missing" for s in suspects), "excluded": excluded,
               "relabelled": changed, "added": added, "seconds": round(seconds, 1),
               "settings": {k: getattr(args, k) for k in ("threshold", "min_area", "min_share", "image_score",
                                                          "exclude_above", "relabel_above")}}
    write_json(out_dir / "review.json", summary, indent=1)
    print(f"{len(images)} images: {summary['suspect_annotations']} suspect annotations, {summary['missing_regions']} "
          f"missing regions; {excluded} images in exclude.txt; relabel.json: {changed} classes changed, {added} "
          f"annotations added ({seconds:.0f} s) -> {out_dir}")
    return summary


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ReviewError, DataError, OutputError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
