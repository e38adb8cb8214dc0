"""COCO data under a data root: the class list and its colours, loading with checks, masks painted from polygons
or RLE (and their cache), per-image pixel counts. No torchvision here: ensemble.py reads masks without it.

    coco = load_coco("data", "train_all.json")               # class list = Background + categories in id order
    val = load_coco("data", "val.json", class_names=coco.class_names)   # other JSONs map onto it by name
    mask = load_mask(coco, 0, cache=MaskCache(default_cache_dir()))     # uint8 HxW class ids
"""
import colorsys
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

IGNORE_INDEX = 255  # mask value that no loss or metric counts; class indices stay below it

COMPETITION_CLASSES = ["Background", "General trash", "Paper", "Paper pack", "Metal", "Glass", "Plastic",
                       "Styrofoam", "Plastic bag", "Battery", "Clothing"]
# a qualitative palette (the first ten are the competition's trash classes): every two of them differ by at least
# ~100 in RGB distance, so predicted classes stay apart in an overlay; the rest serve other data sets' classes
DISTINCT_COLORS = [(230, 25, 75), (0, 130, 200), (255, 225, 25), (128, 128, 128), (70, 240, 240), (245, 130, 48),
                   (250, 190, 212), (145, 30, 180), (60, 180, 75), (240, 50, 230), (210, 245, 60), (0, 128, 128),
                   (170, 110, 40), (128, 0, 0), (170, 255, 195), (0, 0, 128), (255, 215, 180), (128, 128, 0)]
COMPETITION_COLORS = [(0, 0, 0)] + DISTINCT_COLORS[:10]


class DataError(ValueError):
    """Bad input data: the message names the file (and image or annotation) and the problem.

    torch's DataLoader raises a worker's exception again in the main process as the same class, with the worker's
    whole traceback as the message ("Caught DataError in DataLoader worker process 0. Original Traceback ...");
    only the original message is kept, so a photo that fails to decode in a worker reads as it does without one."""

    def __init__(self, message=""):
        found = _WORKER_TRACEBACK.search(message) if message.startswith("Caught DataError") else None
        super().__init__(found.group(1).rstrip("\n") if found else message)


_WORKER_TRACEBACK = re.compile(r"\n(?:[\w.]+\.)?DataError: (.*)\Z", re.S)


# ----------------------------------------------------------------------------- classes and palette

def class_names_from_categories(categories):
    """Background + the categories' names in id order. A category called 'background' is class 0, not a new one."""
    names = ["Background"]
    for cat in sorted(categories, key=lambda c: c["id"]):
        if cat["name"].lower() != "background":
            names.append(cat["name"])
    return names


def palette(class_names):
    """One RGB colour per class: Background black, the competition's classes their fixed colours, other classes
    the unused colours of DISTINCT_COLORS in order, then golden-ratio hue steps."""
    fixed = dict(zip(COMPETITION_CLASSES, COMPETITION_COLORS))
    free = [c for c in DISTINCT_COLORS if c not in {fixed.get(n) for n in class_names}]
    colors = []
    for i, name in enumerate(class_names):
        if name in fixed or i == 0:
            colors.append(fixed.get(name, (0, 0, 0)))
        elif free:
            colors.append(free.pop(0))
        else:
            rgb = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
            colors.append(tuple(int(255 * v) for v in rgb))
    return colors


# ----------------------------------------------------------------------------- loading and checks

class CocoSet:
    """A COCO JSON under a data root, checked, with its annotations mapped onto a run's class list."""

    def __init__(self, data_dir, json_path, images, anns_by_image, cat_to_class, class_names, labeled, extra):
        self.data_dir = Path(data_dir)
        self.json_path = Path(json_path)
        self.images = images                  # list of image dicts, JSON order
        self.anns_by_image = anns_by_image    # image id -> list of annotation dicts
        self.cat_to_class = cat_to_class      # category id -> class index
        self.class_names = class_names
        self.labeled = labeled                # the JSON has an "annotations" list (or pseudo-label mask files)
        self.extra = extra                    # the JSON's other top-level keys (categories, info, licenses)

    def __len__(self):
        return len(self.images)

    def image_path(self, image):
        return self.data_dir / image["file_name"]

    def annotations(self, image):
        return self.anns_by_image.get(image["id"], [])

    def excluding(self, file_names):
        """Images whose file_name is listed dropped (in place), with their annotations; returns how many."""
        listed = set(file_names)
        dropped = [img for img in self.images if img["file_name"] in listed]
        self.images = [img for img in self.images if img["file_name"] not in listed]
        for img in dropped:
            self.anns_by_image.pop(img["id"], None)
        return len(dropped)

    def to_dict(self, image_ids=None):
        """A COCO dict of the accepted images (all, or these ids) and their accepted annotations."""
        keep = None if image_ids is None else set(image_ids)
        images = [img for img in self.images if keep is None or img["id"] in keep]
        anns = [a for img in images for a in self.annotations(img)]
        return dict(self.extra, images=images, annotations=anns)


