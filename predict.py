"""Predict masks for a COCO JSON with a trained checkpoint: submission CSV, mask PNGs, probabilities for soft
ensembling, overlays, metrics, pseudo labels.

    python predict.py --tta                                   # newest runs/*/best.pt on data/test.json
    python predict.py --ckpt runs/x/best.pt --json val.json --eval --vis 8 --tta --scales 0.75 1 1.25
    python predict.py --ckpt runs/x/best.pt --json test.json --pseudo --output-dir preds/pseudo   # for train.py --pseudo

Output dir (default preds/<run name>): submission.csv, masks/ (palette PNGs, pixel value = class id, original
size), probs/ (float16 class probabilities, .npy, at each image's own size unless --prob-size caps the longer
side), predictions.json (what ensemble.py reads), and
with --eval metrics.json + per_image.csv, with --vis N vis/, with --pseudo pseudo.json.
"""
import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import (DataError, SegmentationDataset, collate_full_masks, default_cache_dir, load_coco, overlay, palette,
                  read_image, write_json)
from model import ModelError, build_model, load_state_file
from train import autocast, checkpoint_network, confusion_matrix, metrics_table, segmentation_metrics


class PredictError(ValueError):
    """Bad arguments or inputs for prediction or ensembling: the message says which and why."""


# ----------------------------------------------------------------------------- outputs shared with ensemble.py

def prepare_output_dir(path, force):
    """Never overwrite silently: an existing non-empty dir needs --force (then its old outputs are removed)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not force:
            raise PredictError(f"{path} already holds outputs; use --force to replace them or another --output-dir")
        for name in ("masks", "probs", "vis"):
            shutil.rmtree(path / name, ignore_errors=True)
        for name in ("submission.csv", "predictions.json", "metrics.json", "per_image.csv", "pseudo.json"):
            (path / name).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def mask_name(file_name):
    """masks/ path of an image: its file_name with .png, so images in different folders never collide."""
    return str(Path(file_name).with_suffix(".png"))


def save_mask(mask, path, class_names):
    """uint8 HxW class ids as a palette PNG: viewers show colours, readers get the ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [v for color in palette(class_names) for v in color]
    image.putpalette(flat + [0] * (768 - len(flat)))
    image.save(path)


def csv_row(file_name, mask, csv_size):
    """One submission row: the mask resized by nearest to csv_size x csv_size, flattened row-major."""
    small = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(csv_size, csv_size), mode="nearest")
    return [file_name, " ".join(map(str, small[0, 0].to(torch.uint8).numpy().reshape(-1).tolist()))]


def write_submission(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "PredictionString"])
        writer.writerows(rows)


def per_image_iou(pred, target, num_classes):
    """IoU per class of one image (NaN where the class is in neither) and their mean."""
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), num_classes).double()
    tp, union = cm.diag(), cm.sum(0) + cm.sum(1) - cm.diag()
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return iou.tolist(), float(iou.nanmean())


def write_per_image(path, rows, class_names):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "mIoU"] + class_names)
        for file_name, ious, miou in rows:
            writer.writerow([file_name, f"{miou:.4f}"] + ["" if np.isnan(v) else f"{v:.4f}" for v in ious])


