"""Running a network on batches: mixed precision, test-time augmentation, and the one way a prediction is made at an
image's own size and scored. train.py's validation and predict.py --eval both go through `evaluate_batch`, so they
give the same mIoU for the same checkpoint.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from metrics import confusion_matrix, metrics_table, segmentation_metrics
from precision import autocast


def tta_flips(tta, orientation="any"):
    """The flips test-time augmentation averages: those the model was trained with (orientation 'upright':
    identity and horizontal flip; 'any': vertical flip too). Each is a tuple of dims for torch.flip."""
    if not tta:
        return [()]
    return [(), (-1,)] if orientation == "upright" else [(), (-1,), (-2,)]


@torch.no_grad()
def predict_probs(model, images, img_size, flips=((),), scales=(1.0,), precision="fp32", channels_last=False):
    """Softmax probabilities (N, C, img_size, img_size), averaged over scales and flips (tta_flips). Each view is
    its own forward pass (a batch of all views needs their memory at once and was not faster on the CPU:
    docs/performance.md). precision: precision.amp_precision's answer."""
    total = 0
    for scale in scales:
        size = max(8, round(img_size * scale))
        x = images if size == img_size else F.interpolate(images, size=(size, size), mode="bilinear",
                                                          align_corners=False)
        for dims in flips:
            view = x.flip(dims) if dims else x
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            with autocast(images.device, precision):
                logits = model(view).float()
            if size != img_size:
                logits = F.interpolate(logits, size=(img_size, img_size), mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
            total = total + (probs.flip(dims) if dims else probs)
    return total / (len(scales) * len(flips))


def to_image_size(probs, height, width):
    """One image's probabilities (C, h, w) resized bilinearly to its own height x width."""
    if tuple(probs.shape[1:]) == (height, width):
        return probs
    return F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def evaluate_batch(model, images, metas, img_size, flips=((),), scales=(1.0,), precision="fp32",
                   channels_last=False):
    """Per image of a batch: (probabilities at the image's own size, argmax prediction there)."""
    probs = predict_probs(model, images, img_size, flips, scales, precision, channels_last)
    full = [to_image_size(p, meta["height"], meta["width"]) for p, meta in zip(probs, metas)]
    return [(f, f.argmax(0)) for f in full]


@torch.no_grad()
def evaluate(model, loader, num_classes, device, img_size, precision="fp32", channels_last=False):
    """Confusion matrix over a loader of (images, full-size masks, metas), each image scored at its own size."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, masks, metas in loader:
        images = images.to(device, non_blocking=True)
        for (_, pred), mask in zip(evaluate_batch(model, images, metas, img_size, precision=precision,
                                                  channels_last=channels_last), masks):
            confusion += confusion_matrix(pred, mask.to(device), num_classes)
    return confusion


def validate(model, val_loader, class_names, epoch, args, world, device, log):
    """train.py's validation: one confusion matrix over the whole set (summed over processes), its metrics printed
    and logged."""
    confusion = evaluate(model, val_loader, len(class_names), device, args.img_size, args.precision,
                         args.channels_last)
    if world > 1:
        dist.all_reduce(confusion)
    confusion = confusion.cpu()
    metrics = segmentation_metrics(confusion, class_names)
    log.print(f"validation after epoch {epoch}:\n{metrics_table(metrics)}")
    log.log({"epoch": epoch, "val": metrics, "confusion": confusion.tolist()})
    return metrics, confusion
