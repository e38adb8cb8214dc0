"""Training and evaluation samples: the dataset, augmentation presets (image and mask together), copy-paste of
rare objects, normalisation, the collate function for full-size masks, and train.py's sets built from its flags.

    ds = SegmentationDataset(coco, img_size=256, aug="basic", mask_cache="~/.cache/trashseg/masks")
    image, mask, meta = ds[0]            # float CHW normalised, int64 HW, {file_name, image_id, height, width}
"""
import os
import random
import warnings
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from coco import (IGNORE_INDEX, DataError, annotation_bitmap, load_coco, load_mask, open_mask_cache, pixel_counts,
                  read_image)
from faults import ignore_stop_signals

AUG_PRESETS = ("none", "basic", "strong", "scale")
# upright: photos keep their up (road scenes, underwater video, most photos): horizontal flips only;
# any: no up (top-down shots): vertical flips and 90-degree turns too
ORIENTATIONS = ("upright", "any")


def default_workers():
    """Loader processes by default: one per core left beside the training process, at most 8 (a 2-core laptop:
    1; a 16-core GPU machine: 8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


# ----------------------------------------------------------------------------- augmentation

class RandomRot90(v2.Transform):
    """Rotate image and mask together by a random multiple of 90 degrees (lossless, unlike RandomRotation)."""

    def make_params(self, flat_inputs):
        return {"k": int(torch.randint(4, ()))}

    def transform(self, inpt, params):
        if params["k"] == 0 or not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        return tv_tensors.wrap(torch.rot90(inpt, params["k"], dims=(-2, -1)), like=inpt)


def uniform(low, high):
    return float(torch.empty(()).uniform_(low, high))


class ScaleCrop:
    """mmsegmentation's standard training crop: the image resized by a random ratio of the training size (0.5-2.0,
    aspect kept: its shorter side becomes ratio x img_size), then a random img_size crop, padded with the ignore
    value where the image is smaller, drawn again (up to `tries` times) while one class covers more than
    `cat_max_ratio` of the crop's labelled pixels. Unlike 'basic', objects are also seen smaller than in the photo."""

    def __init__(self, img_size, ratio=(0.5, 2.0), cat_max_ratio=0.75, tries=10):
        self.size, self.ratio, self.cat_max_ratio, self.tries = img_size, ratio, cat_max_ratio, tries

    def __call__(self, image, mask):
        height, width = image.shape[-2:]
        scale = self.size * uniform(*self.ratio) / min(height, width)
        new = [max(1, round(height * scale)), max(1, round(width * scale))]
        image, mask = v2.functional.resize(image, new, antialias=True), v2.functional.resize(mask, new)
        pad = [0, 0, max(self.size - new[1], 0), max(self.size - new[0], 0)]  # left, top, right, bottom
        if pad[2] or pad[3]:
            image, mask = v2.functional.pad(image, pad, fill=0), v2.functional.pad(mask, pad, fill=IGNORE_INDEX)
        for _ in range(self.tries):
            top = int(torch.randint(image.shape[-2] - self.size + 1, ()))
            left = int(torch.randint(image.shape[-1] - self.size + 1, ()))
            crop = mask[..., top:top + self.size, left:left + self.size]
            counts = torch.unique(crop[crop != IGNORE_INDEX], return_counts=True)[1]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return (v2.functional.crop(image, top, left, self.size, self.size),
                v2.functional.crop(mask, top, left, self.size, self.size))


class PhotoMetricDistortion(v2.Transform):
    """mmsegmentation's PhotoMetricDistortion on the image (the mask is left alone): brightness +-32, contrast
    x0.5-1.5, saturation x0.5-1.5, hue +-18 (of 180), each with probability 0.5; contrast before or after the
    colour changes at random."""

    def make_params(self, flat_inputs):
        maybe = lambda low, high: uniform(low, high) if torch.rand(()) < 0.5 else None
        return {"brightness": maybe(-32, 32), "contrast": maybe(0.5, 1.5), "saturation": maybe(0.5, 1.5),
                "hue": maybe(-18 / 180, 18 / 180), "contrast_first": bool(torch.rand(()) < 0.5)}

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        image = inpt.as_subclass(torch.Tensor).float()
        if params["brightness"] is not None:
            image = (image + params["brightness"]).clamp(0, 255)
        if params["contrast"] is not None and params["contrast_first"]:
            image = (image * params["contrast"]).clamp(0, 255)
        image = image.round().to(torch.uint8)
        if params["saturation"] is not None:
            image = v2.functional.adjust_saturation(image, params["saturation"])
        if params["hue"] is not None:
            image = v2.functional.adjust_hue(image, params["hue"])
        if params["contrast"] is not None and not params["contrast_first"]:
            image = (image.float() * params["contrast"]).clamp(0, 255).round().to(torch.uint8)
        return tv_tensors.wrap(image, like=inpt)