def write_vis(out_dir, items, data_dir, class_names, n):
    """Overlays of the first n items: image | prediction | ground truth (when known), with legends."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for rank, (file_name, pred, target, score) in enumerate(items[:n]):
        image = read_image(Path(data_dir) / file_name).permute(1, 2, 0).numpy()
        title = f"{file_name}" + (f"  mIoU {100 * score:.1f}" if score is not None else "")
        panels = [overlay(image, np.zeros_like(pred), class_names, title=title, legend=False),
                  overlay(image, pred, class_names, title="prediction")]
        if target is not None:
            panels.append(overlay(image, np.where(target == 255, 0, target), class_names, title="ground truth"))
        width = sum(p.width for p in panels)
        canvas = Image.new("RGB", (width, max(p.height for p in panels)), (255, 255, 255))
        x = 0
        for p in panels:
            canvas.paste(p, (x, 0))
            x += p.width
        canvas.save(out_dir / f"{rank:03d}_{Path(file_name).stem}.png")


def finish(out_dir, class_names, results, data_dir, csv_size, vis, labeled, extra=None):
    """Write what predict.py and ensemble.py both write from per-image results
    [(file_name, pred mask, target mask or None)]: CSV, masks, per-image IoU, metrics, overlays."""
    rows, per_image, vis_items = [], [], []
    num_classes = len(class_names)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for file_name, pred, target in results:
        rows.append(csv_row(file_name, pred, csv_size))
        save_mask(pred, out_dir / "masks" / mask_name(file_name), class_names)
        score = None
        if target is not None:
            confusion += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), num_classes)
            ious, score = per_image_iou(pred, target, num_classes)
            per_image.append((file_name, ious, score))
        vis_items.append((file_name, pred, target, score))
    write_submission(out_dir / "submission.csv", rows)
    metrics = None
    if labeled:
        metrics = segmentation_metrics(confusion, class_names)
        write_json(out_dir / "metrics.json", dict(metrics, confusion=confusion.tolist(), **(extra or {})))
        write_per_image(out_dir / "per_image.csv", per_image, class_names)
        print(metrics_table(metrics))
        vis_items.sort(key=lambda item: item[3])  # worst images first: that is where to look
    if vis:
        write_vis(out_dir / "vis", vis_items, data_dir, class_names, vis)
    return metrics


# ----------------------------------------------------------------------------- prediction

def load_checkpoint_model(path, device):
    ckpt = load_state_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise PredictError(f"{path}: not a train.py checkpoint (no 'model' and 'args')")
    network = checkpoint_network(ckpt["args"])
    arch, backbone = network.pop("arch"), network.pop("backbone")
    model = build_model(arch, backbone, len(ckpt["class_names"]), pretrained=False, verbose=False, **network)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise PredictError(f"{path}: weights do not fit {arch}/{backbone} with "
                           f"{len(ckpt['class_names'])} classes: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt


def prob_shape(height, width, max_side):
    """Shape of a saved probability map: the image's own, or shrunk (aspect kept) so its longer side is max_side."""
    if not max_side or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@torch.no_grad()
