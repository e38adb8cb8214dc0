"""Data: class list and palette, COCO loading and checks, masks (cached), datasets, augmentation, copy-paste,
a synthetic demo set, and a summary / visualisation command.

    python data.py --demo demo                                  # write a small synthetic data set
    python data.py --data-dir demo --json train_all.json        # summary: sizes, objects, pixel shares, weights
    python data.py --data-dir demo --vis 8 --output-dir vis     # overlay PNGs
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import v2

IGNORE_INDEX = 255  # pixel value no loss or metric counts; class indices stay below it
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: torchvision backbones were trained with them
STD = (0.229, 0.224, 0.225)

COMPETITION_CLASSES = ["Background", "General trash", "Paper", "Paper pack", "Metal", "Glass", "Plastic",
                       "Styrofoam", "Plastic bag", "Battery", "Clothing"]
COMPETITION_COLORS = [(0, 0, 0), (192, 0, 128), (0, 128, 192), (0, 128, 64), (128, 0, 0), (64, 0, 128),
                      (64, 0, 192), (192, 128, 64), (192, 192, 128), (64, 64, 128), (128, 0, 192)]


class DataError(ValueError):
    """Bad input data: the message names the file (and image or annotation) and the problem."""


# ----------------------------------------------------------------------------- classes and palette

def class_names_from_categories(categories):
    """Background + the categories' names in id order. A category called 'background' is class 0, not a new one."""
    names = ["Background"]
    for cat in sorted(categories, key=lambda c: c["id"]):
        if cat["name"].lower() != "background":
            names.append(cat["name"])
    return names


def palette(class_names):
    """One RGB colour per class: the competition's classes always get their fixed colours, others a spread of hues."""
    fixed = dict(zip(COMPETITION_CLASSES, COMPETITION_COLORS))
    colors = []
    for i, name in enumerate(class_names):
        if name in fixed:
            colors.append(fixed[name])
        else:  # golden-ratio hue steps keep neighbouring classes apart; the same index always gets the same colour
            h = (i * 0.618033988749895) % 1.0
            colors.append(tuple(int(255 * c) for c in _hsv_to_rgb(h, 0.75, 0.95)))
    return colors


