"""What the stages write, in one place: strict JSON, the output folder of predict.py and ensemble.py (submission
CSV, mask PNGs, per-image scores, overlays, metrics) and its manifest, predictions.json, which ensemble.py reads.

predictions.json keys: class_names, data_dir, json (the predicted COCO file), checkpoint or inputs (what made it),
prob_size, timing, and images: one entry per image in the JSON's order with file_name, height, width, mask
("masks/<file_name>.png", uint8 class ids at the image's size) and, unless --no-probs, probs
("probs/<file_name>.npy", float16 (C, H, W) softmax probabilities).
"""
import contextlib
import csv
import errno
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from coco import IGNORE_INDEX, palette, read_image
from metrics import confusion_matrix, metrics_table, per_image_iou, segmentation_metrics
from pictures import confusion_picture, overlay

OUTPUT_NAMES = ("submission.csv", "predictions.json", "metrics.json", "confusion.png", "per_image.csv", "pseudo.json",
                "weights.json")
OUTPUT_DIRS = ("masks", "probs", "vis", "pseudo_masks")


class OutputError(ValueError):
    """Bad arguments or inputs for writing or combining predictions: the message says which and why."""


class WriteError(OutputError):
    """A file could not be written (full or read-only disk...): the message names it, the error and the free space."""


# ----------------------------------------------------------------------------- writing files, and when it fails

def free_bytes(path):
    """Free bytes on the disk that holds path (or its nearest existing parent); None when unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def megabytes(n):
    return f"{n / 2**20:,.1f} MiB"


def write_failure(path, error, needed=None):
    """One sentence: which file, what went wrong, and for a full disk what it needed and what is free."""
    reason = error.strerror or str(error)
    text = f"cannot write {path}: {reason}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        text += (f" (it needed about {megabytes(needed)}" if needed else " (") + \
                (f"{'; ' if needed else ''}{megabytes(free)} free on its disk)" if free is not None else ")")
    return text.replace(" ()", "")


@contextlib.contextmanager
def writing(path, partial=None, needed=None):
    """Around the writing of one file: an OSError becomes a WriteError naming it (no traceback for the user), and
    the partial file (a .tmp, or the file itself where it is not written atomically) is removed whatever stops
    the write, a signal included."""
    try:
        yield
    except BaseException as e:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(write_failure(path, e, needed)) from None
        raise


# ----------------------------------------------------------------------------- JSON, and train.py's JSON-lines log

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


@contextlib.contextmanager
def atomic(path, needed=None):
    """Write to the yielded temporary path beside `path` (same suffix, so writers that infer the format from it
    still do); on success it replaces `path` in one step, so a reader never sees half a file. Failures as in
    `writing`: a WriteError naming `path`, and the temporary file removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    with writing(path, tmp, needed):
        yield tmp
        os.replace(tmp, path)


def write_json(path, obj, indent=None):
    """Atomic: a reader never sees half a file."""
    with atomic(path) as tmp:
        tmp.write_text(to_json(obj, indent))


class Logger:
    """Prints on rank 0 and appends every record as one JSON line to <output-dir>/log.jsonl."""

    def __init__(self, output_dir, rank):
        self.rank = rank
        self.file = Path(output_dir) / "log.jsonl" if output_dir else None

    def print(self, *text):
        if self.rank == 0:
            print(*text, flush=True)

    def log(self, record):
        if self.rank == 0 and self.file:
            with writing(self.file), open(self.file, "a") as f:
                f.write(to_json(record) + "\n")

    def records(self):
        return read_log(self.file)


