"""A small synthetic data set in the competition's layout, for the demo, the tests and the benchmarks (data.py
--demo writes one): photo-like images with textured objects of every class, annotated as polygons, compressed RLE
and uncompressed RLE, and unlabeled test photos.

    make_demo("demo", num_images=48, num_unlabeled=16, seed=0)   # demo/train_all.json, demo/test.json, images
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from coco import COMPETITION_CLASSES
from outputs import write_json, writing

DEMO_SIZES = [(320, 320), (320, 240), (240, 320), (300, 225)]
# each demo class is painted in its own tint and stripe frequency, so that a small network can learn it
DEMO_TINTS = [(0, 0, 0), (192, 0, 128), (0, 128, 192), (0, 128, 64), (128, 0, 0), (64, 0, 128), (64, 0, 192),
              (192, 128, 64), (192, 192, 128), (64, 64, 128), (128, 0, 192)]
_DEMO_CLASS_WEIGHTS = np.array([3, 3, 2, 2, 1.5, 3, 1.5, 2, 0.6, 0.6])  # rare classes are drawn less often
DEMO_CLASS_PROB = _DEMO_CLASS_WEIGHTS / _DEMO_CLASS_WEIGHTS.sum()


def draw_demo_image(rng, out, index, labeled):
    """One photo-like synthetic image with 4-8 textured objects (some overlapping or cut by the border), saved
    under out; returns its COCO image entry and [(class, polygon, bitmap)]."""
    w, h = DEMO_SIZES[index % len(DEMO_SIZES)]
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(90, 170, 3)
    canvas = base + 30 * np.sin(xx / rng.uniform(40, 90))[..., None] + rng.normal(0, 8, (h, w, 3))
    objects = []
    # every class appears in the first ten images, then classes are drawn by their (imbalanced) weights
    n_obj = int(rng.integers(4, 9))
    classes = [index % 10 + 1] + list(rng.choice(np.arange(1, 11), n_obj - 1, p=DEMO_CLASS_PROB))
    for c in classes:
        cx, cy = rng.uniform(-0.05, 1.05) * w, rng.uniform(-0.05, 1.05) * h
        r = rng.uniform(0.1, 0.35) * min(w, h)
        n = int(rng.integers(5, 11))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = r * rng.uniform(0.6, 1.0, n)
        poly = np.stack([np.clip(cx + radii * np.cos(angles), 0, w - 1),
                         np.clip(cy + radii * np.sin(angles), 0, h - 1)], 1)
        bitmap = Image.new("L", (w, h), 0)
        ImageDraw.Draw(bitmap).polygon([tuple(p) for p in poly], fill=1)
        bitmap = np.array(bitmap, bool)
        if bitmap.sum() < 20:
            continue
        stripes = np.sin((xx + yy * (c % 3)) / (2 + c)) * 25
        color = np.array(DEMO_TINTS[c]) * 0.6 + 60 + rng.normal(0, 10, 3)
        canvas[bitmap] = (color + stripes[..., None] + rng.normal(0, 6, (h, w, 3)))[bitmap]
        objects.append((c, poly, bitmap))
    file_name = f"{'images' if labeled else 'test_images'}/demo_{index:04d}.jpg"
    with writing(out / file_name, out / file_name):
        Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(out / file_name, quality=90)
    return {"id": index + 1, "file_name": file_name, "width": w, "height": h}, objects


def demo_annotation(ann_id, image_id, c, poly, bitmap, k):
    """A polygon annotation; every 7th object (from the 4th) as compressed RLE, every 11th (from the 6th) as
    uncompressed RLE with iscrowd, so every segmentation format is exercised."""
    rle = mask_utils.encode(np.asfortranarray(bitmap.astype(np.uint8)))
    ann = {"id": ann_id, "image_id": image_id, "category_id": int(c), "area": float(mask_utils.area(rle)),
           "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
           "segmentation": [[round(float(v), 1) for v in poly.reshape(-1)]]}
    if k % 7 == 3:
        ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    elif k % 11 == 5:
        ann["segmentation"], ann["iscrowd"] = uncompressed_rle(bitmap), 1
    return ann


def make_demo(out_dir, num_images=48, num_unlabeled=16, seed=0):
    """A small synthetic set in the competition's layout: train_all.json (polygons and RLE, non-square images of
    every class) and test.json (unlabeled)."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "test_images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": n, "supercategory": n} for i, n in enumerate(COMPETITION_CLASSES) if i > 0]
    images, annotations = [], []
    for i in range(num_images):
        info, objects = draw_demo_image(rng, out, i, True)
        images.append(info)
        for k, (c, poly, bitmap) in enumerate(objects):
            annotations.append(demo_annotation(len(annotations) + 1, info["id"], c, poly, bitmap, k))
    write_json(out / "train_all.json", {"images": images, "annotations": annotations, "categories": categories})
    test_images = [draw_demo_image(rng, out, num_images + i, False)[0] for i in range(num_unlabeled)]
    write_json(out / "test.json", {"images": test_images, "categories": categories})
    return out


def uncompressed_rle(bitmap):
    flat = bitmap.astype(np.uint8).flatten(order="F")  # COCO RLE runs down columns, starting with zeros
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"size": list(bitmap.shape), "counts": [int(c) for c in counts]}