def _hsv_to_rgb(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


# ----------------------------------------------------------------------------- COCO loading and checks

class CocoSet:
    """A COCO JSON under a data root, checked, with its annotations mapped onto a run's class list."""

    def __init__(self, data_dir, json_path, images, anns_by_image, cat_to_class, class_names, labeled):
        self.data_dir = Path(data_dir)
        self.json_path = Path(json_path)
        self.images = images                  # list of image dicts, JSON order
        self.anns_by_image = anns_by_image    # image id -> list of annotation dicts
        self.cat_to_class = cat_to_class      # category id -> class index
        self.class_names = class_names
        self.labeled = labeled                # the JSON has an "annotations" list

    def __len__(self):
        return len(self.images)

    def image_path(self, image):
        return self.data_dir / image["file_name"]

    def annotations(self, image):
        return self.anns_by_image.get(image["id"], [])


def resolve_json(data_dir, json_name):
    """A JSON named relative to the data root, or by an absolute / existing path."""
    p = Path(json_name)
    return p if p.is_absolute() or p.exists() and not (Path(data_dir) / p).exists() else Path(data_dir) / p


def load_coco(data_dir, json_name, class_names=None, skip_bad=False, check_files=True):
    """Load and check a COCO JSON. With class_names (a run's class list) categories are matched by name; without,
    the class list is made from this JSON. Problems raise one DataError listing them, or with skip_bad are
    dropped with one warning that counts them."""
    path = resolve_json(data_dir, json_name)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise DataError(f"{path}: not a COCO file (no 'images' list)")

    categories = raw.get("categories") or []
    if class_names is None:
        class_names = class_names_from_categories(categories)
    index_of = {name: i for i, name in enumerate(class_names)}
    cat_to_class = {}
    for cat in categories:
        name = "Background" if cat["name"].lower() == "background" else cat["name"]
        if name not in index_of:
            raise DataError(f"{path}: category '{cat['name']}' (id {cat['id']}) is not in the run's class list; "
                            f"known names: {', '.join(class_names)}")
        cat_to_class[cat["id"]] = index_of[name]

    problems = []  # (message, kind, key) — kind 'image' drops the image, 'ann' drops the annotation
    images, seen = [], set()
    for i, img in enumerate(raw["images"]):
        missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
        if missing:
            problems.append((f"image entry #{i} lacks {', '.join(missing)}", None, None))
            continue
        if img["id"] in seen:
            problems.append((f"duplicate image id {img['id']} ({img['file_name']})", None, None))
            continue
        seen.add(img["id"])
        if check_files:
            msg = _check_image_file(Path(data_dir) / img["file_name"], img)
            if msg:
                problems.append((msg, None, None))
                continue
        images.append(img)
    kept_ids = {img["id"] for img in images}

    anns_by_image = {}
    for ann in raw.get("annotations") or []:
        where = f"annotation {ann.get('id', '?')}"
        image_id = ann.get("image_id")
        if image_id not in seen:
            problems.append((f"{where} refers to unknown image id {image_id}", None, None))
            continue
        if ann.get("category_id") not in cat_to_class:
            problems.append((f"{where} has unknown category id {ann.get('category_id')}", None, None))
            continue
        msg = _check_segmentation(ann.get("segmentation"))
        if msg:
            problems.append((f"{where} (image id {image_id}): {msg}", None, None))
            continue
        if image_id in kept_ids:
            anns_by_image.setdefault(image_id, []).append(ann)

    if problems:
        lines = [p[0] for p in problems]
        shown = "\n  ".join(lines[:10]) + (f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else "")
        if not skip_bad:
            raise DataError(f"{path}: {len(lines)} problem(s):\n  {shown}\n(use --skip-bad to skip them)")
        warnings.warn(f"{path}: skipping {len(lines)} bad entries:\n  {shown}", stacklevel=2)
    labeled = "annotations" in raw or bool(images) and all("mask_file" in img for img in images)
    return CocoSet(data_dir, path, images, anns_by_image, cat_to_class, class_names, labeled)


def _check_image_file(file, img):
    if not file.is_file():
        return f"image file {file} (id {img['id']}) not found"
    try:
        with Image.open(file) as im:  # reads the header only
            size = im.size
    except Exception as e:
        return f"image file {file} (id {img['id']}) cannot be read: {e}"
    if size != (img["width"], img["height"]):
        return f"image file {file} (id {img['id']}) is {size[0]}x{size[1]} but the JSON says {img['width']}x{img['height']}"
    return None


def _check_segmentation(seg):
    if isinstance(seg, dict):
        return None if "counts" in seg and "size" in seg else "RLE segmentation lacks 'counts' or 'size'"
    if not isinstance(seg, list) or not seg:
        return "no segmentation"
    for part in seg:
        if not isinstance(part, list) or len(part) < 6:
            return f"polygon with fewer than 3 points ({len(part) // 2 if isinstance(part, list) else 0})"
    return None


# ----------------------------------------------------------------------------- masks

def annotation_bitmap(ann, height, width):
    """Binary HxW uint8 of one annotation: polygons, uncompressed RLE (iscrowd) or compressed RLE."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle)


def paint_order(anns):
    """Largest first, so that smaller objects painted later lie on top (stable for equal areas)."""
    return sorted(anns, key=lambda a: -float(a.get("area", 0)))


def paint_mask(image, anns, cat_to_class):
    """uint8 HxW mask at the image's size, pixel value = class index."""
    h, w = image["height"], image["width"]
    mask = np.zeros((h, w), np.uint8)
    for ann in paint_order(anns):
        bitmap = annotation_bitmap(ann, h, w)
        if bitmap.shape != (h, w):
            raise DataError(f"annotation {ann.get('id', '?')} (image {image['file_name']}): RLE size "
                            f"{bitmap.shape} differs from the image's {h}x{w}")
        mask[bitmap.astype(bool)] = cat_to_class[ann["category_id"]]
    return mask


def default_cache_dir():
    return Path(os.environ.get("TRASHSEG_CACHE", Path.home() / ".cache" / "trashseg")) / "masks"


class MaskCache:
    """Painted masks as PNG files keyed by a hash of what made them (size, classes, segmentations), so that
    polygons are decoded once, every JSON holding the same image and annotations (folds, train_all) shares the
    file, and a changed annotation or class list makes a new one."""

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)

    def key(self, image, anns, cat_to_class):
        parts = [image["height"], image["width"],
                 [(cat_to_class[a["category_id"]], a["segmentation"]) for a in paint_order(anns)]]
        return hashlib.sha1(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()

    def get(self, image, anns, cat_to_class):
        key = self.key(image, anns, cat_to_class)
        file = self.dir / key[:2] / f"{key}.png"
        if file.is_file():
            try:
                return read_mask(file)
            except OSError:
                pass  # a damaged cache file is rebuilt below
        mask = paint_mask(image, anns, cat_to_class)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        Image.fromarray(mask, "L").save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, file)  # atomic: loader workers never see half a file
        return mask