def build_transform(preset, img_size, orientation="upright"):
    """Joint image+mask transform on uint8 tensors ending at img_size x img_size. v2 resamples tv_tensors.Mask
    with nearest, and photometric ops leave it alone, so mask values stay in the class set."""
    size = (img_size, img_size)
    if preset == "none":
        return v2.Resize(size, antialias=True)
    if preset not in AUG_PRESETS or orientation not in ORIENTATIONS:
        raise ValueError(f"unknown augmentation preset '{preset}' or orientation '{orientation}' (choose from "
                         f"{', '.join(AUG_PRESETS)}; {', '.join(ORIENTATIONS)})")
    crop = ScaleCrop(img_size) if preset == "scale" else v2.RandomResizedCrop(size, scale=(0.25, 1.0),
                                                                             ratio=(0.75, 1.333), antialias=True)
    ops = [crop, v2.RandomHorizontalFlip()]
    if orientation == "any":
        ops += [v2.RandomVerticalFlip(), RandomRot90()]
    if preset == "strong":
        ops += [v2.RandomApply([v2.ColorJitter(0.3, 0.3, 0.3, 0.05)], p=0.8),
                v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.2),
                v2.RandomApply([v2.JPEG((40, 95))], p=0.3)]
    if preset == "scale":
        ops.append(PhotoMetricDistortion())
    return v2.Compose(ops)


# mean and std on the 0-1 scale: torchvision's weights were trained on ImageNet statistics, the Lite weights on
# (x * 255 - 127) / 128; backbones.input_normalization says which a backbone takes
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
LITE_NORMALIZATION = {"mean": [127 / 255] * 3, "std": [128 / 255] * 3}