def predict_probs(model, images, img_size, tta=False, scales=(1.0,), amp=False, channels_last=False):
    """Softmax probabilities (N, C, img_size, img_size), averaged over scales and, with tta, over identity,
    horizontal and vertical flips. Each view is its own forward pass: on the CPU one batch of all three views
    ran slower per image than three passes (bench.py: 3.16x vs 3.04x plain), and it needs 3x the memory."""
    flips = [(), (-1,), (-2,)] if tta else [()]
    total = 0
    for scale in scales:
        size = max(8, round(img_size * scale))
        x = images if size == img_size else F.interpolate(images, size=(size, size), mode="bilinear",
                                                          align_corners=False)
        for dims in flips:
            view = x.flip(dims) if dims else x
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            with autocast(images.device, amp):
                logits = model(view).float()
            if size != img_size:
                logits = F.interpolate(logits, size=(img_size, img_size), mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
            total = total + (probs.flip(dims) if dims else probs)
    return total / (len(scales) * len(flips))


def find_checkpoint():
    found = sorted(Path("runs").glob("*/best.pt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise PredictError("no runs/*/best.pt found; give --ckpt")
    raise PredictError(f"{len(found)} runs have a best.pt ({', '.join(map(str, found[:5]))}); choose one with --ckpt")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="default: the only runs/*/best.pt")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--json", default="test.json")
    p.add_argument("--output-dir", help="default preds/<run name>")
    p.add_argument("--img-size", type=int, help="default: the training size")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tta", action="store_true", help="average over identity, horizontal and vertical flips")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale TTA, e.g. 0.75 1.0 1.25")
    p.add_argument("--csv-size", type=int, default=256)
    p.add_argument("--prob-size", type=int, default=0, metavar="N",
                   help="save probs/ with the longer side at most N, aspect kept, to save disk (0: each image's "
                        "own size)")
    p.add_argument("--no-probs", action="store_true", help="do not write probs/ (then ensembles vote hard)")
    p.add_argument("--eval", action="store_true", help="score against the JSON's annotations")
    p.add_argument("--vis", type=int, default=0, metavar="N", help="overlays of N images (worst first with --eval)")
    p.add_argument("--pseudo", action="store_true", help="write pseudo.json for train.py --pseudo")
    p.add_argument("--mask-cache", default=str(default_cache_dir()))
    p.add_argument("--force", action="store_true", help="replace the outputs of an existing --output-dir")
    p.add_argument("--device")
    args = p.parse_args(argv)
    try:
        run(args)
    except (PredictError, DataError, ModelError) as e:
        sys.exit(f"error: {e}")


def run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt_path = Path(args.ckpt) if args.ckpt else find_checkpoint()
    model, ckpt = load_checkpoint_model(ckpt_path, device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    class_names = ckpt["class_names"]
    img_size = args.img_size or ckpt["args"]["img_size"]
    coco = load_coco(args.data_dir, args.json, class_names=class_names)
    if args.eval and not coco.labeled:
        raise PredictError(f"{coco.json_path}: --eval needs annotations, and this JSON has none")
    labeled = args.eval and coco.labeled
    out_dir = prepare_output_dir(args.output_dir or Path("preds") / ckpt_path.parent.name, args.force)
    cache = None if args.mask_cache == "none" else args.mask_cache
    dataset = SegmentationDataset(coco, img_size, "none", mask_cache=cache, full_mask=True, with_masks=labeled)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=collate_full_masks)
    print(f"predicting {len(coco)} images of {coco.json_path} with {ckpt_path} ({ckpt['args']['arch']}/"
          f"{ckpt['args']['backbone']}, {img_size} px, tta {'flips' if args.tta else 'off'}, "
          f"scales {args.scales}) -> {out_dir}")
    manifest, results = [], []
    t0 = time.perf_counter()
    model_seconds = 0.0
    for images, masks, metas in loader:
        t = time.perf_counter()
        probs = predict_probs(model, images.to(device), img_size, args.tta, args.scales, args.amp, args.channels_last)
        model_seconds += time.perf_counter() - t
        for prob, mask, meta in zip(probs, masks, metas):
            full = F.interpolate(prob[None], size=(meta["height"], meta["width"]), mode="bilinear",
                                 align_corners=False)[0]
            pred = full.argmax(0).to(torch.uint8).cpu().numpy()
            entry = {"file_name": meta["file_name"], "height": meta["height"], "width": meta["width"],
                     "mask": "masks/" + mask_name(meta["file_name"])}
            if not args.no_probs:
                shape = prob_shape(meta["height"], meta["width"], args.prob_size)
                saved = full if shape == tuple(full.shape[1:]) else F.interpolate(
                    prob[None], size=shape, mode="bilinear", align_corners=False)[0]
                entry["probs"] = "probs/" + str(Path(meta["file_name"]).with_suffix(".npy"))
                (out_dir / entry["probs"]).parent.mkdir(parents=True, exist_ok=True)
                np.save(out_dir / entry["probs"], saved.cpu().numpy().astype(np.float16))
            manifest.append(entry)
            results.append((meta["file_name"], pred, None if mask is None else mask.numpy()))
    seconds = time.perf_counter() - t0
    timing = {"images": len(coco), "seconds": seconds, "seconds_per_image": seconds / max(len(coco), 1),
              "model_seconds_per_image": model_seconds / max(len(coco), 1), "tta": args.tta, "scales": args.scales}
    finish(out_dir, class_names, results, args.data_dir, args.csv_size, args.vis, labeled, {"timing": timing})
    write_json(out_dir / "predictions.json", {"class_names": class_names, "checkpoint": str(ckpt_path),
                                              "json": str(coco.json_path), "data_dir": str(args.data_dir),
                                              "prob_size": None if args.no_probs else args.prob_size,
                                              "timing": timing, "images": manifest})
    if args.pseudo:
        categories = [{"id": i, "name": n} for i, n in enumerate(class_names) if i > 0]
        images = [{"id": i + 1, "file_name": e["file_name"], "width": e["width"], "height": e["height"],
                   "mask_file": e["mask"]} for i, e in enumerate(manifest)]
        write_json(out_dir / "pseudo.json", {"images": images, "categories": categories})
    print(f"{len(coco)} images in {seconds:.1f} s ({timing['seconds_per_image']:.3f} s/image, model "
          f"{timing['model_seconds_per_image']:.3f} s/image); wrote {out_dir / 'submission.csv'}")


if __name__ == "__main__":
    main()