def read_mask(file):
    """uint8 HxW array of a single-channel (or palette) PNG of class ids."""
    with Image.open(file) as im:
        return np.array(im)


def read_image(file):
    """uint8 RGB tensor CHW; a file PIL cannot decode is a DataError naming it."""
    try:
        with Image.open(file) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except Exception as e:
        raise DataError(f"image file {file} cannot be decoded: {e}") from None


def pixel_counts(coco, by="pixels"):
    """(num_images, num_classes) int64 counts from the annotations: pixels (annotation areas; Background is the
    rest of the image) or objects. Cheap: no mask is painted."""
    counts = np.zeros((len(coco.images), len(coco.class_names)), np.int64)
    for i, img in enumerate(coco.images):
        for ann in coco.annotations(img):
            c = coco.cat_to_class[ann["category_id"]]
            if by == "objects":
                counts[i, c] += 1
            else:
                counts[i, c] += int(round(_area(ann, img)))
        if by != "objects":
            counts[i, 0] += max(0, img["height"] * img["width"] - counts[i, 1:].sum())
    return counts


def _area(ann, img):
    if "area" in ann:
        return float(ann["area"])
    return float(annotation_bitmap(ann, img["height"], img["width"]).sum())


# ----------------------------------------------------------------------------- augmentation

class RandomRot90(v2.Transform):
    """Rotate image and mask together by a random multiple of 90 degrees (lossless, unlike RandomRotation)."""

    def make_params(self, flat_inputs):
        return {"k": int(torch.randint(4, ()))}

    def transform(self, inpt, params):
        if params["k"] == 0 or not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        return tv_tensors.wrap(torch.rot90(inpt, params["k"], dims=(-2, -1)), like=inpt)


AUG_PRESETS = ("none", "basic", "strong")


def build_transform(preset, img_size):
    """Joint image+mask transform on uint8 tensors ending at img_size x img_size. v2 resamples tv_tensors.Mask
    with nearest, and photometric ops leave it alone, so mask values stay in the class set."""
    size = (img_size, img_size)
    if preset == "none":
        return v2.Resize(size, antialias=True)
    if preset not in AUG_PRESETS:
        raise ValueError(f"unknown augmentation preset '{preset}' (choose from {', '.join(AUG_PRESETS)})")
    ops = [v2.RandomResizedCrop(size, scale=(0.25, 1.0), ratio=(0.75, 1.333), antialias=True),
           v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()]
    if preset == "strong":
        ops += [v2.RandomApply([v2.ColorJitter(0.3, 0.3, 0.3, 0.05)], p=0.8),
                v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.2),
                v2.RandomApply([v2.JPEG((40, 95))], p=0.3)]
    return v2.Compose(ops)


def normalize(image_uint8):
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (image_uint8.float() / 255.0 - mean) / std


# ----------------------------------------------------------------------------- copy-paste

class CopyPaste:
    """Pastes objects of chosen classes (default: the two rarest present by pixels), cut by their masks from other
    training images, onto a sample at its original resolution, before the joint augmentation. It draws from the
    global `random`, which DataLoader seeds differently in each worker."""

    def __init__(self, coco, classes=None, prob=0.5, max_objects=3):
        totals = pixel_counts(coco).sum(0)
        if classes is None:
            present = [c for c in range(1, len(totals)) if totals[c] > 0]
            classes = sorted(present, key=lambda c: totals[c])[:2]
        self.classes = [c if isinstance(c, int) else coco.class_names.index(c) for c in classes]
        self.sources = [(i, ann, coco.cat_to_class[ann["category_id"]]) for i, img in enumerate(coco.images)
                        for ann in coco.annotations(img) if coco.cat_to_class[ann["category_id"]] in self.classes]
        self.prob, self.max_objects = prob, max_objects

    def __call__(self, image, mask, load):
        """image uint8 CHW, mask uint8 HW (tensors); load(i) -> (image, mask) of training image i."""
        if not self.sources or random.random() >= self.prob:
            return image, mask
        image, mask = image.clone(), mask.clone()
        for _ in range(random.randint(1, self.max_objects)):
            src_index, ann, cls = random.choice(self.sources)
            src_image, src_mask = load(src_index)
            bitmap = torch.from_numpy(annotation_bitmap(ann, *src_mask.shape)).bool()
            # only the visible part of the object: what the painted mask shows as its class
            bitmap &= src_mask == cls
            ys, xs = torch.nonzero(bitmap, as_tuple=True)
            if len(ys) == 0:
                continue
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
            piece = bitmap[y0:y1, x0:x1]
            scale = random.uniform(0.7, 1.3)
            ph = max(1, min(mask.shape[0], round((y1 - y0) * scale)))
            pw = max(1, min(mask.shape[1], round((x1 - x0) * scale)))
            pixels = v2.functional.resize(src_image[:, y0:y1, x0:x1], [ph, pw], antialias=True)
            piece = v2.functional.resize(piece[None].to(torch.uint8), [ph, pw],
                                         interpolation=v2.InterpolationMode.NEAREST)[0].bool()
            ty = random.randint(0, mask.shape[0] - ph)
            tx = random.randint(0, mask.shape[1] - pw)
            region = image[:, ty:ty + ph, tx:tx + pw]
            region[:, piece] = pixels[:, piece]
            mask[ty:ty + ph, tx:tx + pw][piece] = cls
        return image, mask