def read_log(path):
    """The records of a log.jsonl (a line cut short by a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_predictions(path):
    """The manifest of a predict.py / ensemble.py output folder."""
    manifest = Path(path) / "predictions.json"
    if not manifest.is_file():
        raise OutputError(f"{path}: no predictions.json (not a predict.py output dir)")
    try:
        info = json.loads(manifest.read_text())
        info["images"] = list(info["images"])
        return info
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OutputError(f"{manifest}: not a predictions manifest ({e})") from None


def read_probs(folder, entry, height, width):
    """An image's saved (C, H, W) probabilities from a predictions folder as float32, resized to height x width."""
    probs = torch.from_numpy(np.load(Path(folder) / entry["probs"]).astype(np.float32))
    if probs.shape[-2:] == (height, width):
        return probs
    return F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]


# ----------------------------------------------------------------------------- the output folder

def prepare_output_dir(path, force):
    """Never overwrite silently: an existing non-empty dir needs --force (then its old outputs are removed)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not force:
            raise OutputError(f"{path} already holds outputs; use --force to replace them or another --output-dir")
        for name in OUTPUT_DIRS:
            shutil.rmtree(path / name, ignore_errors=True)
        for name in OUTPUT_NAMES:
            (path / name).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def mask_name(file_name):
    """masks/ path of an image: its file_name with .png, so images in different folders never collide."""
    return "masks/" + str(Path(file_name).with_suffix(".png"))


def save_mask(mask, path, class_names):
    """uint8 HxW class ids as a palette PNG: viewers show colours, readers get the ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [v for color in palette(class_names) for v in color]
    image.putpalette(flat + [0] * (768 - len(flat)))
    with writing(path, path):
        image.save(path)


def csv_row(file_name, mask, csv_size):
    """One submission row: the mask resized by nearest to csv_size x csv_size, flattened row-major."""
    small = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(csv_size, csv_size), mode="nearest")
    return [file_name, " ".join(map(str, small[0, 0].to(torch.uint8).numpy().reshape(-1).tolist()))]


def write_submission(path, rows):
    with writing(path, path), open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "PredictionString"])
        writer.writerows(rows)


def write_per_image(path, rows, class_names):
    """per_image.csv, worst mIoU first: where to look for doubtful labels (loss: mean cross-entropy of the
    predicted probabilities over the labelled pixels; empty when only masks were voted)."""
    with writing(path, path), open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "mIoU", "loss"] + class_names)
        for file_name, ious, miou, loss in sorted(rows, key=lambda row: row[2]):
            writer.writerow([file_name, f"{miou:.4f}", "" if loss is None else f"{loss:.4f}"] +
                            ["" if np.isnan(v) else f"{v:.4f}" for v in ious])


# ----------------------------------------------------------------------------- pseudo labels

# each predicted class keeps this share (%) of its surest pixels: it beat one threshold for all (0.9) on every fold of
# garbage and camvid, which starves the confusable classes (docs/results.md, issue 36)
PSEUDO_BALANCE = 50


def pseudo_rule(pseudo, threshold, balance):
    """(threshold, balance) for --pseudo: one threshold for all classes when --pseudo-threshold is given, else
    class-balanced selection (--pseudo-balance, default PSEUDO_BALANCE); (None, None) without --pseudo."""
    if not pseudo:
        if threshold is not None or balance is not None:
            raise OutputError("--pseudo-threshold and --pseudo-balance choose the pixels of --pseudo: give --pseudo too")
        return None, None
    if threshold is not None and balance is not None:
        raise OutputError(f"give --pseudo-threshold {threshold:g} or --pseudo-balance {balance:g}, not both")
    if threshold is None and balance is None:
        balance = PSEUDO_BALANCE
    if balance is not None and not 0 < balance <= 100:
        raise OutputError(f"--pseudo-balance {balance:g}: give the share of each class to keep, in percent "
                          "(0 < P <= 100)")
    return threshold, balance


def pseudo_mask(probs, threshold):
    """uint8 class ids of a (C, H, W) probability map, IGNORE_INDEX where the top probability is below threshold:
    one number, or a (C,) tensor of one threshold per predicted class (balanced_thresholds)."""
    confidence, mask = probs.max(0)
    limit = threshold.to(probs.device)[mask] if torch.is_tensor(threshold) else threshold
    mask = mask.to(torch.uint8)
    mask[confidence < limit] = IGNORE_INDEX
    return mask


