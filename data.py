"""Look at a data set before training on it: a summary that checks every image, overlay pictures, and a synthetic
demo set in the competition's layout.

    python data.py --demo demo                                  # write a small synthetic data set
    python data.py --data-dir demo --json train_all.json        # check and summarise: sizes, objects, pixel shares, weights
    python data.py --data-dir demo --vis 8 --output-dir vis     # overlay PNGs
    python data.py --data-dir data --list-images my_photos --output-json my_photos.json   # unlabeled photos -> JSON
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from coco import DataError, default_cache_dir, load_coco, load_mask, open_mask_cache, pixel_counts, read_image
from demo import make_demo
from losses import WEIGHT_METHODS, class_weights
from outputs import WriteError, write_json, writing
from pictures import overlay


# ----------------------------------------------------------------------------- summary and overlays

def summarize(coco):
    """Printable summary: images, sizes, objects and pixel share per class, the class weights train.py would use."""
    widths = [img["width"] for img in coco.images]
    heights = [img["height"] for img in coco.images]
    sizes = sorted({(img["width"], img["height"]) for img in coco.images})
    pixels = pixel_counts(coco)
    objects = pixel_counts(coco, by="objects").sum(0)
    images_with = (pixels > 0).sum(0)
    total = pixels.sum(0)
    share = total / max(1, total.sum())
    weights = {m: class_weights(pixels, m) for m in WEIGHT_METHODS}  # per-image counts, as train.py passes them
    size_list = ", ".join(f"{w}x{h}" for w, h in sizes[:6]) + (" ..." if len(sizes) > 6 else "")
    lines = [f"{coco.json_path}: {len(coco.images)} images, {sum(len(a) for a in coco.anns_by_image.values())} "
             f"annotations, {len(coco.class_names)} classes",
             f"image sizes: width {min(widths, default=0)}-{max(widths, default=0)}, "
             f"height {min(heights, default=0)}-{max(heights, default=0)}, {len(sizes)} distinct"
             + (f" ({size_list})" if sizes else ""),
             "pixel share from annotation areas (Background = the rest); weights normalised to mean 1 "
             "(a class with no pixels gets the largest weight of the present classes)",
             f"{'class':<16}{'objects':>8}{'images':>8}{'pixels %':>10}" + "".join(f"{m:>10}" for m in WEIGHT_METHODS)]
    for c, name in enumerate(coco.class_names):
        lines.append(f"{c:>2} {name[:13]:<13}{'-' if c == 0 else objects[c]:>8}{images_with[c]:>8}"
                     f"{100 * share[c]:>10.3f}" + "".join(f"{float(weights[m][c]):>10.3f}" for m in WEIGHT_METHODS))
    return "\n".join(lines)


def write_overlays(coco, n, out_dir, cache):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(coco.images[:n]):
        image = read_image(coco.image_path(img)).permute(1, 2, 0).numpy()
        mask = load_mask(coco, i, cache) if coco.labeled else np.zeros(image.shape[:2], np.uint8)
        path = out / f"{Path(img['file_name']).stem}.png"
        with writing(path, path):
            overlay(image, mask, coco.class_names, title=img["file_name"]).save(path)
    print(f"wrote {min(n, len(coco))} overlays to {out}")


# ----------------------------------------------------------------------------- unlabeled photos

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(data_dir, folder, categories_json, skip_bad=False):
    """A COCO dict of the photos under data_dir/folder (any depth, sorted; file_name relative to data_dir), without
    annotations and the categories of categories_json, so that predict.py (and its --pseudo labels) can take them."""
    root = Path(data_dir)
    if not (root / folder).is_dir():
        raise DataError(f"{root / folder}: no such folder")
    files = sorted(f for f in (root / folder).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"{root / folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    images, problems = [], []
    for file in files:
        try:
            with Image.open(file) as im:
                width, height = im.size
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
            problems.append(f"{file}: cannot be read as an image ({type(e).__name__})")
            continue
        images.append({"id": len(images) + 1, "file_name": file.relative_to(root).as_posix(), "width": width,
                       "height": height})
    if problems and not skip_bad:
        raise DataError(f"{len(problems)} unreadable file(s):\n  " + "\n  ".join(problems[:10]) +
                        "\n(use --skip-bad to leave them out)")
    for problem in problems:
        print(f"warning: skipped {problem}")
    categories = load_coco(data_dir, categories_json, check_files=False).extra.get("categories", [])
    return {"images": images, "categories": categories}  # no "annotations" key: unlabeled, not all Background


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", metavar="DIR", help="write a synthetic demo data set to DIR and exit")
    p.add_argument("--num-images", type=int, default=48, help="labeled demo images (plus a third as many unlabeled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--json", default="train_all.json")
    p.add_argument("--skip-bad", action="store_true", help="skip bad images/annotations with one warning")
    p.add_argument("--no-decode", action="store_true", help="check image headers only (faster; truncated files "
                                                            "then go unnoticed until training)")
    p.add_argument("--vis", type=int, default=0, metavar="N", help="write N overlay PNGs to --output-dir")
    p.add_argument("--output-dir", default="vis")
    p.add_argument("--mask-cache", default=str(default_cache_dir()), help="mask cache folder, or 'none'")
    p.add_argument("--list-images", metavar="FOLDER", help="write --output-json listing the photos in "
                                                            "<data-dir>/FOLDER, with --json's categories")
    p.add_argument("--output-json", metavar="FILE", help="with --list-images (default <data-dir>/FOLDER.json)")
    args = p.parse_args()
    try:
        if args.demo:
            out = make_demo(args.demo, args.num_images, max(1, args.num_images // 3), args.seed)
            print(f"wrote {args.num_images} labeled and {max(1, args.num_images // 3)} unlabeled images, "
                  f"train_all.json and test.json to {out}")
            return
        if args.list_images:
            out = Path(args.output_json or Path(args.data_dir) / f"{Path(args.list_images).name}.json")
            listed = list_images(args.data_dir, args.list_images, args.json, args.skip_bad)
            write_json(out, listed, indent=1)
            print(f"wrote {out}: {len(listed['images'])} images of {Path(args.data_dir) / args.list_images}, "
                  f"{len(listed['categories'])} categories from {args.json}; predict with --data-dir "
                  f"{args.data_dir} --json {out}")
            return
        coco = load_coco(args.data_dir, args.json, skip_bad=args.skip_bad, decode=not args.no_decode)
        print(summarize(coco))
        print(f"checked: {len(coco)} image files {'headers read' if args.no_decode else 'decoded in full'}, "
              f"every annotation's image, category and segmentation")
        if args.vis:
            write_overlays(coco, args.vis, args.output_dir, open_mask_cache(args.mask_cache))
    except (DataError, WriteError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a folder that cannot be made: the message names it
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