# ----------------------------------------------------------------------------- dataset

class SegmentationDataset(torch.utils.data.Dataset):
    """Labeled JSON: (image float CHW normalised, mask int64 HW, meta). Unlabeled: (image, meta).
    meta = {file_name, image_id, height, width} of the original image."""

    def __init__(self, coco, img_size=512, aug="none", mask_cache=None, copy_paste=None, skip_bad=False,
                 full_mask=False, with_masks=True):
        self.coco = coco
        self.full_mask = full_mask  # validation: resize the image only, score against the original-size mask
        self.transform = build_transform(aug, img_size)
        # random erasing is part of 'strong' but touches the image only, so it runs after the joint transform
        self.erase = v2.RandomErasing(p=0.25, scale=(0.02, 0.15), value=0) if aug == "strong" else None
        self.cache = MaskCache(mask_cache) if mask_cache else None
        self.copy_paste = copy_paste
        self.skip_bad = skip_bad
        self.labeled = coco.labeled and with_masks  # with_masks=False: images only, even from a labeled JSON

    def __len__(self):
        return len(self.coco)

    def load(self, index):
        """uint8 image CHW and uint8 mask HW at the original size."""
        img = self.coco.images[index]
        image = read_image(self.coco.image_path(img))
        if tuple(image.shape[1:]) != (img["height"], img["width"]):
            raise DataError(f"image file {self.coco.image_path(img)} is {image.shape[2]}x{image.shape[1]} "
                            f"but the JSON says {img['width']}x{img['height']}")
        if not self.labeled:
            return image, None
        if "mask_file" in img:  # a pseudo label: a mask PNG beside the JSON (predict.py --pseudo)
            mask_file = self.coco.json_path.parent / img["mask_file"]
            try:
                mask = read_mask(mask_file)
            except OSError as e:
                raise DataError(f"mask file {mask_file} cannot be read: {e}") from None
            if mask.shape != (img["height"], img["width"]):
                raise DataError(f"mask file {mask_file} is {mask.shape[1]}x{mask.shape[0]}, its image "
                                f"{img['width']}x{img['height']}")
            return image, torch.from_numpy(mask)
        anns = self.coco.annotations(img)
        if self.cache:
            mask = self.cache.get(img, anns, self.coco.cat_to_class)
        else:
            mask = paint_mask(img, anns, self.coco.cat_to_class)
        return image, torch.from_numpy(np.ascontiguousarray(mask))

    def __getitem__(self, index):
        for attempt in range(len(self)):  # with skip_bad, a bad sample is replaced by the next good one
            try:
                image, mask = self.load(index)
                break
            except Exception as e:  # whatever fails, say which sample
                if not isinstance(e, DataError):
                    img = self.coco.images[index]
                    e = DataError(f"image {self.coco.image_path(img)} (id {img['id']}) of {self.coco.json_path}: "
                                  f"{e.__class__.__name__}: {e}")
                if not self.skip_bad:
                    raise e from None
                warnings.warn(f"skipping bad sample: {e}")
                index = (index + 1) % len(self)
        else:
            raise DataError(f"{self.coco.json_path}: every sample failed to load")
        img = self.coco.images[index]
        meta = {"file_name": img["file_name"], "image_id": img["id"], "height": img["height"], "width": img["width"]}
        if mask is None or self.full_mask:
            image = normalize(self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor))
            return (image, meta) if mask is None else (image, mask.long(), meta)
        if self.copy_paste is not None:
            image, mask = self.copy_paste(image, mask, self.load)
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        image = normalize(image.as_subclass(torch.Tensor))
        if self.erase is not None:
            image = self.erase(image)
        return image, mask.as_subclass(torch.Tensor).long(), meta