CONFIDENCE_BINS = 1000


def add_confidences(probs, histogram):
    """Count a (C, H, W) map's pixels into histogram (C, CONFIDENCE_BINS): per predicted class, per top probability."""
    classes = histogram.shape[0]
    confidence, predicted = probs.float().max(0)
    bins = (confidence * CONFIDENCE_BINS).long().clamp(0, CONFIDENCE_BINS - 1)
    histogram += torch.bincount((predicted * CONFIDENCE_BINS + bins).flatten().cpu(),
                                minlength=classes * CONFIDENCE_BINS).view(classes, CONFIDENCE_BINS)


def balanced_thresholds(histogram, share):
    """Class-balanced self-training (Zou et al., ECCV 2018): per predicted class, the top probability above which
    lie its `share` most confident pixels over every pseudo-labelled image, so that a confusable class (low
    confidences) keeps as large a share as an easy one. A class never predicted gets 1.0 (nothing to keep)."""
    at_or_above = histogram.flip(1).cumsum(1).flip(1)  # pixels whose confidence is in this bin or a higher one
    reached = at_or_above >= share * histogram.sum(1, keepdim=True)
    highest = reached.sum(1) - 1  # at_or_above falls with the bin, so the bins that reach the share come first
    thresholds = highest.double() / CONFIDENCE_BINS
    thresholds[histogram.sum(1) == 0] = 1.0
    return thresholds


def save_pseudo(out_dir, file_name, probs, threshold, class_names, kept):
    """pseudo_masks/<file_name>.png (class ids, IGNORE_INDEX where not confident); counts each class's predicted
    and kept pixels into kept (C, 2). Returns its path relative to out_dir."""
    mask = pseudo_mask(probs, threshold)
    predicted = probs.argmax(0).flatten()
    kept[:, 0] += torch.bincount(predicted.cpu(), minlength=len(kept))
    kept[:, 1] += torch.bincount(predicted[mask.flatten() != IGNORE_INDEX].cpu(), minlength=len(kept))
    name = "pseudo_" + mask_name(file_name)
    save_mask(mask.cpu().numpy(), out_dir / name, class_names)
    return name


def write_pseudo(out_dir, class_names, manifest, threshold, kept):  # threshold: a number, or one per class
    """pseudo.json: the predicted images as a labeled COCO file whose masks are the pseudo-label PNGs; prints the
    share of each class's predicted pixels kept at the threshold."""
    categories = [{"id": i, "name": n} for i, n in enumerate(class_names) if i > 0]
    images = [{"id": i + 1, "file_name": e["file_name"], "width": e["width"], "height": e["height"],
               "mask_file": e["pseudo_mask"]} for i, e in enumerate(manifest) if "pseudo_mask" in e]  # not placeholders
    if torch.is_tensor(threshold):
        threshold = {name: round(float(t), 4) for name, t in zip(class_names, threshold)}
    write_json(out_dir / "pseudo.json", {"images": images, "categories": categories,
                                         "pseudo_threshold": threshold})
    shares = [f"{n} {100 * int(k) / int(p):.0f}% of {int(p):,}" for n, (p, k) in zip(class_names, kept.tolist())
              if p > 0]
    print(f"pseudo labels (threshold {'one per class' if isinstance(threshold, dict) else threshold}): kept {100 * int(kept[:, 1].sum()) / max(int(kept[:, 0].sum()), 1):.1f}% "
          f"of the pixels; per predicted class: {', '.join(shares)}")


# ----------------------------------------------------------------------------- label review

SUSPECT_HEADER = ["image", "annotation", "labelled", "suggested", "share", "confidence", "area"]