def read_exclude_list(path):
    """(file_names, {file, count, sha1}) of an --exclude list: one file_name per line, '#' starts a comment. The
    record goes into config.json and the checkpoint, so a run says which images it left out."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise DataError(f"{path}: cannot read the exclude list ({e.strerror or e})") from None
    names = sorted({line.split("#", 1)[0].strip() for line in text.splitlines()} - {""})
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()
    return names, {"file": str(path), "count": len(names), "sha1": digest}


def resolve_json(data_dir, json_name):
    """A JSON named relative to the data root, or by an absolute / existing path."""
    p = Path(json_name)
    return p if p.is_absolute() or p.exists() and not (Path(data_dir) / p).exists() else Path(data_dir) / p


def read_json(path):
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise DataError(f"{path}: not a COCO file (no 'images' list)")
    return raw


def category_map(path, raw, class_names):
    """category id -> class index, matching by name onto class_names (made from these categories when None)."""
    categories = raw.get("categories")
    if not isinstance(categories, list):
        if raw.get("annotations") or class_names is None:
            raise DataError(f"{path}: no 'categories' list, so the classes of its annotations are unknown")
        categories = []
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
    return cat_to_class, class_names


def load_coco(data_dir, json_name, class_names=None, skip_bad=False, check_files=True, decode=False):
    """Load and check a COCO JSON. With class_names (a run's class list) categories are matched by name; without,
    the class list is made from this JSON. check_files reads each image's header (decode: every pixel, slower).
    Problems raise one DataError listing them, or with skip_bad are dropped with one warning that counts them."""
    path = resolve_json(data_dir, json_name)
    raw = read_json(path)
    cat_to_class, class_names = category_map(path, raw, class_names)
    problems, skipped = [], []
    images, seen = [], set()
    for i, img in enumerate(raw["images"]):
        missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
        if missing:
            problems.append(f"image entry #{i} lacks {', '.join(missing)}")
            continue
        if img["id"] in seen:
            problems.append(f"duplicate image id {img['id']} ({img['file_name']})")
            continue
        seen.add(img["id"])
        msg = check_image_file(Path(data_dir) / img["file_name"], img, decode) if check_files else None
        if msg:
            problems.append(msg)
            skipped.append((i, img, msg))
            continue
        images.append(img)
    kept_ids = {img["id"] for img in images}

    anns_by_image = {}
    for ann in raw.get("annotations") or []:
        where, image_id = f"annotation {ann.get('id', '?')}", ann.get("image_id")
        if image_id not in seen:
            problems.append(f"{where} refers to unknown image id {image_id}")
        elif ann.get("category_id") not in cat_to_class:
            problems.append(f"{where} (image id {image_id}) has unknown category id {ann.get('category_id')}")
        elif problem := check_segmentation(ann.get("segmentation")):
            problems.append(f"{where} (image id {image_id}): {problem}")
        elif image_id in kept_ids:
            anns_by_image.setdefault(image_id, []).append(ann)

    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        if not skip_bad:
            raise DataError(f"{path}: {len(problems)} problem(s):\n  {shown}\n(use --skip-bad to skip them)")
        warnings.warn(f"{path}: skipping {len(problems)} bad entries:\n  {shown}", stacklevel=2)
    labeled = "annotations" in raw or bool(images) and all("mask_file" in img for img in images)
    extra = {k: v for k, v in raw.items() if k not in ("images", "annotations")}
    coco = CocoSet(data_dir, path, images, anns_by_image, cat_to_class, class_names, labeled, extra)
    coco.skipped_files = skipped  # (index in the JSON, image entry, problem) of the photos dropped by skip_bad
    return coco


def check_image_file(file, img, decode=False):
    """None, or what is wrong with an image file: missing, unreadable, (with decode) undecodable, wrong size."""
    if not file.is_file():
        return f"image file {file} (id {img['id']}) not found"
    try:
        with Image.open(file) as im:  # reads the header only ...
            size = im.size
            if decode:
                im.load()  # ... unless asked: a truncated JPEG fails only here
    except Exception as e:
        return f"image file {file} (id {img['id']}) cannot be {'decoded' if decode else 'read'}: {e}"
    if size != (img["width"], img["height"]):
        return f"image file {file} (id {img['id']}) is {size[0]}x{size[1]} but the JSON says {img['width']}x{img['height']}"
    return None


def check_segmentation(seg):
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


def paint_owners(image, anns, cat_to_class):
    """(uint8 HxW mask, pixel value = class index; int32 HxW owner map: the index into the painted list of the
    annotation each pixel shows, -1 where none; the annotations in paint order)."""
    h, w = image["height"], image["width"]
    anns = paint_order(anns)
    owner = np.full((h, w), -1, np.int32)
    for i, ann in enumerate(anns):
        bitmap = annotation_bitmap(ann, h, w)
        if bitmap.shape != (h, w):
            raise DataError(f"annotation {ann.get('id', '?')} (image {image['file_name']}): RLE size "
                            f"{bitmap.shape} differs from the image's {h}x{w}")
        owner[bitmap.astype(bool)] = i
    classes = np.array([cat_to_class[a["category_id"]] for a in anns] + [0], np.uint8)
    return classes[owner], owner, anns  # owner -1 picks the appended Background


def paint_mask(image, anns, cat_to_class):
    """uint8 HxW mask at the image's size, pixel value = class index."""
    return paint_owners(image, anns, cat_to_class)[0]


def rle_of(pixels):
    """A bool HxW mask as compressed COCO RLE with text counts (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(pixels.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def default_cache_dir():
    return Path(os.environ.get("TRASHSEG_CACHE", Path.home() / ".cache" / "trashseg")) / "masks"


def open_mask_cache(flag):
    """A --mask-cache flag's value: a folder, or 'none' for no cache. The cache only saves time: a folder that
    cannot be written (read-only, full) gives one warning and no cache."""
    if flag is None or str(flag).lower() == "none":
        return None
    cache = MaskCache(flag)
    probe = cache.dir / f".probe.{os.getpid()}"
    try:
        cache.dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        warnings.warn(f"mask cache {cache.dir} cannot be written ({e.strerror or e}): going on without it, masks "
                      f"are painted each time (--mask-cache DIR elsewhere, or --mask-cache none)")
        return None
    return cache


class MaskCache:
    """Painted masks as PNG files keyed by a hash of what made them (size, classes, segmentations), so that
    polygons are decoded once, every JSON holding the same image and annotations (folds, train_all) shares the
    file, and a changed annotation or class list makes a new one."""

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)
        self.writable = True

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
        if self.writable:
            self.store(file, mask)
        return mask

    def store(self, file, mask):
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, "L").save(tmp, format="PNG", compress_level=1)
            os.replace(tmp, file)  # atomic: loader workers never see half a file
        except OSError as e:  # the disk filled up since the cache was opened: the run goes on without it
            tmp.unlink(missing_ok=True)
            self.writable = False
            warnings.warn(f"mask cache {self.dir}: cannot write {file.name} ({e.strerror or e}); masks are no "
                          f"longer cached in this process")


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


def load_mask(coco, index, cache=None):
    """uint8 HxW mask of image `index` at its original size: painted from its annotations (through the cache when
    given), or read from its pseudo-label mask file (predict.py --pseudo)."""
    img = coco.images[index]
    if "mask_file" in img:
        mask_file = coco.json_path.parent / img["mask_file"]
        try:
            mask = read_mask(mask_file)
        except OSError as e:
            raise DataError(f"mask file {mask_file} cannot be read: {e}") from None
        if mask.shape != (img["height"], img["width"]):
            raise DataError(f"mask file {mask_file} is {mask.shape[1]}x{mask.shape[0]}, its image "
                            f"{img['width']}x{img['height']}")
        return mask
    anns = coco.annotations(img)
    mask = cache.get(img, anns, coco.cat_to_class) if cache else paint_mask(img, anns, coco.cat_to_class)
    return np.ascontiguousarray(mask)


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
                area = ann["area"] if "area" in ann else annotation_bitmap(ann, img["height"], img["width"]).sum()
                counts[i, c] += int(round(float(area)))
        if by != "objects":
            counts[i, 0] += max(0, img["height"] * img["width"] - counts[i, 1:].sum())
    return counts