def collate_full_masks(batch):
    """Batch for full_mask datasets: images stacked; masks (of differing sizes; None for unlabeled items) and
    metas as lists."""
    masks = [item[1] if len(item) == 3 else None for item in batch]
    return torch.stack([item[0] for item in batch]), masks, [item[-1] for item in batch]


# ----------------------------------------------------------------------------- demo data

DEMO_SIZES = [(320, 320), (320, 240), (240, 320), (300, 225)]


def make_demo(out_dir, num_images=48, num_unlabeled=16, seed=0):
    """A small synthetic set in the competition's layout: photo-like backgrounds, textured objects of every
    class (overlapping, some cut by the border), polygons plus a few RLE annotations, non-square images."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "test_images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": n, "supercategory": n} for i, n in enumerate(COMPETITION_CLASSES) if i > 0]
    # each class has its own colour and stripe frequency so a model can learn it; rare classes are sampled less
    class_color = {c: np.array(COMPETITION_COLORS[c]) * 0.6 + 60 for c in range(1, 11)}
    class_prob = np.array([3, 3, 2, 2, 1.5, 3, 1.5, 2, 0.6, 0.6])
    class_prob /= class_prob.sum()

    def draw_image(index, labeled):
        w, h = DEMO_SIZES[index % len(DEMO_SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.uniform(90, 170, 3)
        canvas = base + 30 * np.sin(xx / rng.uniform(40, 90))[..., None] + rng.normal(0, 8, (h, w, 3))
        objects = []
        # every class appears in the first ten images, then classes are drawn by their (imbalanced) weights
        n_obj = int(rng.integers(4, 9))
        classes = [index % 10 + 1] + list(rng.choice(np.arange(1, 11), n_obj - 1, p=class_prob))
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
            color = class_color[c] + rng.normal(0, 10, 3)
            canvas[bitmap] = (color + stripes[..., None] + rng.normal(0, 6, (h, w, 3)))[bitmap]
            objects.append((c, poly, bitmap))
        image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        folder = "images" if labeled else "test_images"
        file_name = f"{folder}/demo_{index:04d}.jpg"
        image.save(out / file_name, quality=90)
        return {"id": index + 1, "file_name": file_name, "width": w, "height": h}, objects

    images, annotations = [], []
    for i in range(num_images):
        info, objects = draw_image(i, True)
        images.append(info)
        for k, (c, poly, bitmap) in enumerate(objects):
            rle = mask_utils.encode(np.asfortranarray(bitmap.astype(np.uint8)))
            ann = {"id": len(annotations) + 1, "image_id": info["id"], "category_id": int(c),
                   "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                   "iscrowd": 0, "segmentation": [[round(float(v), 1) for v in poly.reshape(-1)]]}
            if k % 7 == 3:  # a few compressed RLE annotations
                ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            elif k % 11 == 5:  # and a few uncompressed (iscrowd) ones
                ann["segmentation"], ann["iscrowd"] = _uncompressed_rle(bitmap), 1
            annotations.append(ann)
    write_json(out / "train_all.json", {"images": images, "annotations": annotations, "categories": categories})
    test_images = [draw_image(num_images + i, False)[0] for i in range(num_unlabeled)]
    write_json(out / "test.json", {"images": test_images, "categories": categories})
    return out


def _uncompressed_rle(bitmap):
    flat = bitmap.astype(np.uint8).flatten(order="F")  # COCO RLE runs down columns, starting with zeros
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"size": list(bitmap.shape), "counts": [int(c) for c in counts]}


def to_json(obj, indent=None):
    """Standard JSON (NaN and infinities, e.g. the IoU of a class absent from a set, become null), so jq and
    other strict readers accept every file the pipeline writes."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def write_json(path, obj, indent=None):
    """Atomic: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(to_json(obj, indent))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- summary and visualisation

def overlay(image, mask, class_names, alpha=0.5, title=None, legend=True):
    """PIL image: the photo blended with the palette-coloured mask, and a legend of the classes present."""
    colors = np.array(palette(class_names), np.uint8)
    image = np.asarray(image, np.uint8)
    safe = np.where(mask < len(class_names), mask, 0)
    blend = (image * (1 - alpha) + colors[safe] * alpha).astype(np.uint8)
    blend[mask == 0] = image[mask == 0]  # keep Background as the photo itself
    present = [int(c) for c in np.unique(mask) if c < len(class_names)] if legend else []
    row = 14
    legend_h = row * (len(present) + (1 if title else 0)) + 4
    canvas = Image.new("RGB", (blend.shape[1], blend.shape[0] + legend_h), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = blend.shape[0] + 2
    if title:
        draw.text((4, y), title, fill=(0, 0, 0))
        y += row
    for c in present:
        draw.rectangle([4, y + 1, 14, y + 11], fill=tuple(int(v) for v in colors[c]), outline=(0, 0, 0))
        draw.text((20, y), f"{c} {class_names[c]}", fill=(0, 0, 0))
        y += row
    return canvas


def summarize(coco):
    """Printable summary: images, sizes, objects and pixel share per class, suggested class weights."""
    from losses import WEIGHT_METHODS, class_weights  # the weight formulas live with the losses
    widths = [img["width"] for img in coco.images]
    heights = [img["height"] for img in coco.images]
    sizes = sorted({(img["width"], img["height"]) for img in coco.images})
    pixels = pixel_counts(coco)
    objects = pixel_counts(coco, by="objects").sum(0)
    images_with = (pixels[:, :] > 0).sum(0)
    total = pixels.sum(0)
    share = total / max(1, total.sum())
    weights = {m: class_weights(pixels, m) for m in WEIGHT_METHODS}  # per-image counts, as train.py passes them
    lines = [f"{coco.json_path}: {len(coco.images)} images, {sum(len(a) for a in coco.anns_by_image.values())} "
             f"annotations, {len(coco.class_names)} classes",
             f"image sizes: width {min(widths, default=0)}-{max(widths, default=0)}, "
             f"height {min(heights, default=0)}-{max(heights, default=0)}, {len(sizes)} distinct"
             + (f" ({', '.join(f'{w}x{h}' for w, h in sizes[:6])}{' ...' if len(sizes) > 6 else ''})" if sizes else ""),
             "pixel share from annotation areas (Background = the rest); weights normalised to mean 1 "
             "(a class with no pixels gets the largest weight of the present classes)",
             f"{'class':<16}{'objects':>8}{'images':>8}{'pixels %':>10}" + "".join(f"{m:>10}" for m in WEIGHT_METHODS)]
    for c, name in enumerate(coco.class_names):
        lines.append(f"{c:>2} {name[:13]:<13}{'-' if c == 0 else objects[c]:>8}{images_with[c]:>8}"
                     f"{100 * share[c]:>10.3f}" + "".join(f"{float(weights[m][c]):>10.3f}" for m in WEIGHT_METHODS))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", metavar="DIR", help="write a synthetic demo data set to DIR and exit")
    p.add_argument("--num-images", type=int, default=48, help="labeled demo images (plus a third as many unlabeled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--json", default="train_all.json")
    p.add_argument("--skip-bad", action="store_true", help="skip bad images/annotations with one warning")
    p.add_argument("--vis", type=int, default=0, metavar="N", help="write N overlay PNGs to --output-dir")
    p.add_argument("--output-dir", default="vis")
    p.add_argument("--mask-cache", default=str(default_cache_dir()), help="mask cache folder, or 'none'")
    args = p.parse_args()
    try:
        if args.demo:
            out = make_demo(args.demo, args.num_images, max(1, args.num_images // 3), args.seed)
            print(f"wrote {args.num_images} labeled and {max(1, args.num_images // 3)} unlabeled images, "
                  f"train_all.json and test.json to {out}")
            return
        coco = load_coco(args.data_dir, args.json, skip_bad=args.skip_bad)
        print(summarize(coco))
        if args.vis:
            ds = SegmentationDataset(coco, mask_cache=None if args.mask_cache == "none" else args.mask_cache)
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            for i in range(min(args.vis, len(coco))):
                image, mask = ds.load(i)
                if mask is None:
                    mask = torch.zeros(image.shape[1:], dtype=torch.uint8)
                name = Path(coco.images[i]["file_name"]).stem
                overlay(image.permute(1, 2, 0).numpy(), mask.numpy(), coco.class_names,
                        title=coco.images[i]["file_name"]).save(out / f"{name}.png")
            print(f"wrote {min(args.vis, len(coco))} overlays to {out}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