def normalize(image_uint8, normalization=IMAGENET_NORMALIZATION):
    """float CHW: (x / 255 - mean) / std with the mean and std the backbone's weights expect."""
    mean = torch.tensor(normalization["mean"]).view(3, 1, 1)
    std = torch.tensor(normalization["std"]).view(3, 1, 1)
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
    meta = {file_name, image_id, height, width} of the original image. mask_cache: a folder, 'none' or None;
    normalization: {mean, std} (backbones.input_normalization). skip_bad: False raises on a bad sample, True takes
    the next good one instead, "placeholder" returns a blank item whose meta["bad"] says what is wrong."""

    def __init__(self, coco, img_size=512, aug="none", mask_cache=None, copy_paste=None, skip_bad=False,
                 full_mask=False, with_masks=True, orientation="upright", normalization=IMAGENET_NORMALIZATION):
        self.coco = coco
        self.full_mask = full_mask  # validation: resize the image only, score against the original-size mask
        self.transform = build_transform(aug, img_size, orientation)
        self.normalization = normalization
        # random erasing is part of 'strong' but touches the image only, so it runs after the joint transform
        self.erase = v2.RandomErasing(p=0.25, scale=(0.02, 0.15), value=0) if aug == "strong" else None
        self.cache = open_mask_cache(mask_cache)
        self.copy_paste = copy_paste
        self.skip_bad = skip_bad
        self.labeled = coco.labeled and with_masks  # with_masks=False: images only, even from a labeled JSON
        self.pseudo = None  # training_set sets True/False: then meta says whether the masks are pseudo labels

    def __len__(self):
        return len(self.coco)

    def load(self, index):
        """uint8 image CHW and uint8 mask HW (None when unlabeled) at the original size."""
        img = self.coco.images[index]
        image = read_image(self.coco.image_path(img))
        if tuple(image.shape[1:]) != (img["height"], img["width"]):
            raise DataError(f"image file {self.coco.image_path(img)} is {image.shape[2]}x{image.shape[1]} "
                            f"but the JSON says {img['width']}x{img['height']}")
        if not self.labeled:
            return image, None
        return image, torch.from_numpy(load_mask(self.coco, index, self.cache))

    def placeholder(self, index, problem):
        """predict.py --skip-bad: a photo that cannot be read still yields an item (a blank image, its meta marked
        with the problem), so that its row is kept and marked instead of dropped."""
        img = self.coco.images[index]
        blank = self.transform(tv_tensors.Image(torch.zeros(3, img["height"], img["width"], dtype=torch.uint8)))
        blank = blank.as_subclass(torch.Tensor).float()
        meta = {"file_name": img["file_name"], "image_id": img["id"], "height": img["height"], "width": img["width"],
                "bad": problem}
        return (blank, None, meta) if self.labeled else (blank, meta)

    def load_named(self, index):
        """load(index), with any failure turned into a DataError that names the sample."""
        try:
            return self.load(index)
        except DataError:
            raise
        except Exception as e:
            img = self.coco.images[index]
            raise DataError(f"image {self.coco.image_path(img)} (id {img['id']}) of {self.coco.json_path}: "
                            f"{e.__class__.__name__}: {e}") from None

    def __getitem__(self, index):
        for _ in range(len(self)):  # with skip_bad, a bad sample is replaced by the next good one
            try:
                image, mask = self.load_named(index)
                break
            except DataError as e:
                if self.skip_bad == "placeholder":
                    return self.placeholder(index, str(e))
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping bad sample: {e}")
                index = (index + 1) % len(self)
        else:
            raise DataError(f"{self.coco.json_path}: every sample failed to load")
        img = self.coco.images[index]
        meta = {"file_name": img["file_name"], "image_id": img["id"], "height": img["height"], "width": img["width"]}
        if self.pseudo is not None:
            meta["pseudo"] = self.pseudo
        if mask is None or self.full_mask:
            image = normalize(self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor), self.normalization)
            return (image, meta) if mask is None else (image, mask.long(), meta)
        if self.copy_paste is not None:
            image, mask = self.copy_paste(image, mask, self.load)
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        image = normalize(image.as_subclass(torch.Tensor), self.normalization)
        if self.erase is not None:
            image = self.erase(image)
        return image, mask.as_subclass(torch.Tensor).long(), meta


def collate_full_masks(batch):
    """Batch for full_mask datasets: images stacked; masks (of differing sizes; None for unlabeled items) and
    metas as lists."""
    masks = [item[1] if len(item) == 3 else None for item in batch]
    return torch.stack([item[0] for item in batch]), masks, [item[-1] for item in batch]


# ----------------------------------------------------------------------------- train.py's sets, from its flags

def pseudo_overlap(pseudo, train_coco, val_names):
    """One line on pseudo-labelled photos that are also training or validation photos: training ones have real
    labels (their pseudo copy only repeats them), validation ones make the run transductive (its score is no longer
    one on unseen photos)."""
    names = {img["file_name"] for img in pseudo.images}
    parts = [(len(names & {img["file_name"] for img in train_coco.images}), "labelled training photos"),
             (len(names & set(val_names)), "validation photos: transductive, the validation score is not a held-out one")]
    return "".join(f"; {n} of them are {what}" for n, what in parts if n)


def training_set(args, train_coco, data, log, val_names=()):
    """Training set: the training JSON (with augmentation and copy-paste), plus pseudo-labelled images."""
    copy_paste = CopyPaste(train_coco, args.copy_paste_classes) if args.copy_paste else None
    if copy_paste:
        log.print(f"copy-paste classes: {', '.join(data['class_names'][c] for c in copy_paste.classes)} "
                  f"({len(copy_paste.sources)} objects)")
    common = {"orientation": args.orientation, "normalization": data["normalization"], "skip_bad": args.skip_bad}
    sets = [SegmentationDataset(train_coco, args.img_size, args.aug, args.mask_cache, copy_paste, **common)]
    if args.pseudo:
        pseudo = load_coco(args.data_dir, Path(args.pseudo) / "pseudo.json", class_names=data["class_names"])
        sets.append(SegmentationDataset(pseudo, args.img_size, args.aug, None, None, **common))
        log.print(f"pseudo labels: {len(pseudo)} images from {args.pseudo}" +
                  (f", loss weight {args.pseudo_weight}" if args.pseudo_weight != 1 else "") +
                  pseudo_overlap(pseudo, train_coco, val_names))
        for part in sets:  # each sample's meta says which kind it is, for --pseudo-weight
            part.pseudo = part is sets[-1]
    return torch.utils.data.ConcatDataset(sets)


def validation_loader(args, val_json, data, rank, world, device):
    """Validation at each image's original size, sharded over processes without padding: exact metrics."""
    val_coco = load_coco(args.data_dir, val_json, class_names=data["class_names"], skip_bad=args.skip_bad)
    if not val_coco.labeled:
        raise ValueError(f"{val_coco.json_path}: validation JSON has no annotations")
    val_set = SegmentationDataset(val_coco, args.img_size, "none", mask_cache=args.mask_cache, full_mask=True,
                                  normalization=data["normalization"])
    shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    return torch.utils.data.DataLoader(shard, batch_size=args.batch_size, num_workers=args.workers,
                                       collate_fn=collate_full_masks, pin_memory=device.type == "cuda",
                                       worker_init_fn=ignore_stop_signals)


def epoch_loader(train_set, sampler, epoch, args, device):
    """train.py's loader for one epoch (args: batch_size, workers, seed)."""
    if sampler:
        sampler.set_epoch(epoch)
    # a generator per epoch fixes shuffling and worker seeds, so a resumed epoch sees the same batches
    return torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True,
        num_workers=args.workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