def write_suspects(path, suspects):
    """review.py's suspects.csv, in the order given (most doubtful first)."""
    with writing(path, path), open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUSPECT_HEADER)
        for s in suspects:
            writer.writerow([s["image"], s["annotation"], s["labelled"], s["suggested"], f"{s['share']:.4f}",
                             f"{s['confidence']:.4f}", s["area"]])


def write_review_images(path, scores):
    """review.py's images.csv: every image's score, worst first."""
    with writing(path, path), open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "score", "suspects"])
        for name, score, count in scores:
            writer.writerow([name, f"{score:.4f}", count])


# ----------------------------------------------------------------------------- pictures written

def save_picture(image, path):
    """A PIL image as PNG, atomically (curves.png is redrawn while a viewer may have it open)."""
    with atomic(path) as tmp:
        image.save(tmp)


def save_drawing(draw, path, say=print):
    """save_picture(draw(), path), where a picture that cannot be drawn is reported and the run goes on: pictures
    are a view of a long run, never a reason to end it. Write errors (a full disk) still stop it."""
    try:
        image = draw()
    except Exception as e:  # noqa: BLE001 - any drawing bug
        say(f"warning: {path} not drawn ({type(e).__name__}: {e}); the run goes on")
        return
    save_picture(image, path)


def write_vis(out_dir, items, data_dir, class_names, n):
    """Overlays of the first n items: image | prediction | ground truth (when known), with legends."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for rank, (file_name, pred, target, score) in enumerate(items[:n]):
        image = read_image(Path(data_dir) / file_name).permute(1, 2, 0).numpy()
        title = f"{file_name}" + (f"  mIoU {100 * score:.1f}" if score is not None else "")
        panels = [overlay(image, np.zeros_like(pred), class_names, title=title, legend=False),
                  overlay(image, pred, class_names, title="prediction")]
        if target is not None:
            panels.append(overlay(image, np.where(target == IGNORE_INDEX, 0, target), class_names,
                                  title="ground truth"))
        canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), (255, 255, 255))
        x = 0
        for p in panels:
            canvas.paste(p, (x, 0))
            x += p.width
        path = out_dir / f"{rank:03d}_{Path(file_name).stem}.png"
        with writing(path, path):
            canvas.save(path)


# ----------------------------------------------------------------------------- everything from per-image results

def write_results(out_dir, class_names, results, data_dir, csv_size, vis, labeled, extra=None, placeholders=()):
    """From per-image results [(file_name, pred mask, target mask or None[, loss])]: submission CSV, mask PNGs, and
    when labeled metrics.json and per_image.csv; overlays of `vis` images (worst first when labeled). placeholders:
    file_names of photos that could not be read: their rows and masks are written, nothing else."""
    rows, per_image, vis_items = [], [], []
    num_classes = len(class_names)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for file_name, pred, target, *loss in results:
        rows.append(csv_row(file_name, pred, csv_size))
        save_mask(pred, out_dir / mask_name(file_name), class_names)
        score = None
        if target is not None:
            confusion += confusion_matrix(pred, target, num_classes)
            ious, score = per_image_iou(pred, target, num_classes)
            per_image.append((file_name, ious, score, loss[0] if loss else None))
        if file_name not in placeholders:
            vis_items.append((file_name, pred, target, score))
    write_submission(out_dir / "submission.csv", rows)
    metrics = None
    if labeled:
        metrics = segmentation_metrics(confusion, class_names)
        write_json(out_dir / "metrics.json", dict(metrics, confusion=confusion.tolist(), **(extra or {})))
        save_picture(confusion_picture(confusion, class_names), out_dir / "confusion.png")
        write_per_image(out_dir / "per_image.csv", per_image, class_names)
        print(metrics_table(metrics))
        vis_items.sort(key=lambda item: item[3])  # worst images first: that is where to look
    if vis:
        write_vis(out_dir / "vis", vis_items, data_dir, class_names, vis)
    return metrics
