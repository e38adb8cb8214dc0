"""Predict masks for a COCO JSON with a trained checkpoint: submission CSV, mask PNGs, probabilities for soft
ensembling, overlays, metrics, pseudo labels.

    python predict.py --tta                                   # newest runs/*/best.pt on data/test.json
    python predict.py --ckpt runs/x/best.pt --json val.json --eval --vis 8 --tta --scales 0.75 1 1.25
    python predict.py --ckpt runs/x/best.pt --json test.json --pseudo --output-dir preds/pseudo   # for train.py --pseudo
    python predict.py --ckpt model.pt2 --json test.json --tta     # an export.py program, without the model code

Output dir (default preds/<run name>; preds/<run name>_<json name> for another JSON than test.json):
submission.csv, masks/ (palette PNGs, pixel value = class id, original size), probs/ (float16 class probabilities, .npy, at each image's own size unless --prob-size caps the longer
side), predictions.json (what ensemble.py reads; keys in outputs.py), and with --eval metrics.json +
per_image.csv, with --vis N vis/, with --pseudo pseudo.json.
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cleanup import remove_small_regions
from coco import IGNORE_INDEX, DataError, default_cache_dir, load_coco
from dataset import SegmentationDataset, collate_full_masks, default_workers
from exported import load_exported
from inference import evaluate_batch, to_image_size, tta_flips
from precision import amp_precision, precision_note
from outputs import (CONFIDENCE_BINS, PSEUDO_BALANCE, OutputError, add_confidences, balanced_thresholds,
                     mask_name, prepare_output_dir, pseudo_rule, read_probs, save_pseudo, write_json, write_pseudo,
                     write_results, writing)


def prob_shape(height, width, max_side):
    """Shape of a saved probability map: the image's own, or shrunk (aspect kept) so its longer side is max_side."""
    if not max_side or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def find_checkpoint():
    """The newest runs/*/best.pt (the run just trained), named on the screen."""
    found = sorted(Path("runs").glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise OutputError("no runs/*/best.pt found; give --ckpt")
    if len(found) > 1:
        print(f"--ckpt not given: using the newest of {len(found)} runs/*/best.pt, {found[-1]} (give --ckpt to "
              f"choose another)")
    return found[-1]


def default_output_dir(ckpt_path, json_name):
    """preds/<run> for the test set, preds/<run>_<json> for any other JSON: predicting a run's validation fold after
    its test set (as README does) must not meet the test predictions' folder."""
    run = ckpt_path.parent.name if ckpt_path.suffix != ".pt2" else ckpt_path.stem
    stem = Path(json_name).stem
    return Path("preds") / (run if stem == "test" else f"{run}_{stem}")


def load_network(path, device, channels_last):
    """(network, info) from a train.py checkpoint or an export.py program (.pt2: no model code is imported);
    info: class_names, normalization, orientation, img_size, arch, backbone."""
    if Path(path).suffix == ".pt2":
        program, info = load_exported(path)
        return program.to(device), info  # traced in eval mode: batch norm and dropout are fixed in the graph
    from checkpoint import model_from_checkpoint, predicting_info, read_checkpoint  # builds the network from code
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, predicting_info(ckpt)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a train.py checkpoint or an export.py .pt2 (default: the newest runs/*/best.pt)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--json", default="test.json")
    p.add_argument("--output-dir", help="default preds/<run name>, or preds/<run name>_<json name> for a JSON other "
                                        "than test.json")
    p.add_argument("--img-size", type=int, help="default: the training size")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("-j", "--workers", type=int, default=default_workers(),
                   help="loader processes (default: the cores but one, at most 8; here %(default)s)")
    p.add_argument("--amp", action="store_true", help="as train.py's: fp16 on CUDA, bf16 on a CPU with native bf16, "
                                                     "else fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tta", action="store_true", help="average over the flips the model was trained with: "
                                                    "horizontal (upright), and vertical too (any)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale TTA, e.g. 0.75 1.0 1.25")
    p.add_argument("--csv-size", type=int, default=256)
    p.add_argument("--prob-size", type=int, default=0, metavar="N",
                   help="save probs/ with the longer side at most N, aspect kept, to save disk (0: each image's "
                        "own size)")
    p.add_argument("--no-probs", action="store_true", help="do not write probs/ (then ensembles vote hard)")
    p.add_argument("--eval", action="store_true", help="score against the JSON's annotations")
    p.add_argument("--vis", type=int, default=0, metavar="N", help="overlays of N images (worst first with --eval)")
    p.add_argument("--min-region", type=int, default=0, metavar="N",
                   help="regions (specks, holes) under N pixels at the image's size take the class around them")
    p.add_argument("--pseudo", action="store_true", help="write pseudo.json for train.py --pseudo")
    p.add_argument("--pseudo-threshold", type=float, metavar="T",
                   help="with --pseudo: one threshold for all classes in place of class-balanced selection: pixels "
                        "whose top probability (after TTA and scales) is below T are ignored in training (0: every "
                        "pixel, the argmax)")
    p.add_argument("--pseudo-balance", type=float, metavar="P",
                   help="with --pseudo: each predicted class keeps its P%% most confident pixels over all images (a "
                        f"second pass over probs/; the default, at {PSEUDO_BALANCE}, unless --pseudo-threshold is given)")
    p.add_argument("--skip-bad", action="store_true",
                   help="photos that cannot be read (missing, damaged, mis-sized) get a placeholder: an all-Background "
                        "row in submission.csv and mask, marked in predictions.json; --eval scores the rest")
    p.add_argument("--mask-cache", default=str(default_cache_dir()), help="folder, or 'none'")
    p.add_argument("--force", action="store_true", help="replace the outputs of an existing --output-dir")
    p.add_argument("--device")
    return p


def save_probs(out_dir, meta, full, max_side):
    """probs/<file_name>.npy, float16 (C, H, W); returns its path relative to out_dir."""
    shape = prob_shape(meta["height"], meta["width"], max_side)
    saved = to_image_size(full, *shape)
    name = "probs/" + str(Path(meta["file_name"]).with_suffix(".npy"))
    (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
    with writing(out_dir / name, out_dir / name):
        np.save(out_dir / name, saved.cpu().numpy().astype(np.float16))
    return name


def image_loss(probs, mask):
    """Mean cross-entropy of one image's (C, H, W) probabilities against its mask, over the labelled pixels."""
    mask = mask.to(probs.device).long()
    labelled = mask != IGNORE_INDEX
    if not labelled.any():
        return None
    picked = probs.gather(0, mask.clamp(max=probs.shape[0] - 1)[None])[0]
    return float(-picked[labelled].clamp_min(1e-8).log().mean())


def predict_set(model, loader, out_dir, img_size, flips, args, device, class_names):
    """Predict every image of the loader: (manifest entries, [(file_name, pred, target or None)], model seconds,
    pseudo-label pixel counts per class: predicted, kept)."""
    manifest, results, model_seconds = [], [], 0.0
    kept = torch.zeros(len(class_names), 2, dtype=torch.int64)
    histogram = kept.new_zeros(len(class_names), CONFIDENCE_BINS)
    for images, masks, metas in loader:
        t = time.perf_counter()
        per_image = evaluate_batch(model, images.to(device), metas, img_size, flips, args.scales,
                                   args.precision, args.channels_last)
        model_seconds += time.perf_counter() - t
        for (full, pred), mask, meta in zip(per_image, masks, metas):
            entry = image_entry(meta)
            if "bad" in meta:  # --skip-bad: a photo that failed to decode in the loader
                manifest.append(placeholder(entry, meta["bad"], results))
                continue
            if not args.no_probs:
                entry["probs"] = save_probs(out_dir, meta, full, args.prob_size)
            if args.pseudo and args.pseudo_balance:  # thresholds once every image is seen: pseudo_balanced
                add_confidences(full, histogram)
            elif args.pseudo:
                entry["pseudo_mask"] = save_pseudo(out_dir, meta["file_name"], full, args.pseudo_threshold,
                                                   class_names, kept)
            manifest.append(entry)
            clean = remove_small_regions(pred.to(torch.uint8).cpu().numpy(), args.min_region)
            results.append((meta["file_name"], clean, None if mask is None else mask.numpy(),
                            None if mask is None else image_loss(full, mask)))
    return manifest, results, model_seconds, (kept, histogram)


def pseudo_balanced(out_dir, manifest, histogram, share, class_names, kept):
    """--pseudo-balance: one threshold per class from the confidences of all images, then each image's pseudo mask
    from its saved probabilities. Returns the thresholds."""
    thresholds = balanced_thresholds(histogram, share)
    for entry in manifest:
        if "skipped" not in entry:
            probs = read_probs(out_dir, entry, entry["height"], entry["width"])
            entry["pseudo_mask"] = save_pseudo(out_dir, entry["file_name"], probs, thresholds, class_names, kept)
    return thresholds


def image_entry(image):
    """An image's predictions.json entry from its meta or JSON entry (file_name, height, width)."""
    return {"file_name": image["file_name"], "height": image["height"], "width": image["width"],
            "mask": mask_name(image["file_name"])}


def placeholder(entry, problem, results):
    """A photo that cannot be read: an all-Background mask at its size, no probabilities; marked in the manifest."""
    print(f"warning: {problem}: placeholder prediction (all Background)", file=sys.stderr, flush=True)
    results.append((entry["file_name"], np.zeros((entry["height"], entry["width"]), np.uint8), None, None))
    return dict(entry, skipped=problem)


def add_unread_photos(coco, manifest, results):
    """Placeholders, in the JSON's order, for the photos load_coco dropped (--skip-bad): missing, unreadable, of
    another size than the JSON says. Returns every placeholder's file_name."""
    for index, img, problem in coco.skipped_files:
        at = min(index, len(manifest))
        manifest.insert(at, placeholder(image_entry(img), problem, results))
        results.insert(at, results.pop())
    return [entry["file_name"] for entry in manifest if "skipped" in entry]


def predict_or_clean_up(model, loader, out_dir, img_size, flips, args, device, class_names):
    """predict_set; when a photo cannot be read (without --skip-bad), the probabilities and pseudo masks written so
    far are removed, so that the folder holds no half-made prediction, and the error says what to do."""
    try:
        return predict_set(model, loader, out_dir, img_size, flips, args, device, class_names)
    except DataError as e:
        for part in ("probs", "pseudo_masks"):
            shutil.rmtree(out_dir / part, ignore_errors=True)
        raise DataError(f"{e}\nnothing was written to {out_dir}; predict.py --skip-bad predicts the other photos and "
                        f"gives this one a placeholder row (all Background)") from None


def run(args):
    args.pseudo_threshold, args.pseudo_balance = pseudo_rule(args.pseudo, args.pseudo_threshold, args.pseudo_balance)
    if args.pseudo_balance and args.no_probs:
        raise OutputError("--pseudo's class-balanced selection reads probs/: drop --no-probs, or give "
                          "--pseudo-threshold T (one threshold for all classes)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = amp_precision(device, args.amp)  # the same rule as train.py's --amp
    if precision_note(device, args.amp, "predicting"):
        print(precision_note(device, args.amp, "predicting"))
    ckpt_path = Path(args.ckpt) if args.ckpt else find_checkpoint()
    model, info = load_network(ckpt_path, device, args.channels_last)
    class_names, normalization, orientation = info["class_names"], info["normalization"], info["orientation"]
    flips = tta_flips(args.tta, orientation)
    img_size = args.img_size or info["img_size"]
    coco = load_coco(args.data_dir, args.json, class_names=class_names, skip_bad=args.skip_bad)
    if args.eval and not coco.labeled:
        raise OutputError(f"{coco.json_path}: --eval needs annotations, and this JSON has none")
    out_dir = prepare_output_dir(args.output_dir or default_output_dir(ckpt_path, args.json), args.force)
    dataset = SegmentationDataset(coco, img_size, "none", mask_cache=args.mask_cache, full_mask=True,
                                  with_masks=args.eval, normalization=normalization,
                                  skip_bad="placeholder" if args.skip_bad else False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=collate_full_masks)
    print(f"predicting {len(coco)} images of {coco.json_path} with {ckpt_path} ({info['arch']}/"
          f"{info['backbone']}, {img_size} px, tta {len(flips)} view(s) (orientation {orientation}), "
          f"scales {args.scales}, {args.precision}) -> {out_dir}")
    t0 = time.perf_counter()
    manifest, results, model_seconds, (kept, histogram) = predict_or_clean_up(model, loader, out_dir, img_size,
                                                                              flips, args, device, class_names)
    unread = add_unread_photos(coco, manifest, results)
    seconds = time.perf_counter() - t0
    timing = {"images": len(coco), "seconds": seconds, "seconds_per_image": seconds / max(len(coco), 1),
              "model_seconds_per_image": model_seconds / max(len(coco), 1), "tta_flips": flips, "scales": args.scales,
              "precision": args.precision}
    threshold = args.pseudo_threshold
    if args.pseudo_balance:
        threshold = pseudo_balanced(out_dir, manifest, histogram, args.pseudo_balance / 100, class_names, kept)
    write_results(out_dir, class_names, results, args.data_dir, args.csv_size, args.vis, args.eval,
                  {"timing": timing, "placeholders": unread}, placeholders=set(unread))
    write_json(out_dir / "predictions.json", {"class_names": class_names, "checkpoint": str(ckpt_path),
                                              "json": str(coco.json_path), "data_dir": str(args.data_dir),
                                              "prob_size": None if args.no_probs else args.prob_size,
                                              "timing": timing, "images": manifest})
    if args.pseudo:
        write_pseudo(out_dir, class_names, manifest, threshold, kept)
    if unread:
        print(f"warning: {len(unread)} of {len(manifest)} rows of submission.csv are placeholders (all Background) "
              f"for photos that could not be read: {', '.join(unread[:5])}{' ...' if len(unread) > 5 else ''}"
              + (f"; --eval scored the other {len(manifest) - len(unread)}" if args.eval else ""), file=sys.stderr)
    print(f"{len(coco)} images in {seconds:.1f} s ({timing['seconds_per_image']:.3f} s/image, model "
          f"{timing['model_seconds_per_image']:.3f} s/image); wrote {out_dir / 'submission.csv'}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # OutputError (and WriteError), DataError and the checkpoint's ModelError: they name
        sys.exit(f"error: {e}")  # the file and the problem
    except OSError as e:  # a folder that cannot be made: the message names it
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
