"""A noisy copy of a COCO JSON with known corruptions, and a truth file, to measure label review on any labelled set.

    python tools/corrupt_labels.py --data-dir D --json train_all.json --output /tmp/noisy.json --truth /tmp/truth.json \
        --swap 0.1 --delete 0.1 --grow 0.05 --seed 0
    # the same corruptions in a copy of a folds folder: noisy train_fold<i>.json, untouched val_fold<i>.json
    python tools/corrupt_labels.py ... --folds-dir F --output-folds-dir F_noisy

Each annotation gets at most one corruption, drawn with the stated rates: swap (another category of the set, uniform),
delete, grow or shrink (the outline moved out or in by --margin x the square root of its area, at least 2 pixels;
written as RLE). The truth file lists each corrupted annotation with its kind, the image and the original category
and segmentation, so a deleted annotation can be matched to a found missing region.
"""
import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from coco import DataError, annotation_bitmap, read_json, resolve_json, rle_of  # noqa: E402
from outputs import write_json  # noqa: E402

KINDS = ("swap", "delete", "grow", "shrink")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--json", default="train_all.json")
    p.add_argument("--output", required=True, help="the noisy JSON (never the input)")
    p.add_argument("--truth", required=True, help="what was corrupted (JSON)")
    for kind, rate in zip(KINDS, (0.1, 0.1, 0.05, 0.0)):
        p.add_argument(f"--{kind}", type=float, default=rate, help=f"share of annotations (default {rate})")
    p.add_argument("--margin", type=float, default=0.1, help="grow/shrink by this x sqrt(area) pixels")
    p.add_argument("--min-area", type=float, default=0, help="only annotations of at least this area are corrupted")
    p.add_argument("--photos", type=float, default=1.0, metavar="SHARE",
                   help="only annotations in this share of the photos (drawn with the seed) are corrupted, so that "
                        "clean photos are left to rank against (default 1: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds-dir", help="also write a copy of this folds folder with noisy train folds")
    p.add_argument("--output-folds-dir")
    return p.parse_args(argv)


def moved_outline(ann, height, width, pixels):
    """The annotation's mask dilated (pixels > 0) or eroded (< 0) by |pixels|, as RLE; None if nothing is left."""
    bitmap = torch.from_numpy(annotation_bitmap(ann, height, width).astype(np.float32))[None, None]
    k = 2 * abs(pixels) + 1
    moved = F.max_pool2d(bitmap if pixels > 0 else -bitmap, k, stride=1, padding=abs(pixels))
    moved = (moved if pixels > 0 else -moved)[0, 0].numpy() > 0.5
    if not moved.any():
        return None, 0
    return rle_of(moved), int(moved.sum())


def corrupt(raw, rates, margin, seed, min_area=0, photos=1.0):
    """(noisy COCO dict, truth records). rates: kind -> share of the annotations of at least min_area in the
    corruptible photos (a `photos` share of them)."""
    if sum(rates.values()) > 1:
        raise ValueError("the corruption rates add up to more than 1")
    if not 0 <= photos <= 1:
        raise ValueError(f"--photos {photos}: a share from 0 to 1")
    rng = np.random.default_rng(seed)
    noisy = copy.deepcopy(raw)
    images = {img["id"]: img for img in noisy["images"]}
    # a stream of its own, so that the annotation draws of a seed do not depend on the photo share
    ids = sorted(images)
    corruptible = set(np.random.default_rng([seed, 1]).permutation(ids)[:round(photos * len(ids))].tolist())
    used = sorted({a["category_id"] for a in noisy.get("annotations", [])})
    names = {c["id"]: c["name"] for c in noisy.get("categories", [])}
    edges = np.cumsum([rates[k] for k in KINDS])
    kept, truth = [], []
    for ann in noisy.get("annotations", []):
        draw = rng.random()
        kind = next((k for k, edge in zip(KINDS, edges) if draw < edge), None)
        if float(ann.get("area", 0)) < min_area:
            kind = None
        if kind == "swap":  # drawn before the photo check, so that a spared photo leaves the stream as it was
            others = [c for c in used if c != ann["category_id"]]
            new = int(rng.choice(others)) if others else None
            if new is None:  # one category: nothing to swap to
                kind = None
        if ann["image_id"] not in corruptible:
            kind = None
        image = images[ann["image_id"]]
        record = {"annotation": ann["id"], "image": image["file_name"], "kind": kind,
                  "category": names.get(ann["category_id"])}
        if kind == "swap":
            record["to"] = names.get(new)
            ann["category_id"] = new
        elif kind == "delete":
            record["segmentation"] = ann["segmentation"]
            truth.append(record)
            continue
        elif kind in ("grow", "shrink"):
            step = max(2, round(margin * float(ann.get("area", 0)) ** 0.5)) * (1 if kind == "grow" else -1)
            seg, area = moved_outline(ann, image["height"], image["width"], step)
            if seg is None:  # shrunk to nothing: leave it as it was
                kind = None
            else:
                record["pixels"] = step
                ann["segmentation"], ann["area"] = seg, area
                ann["bbox"] = [float(v) for v in mask_utils.toBbox(seg)]
        if kind:
            truth.append(record)
        kept.append(ann)
    noisy["annotations"] = kept
    return noisy, truth


def write_noisy_folds(folds_dir, out_dir, noisy):
    """train_fold<i>.json with the noisy annotations of its images; val_fold<i>.json copied as it is."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(folds_dir.glob("val_fold*.json")):
        write_json(out_dir / path.name, read_json(path))
    for path in sorted(folds_dir.glob("train_fold*.json")):
        ids = {img["id"] for img in read_json(path)["images"]}
        fold = dict(noisy, images=[img for img in noisy["images"] if img["id"] in ids],
                    annotations=[a for a in noisy["annotations"] if a["image_id"] in ids])
        write_json(out_dir / path.name, fold)


def main(argv=None):
    args = parse_args(argv)
    source = resolve_json(args.data_dir, args.json)
    if Path(args.output).resolve() == source.resolve():
        sys.exit(f"error: --output {args.output} is the input JSON; write the noisy copy elsewhere")
    try:
        raw = read_json(source)
        rates = {k: getattr(args, k) for k in KINDS}
        noisy, truth = corrupt(raw, rates, args.margin, args.seed, args.min_area, args.photos)
    except (DataError, ValueError) as e:
        sys.exit(f"error: {source}: {e}")
    write_json(args.output, noisy)
    counts = {k: sum(r["kind"] == k for r in truth) for k in KINDS}
    write_json(args.truth, {"source": str(source), "seed": args.seed, "rates": rates, "margin": args.margin,
                            "min_area": args.min_area, "photos": args.photos,
                            "annotations": len(raw.get("annotations", [])), "counts": counts, "corrupted": truth})
    if args.folds_dir:
        write_noisy_folds(Path(args.folds_dir), Path(args.output_folds_dir or args.folds_dir + "_noisy"), noisy)
    print(f"{source}: {len(raw.get('annotations', []))} annotations, corrupted: "
          + ", ".join(f"{k} {n}" for k, n in counts.items()) + f" -> {args.output}, truth {args.truth}")


if __name__ == "__main__":
    main()
