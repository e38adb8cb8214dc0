"""The one metric every stage reports: a confusion matrix accumulated over a whole set, and aAcc / mAcc / mIoU and
per-class IoU from it. train.py, predict.py and ensemble.py all score with these functions.

Absent classes: a class absent from both ground truth and prediction has IoU NaN and is left out of the means; a
class absent from ground truth but predicted has IoU 0 and counts. Pixels of value IGNORE_INDEX count for nothing.
"""
import math

import torch

from coco import IGNORE_INDEX


def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE_INDEX):
    """(num_classes, num_classes) int64, rows = ground truth, columns = prediction; ignore_index pixels skipped."""
    target, pred = torch.as_tensor(target).long(), torch.as_tensor(pred).long()
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    # invalid pixels go to an extra bin that is dropped: cheaper than boolean indexing
    index = torch.where(valid, target * num_classes + pred, num_classes ** 2)
    counts = torch.bincount(index.flatten(), minlength=num_classes ** 2 + 1)
    return counts[:num_classes ** 2].reshape(num_classes, num_classes)


def iou_per_class(confusion):
    """float64 IoU of each class: NaN where the class is in neither ground truth nor prediction."""
    cm = torch.as_tensor(confusion, dtype=torch.float64).cpu()
    tp, union = cm.diag(), cm.sum(0) + cm.sum(1) - cm.diag()
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def segmentation_metrics(confusion, class_names):
    """aAcc, mAcc, mIoU and per-class IoU / accuracy / pixel counts from one confusion matrix."""
    cm = torch.as_tensor(confusion, dtype=torch.float64).cpu()
    tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    iou = iou_per_class(cm)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    per_class = {name: {"IoU": float(iou[c]), "Acc": float(acc[c]), "gt_pixels": int(gt[c]),
                        "pred_pixels": int(pred[c]), "mistaken_for": mistaken_for(cm, c, class_names)}
                 for c, name in enumerate(class_names)}
    return {"aAcc": float(tp.sum() / cm.sum().clamp(min=1)), "mAcc": float(acc.nanmean()),
            "mIoU": float(iou.nanmean()), "per_class": per_class}


def mistaken_for(confusion, c, class_names):
    """The other class that takes the largest share of class c's ground-truth pixels, as {class, share}; None when
    c has no pixels or none went elsewhere. Tells a missed object (Background) from a confused material."""
    row = confusion[c].clone()
    total, row[c] = row.sum(), 0
    if total == 0 or row.max() == 0:
        return None
    other = int(row.argmax())
    return {"class": class_names[other], "share": float(row[other] / total)}


def per_image_iou(pred, target, num_classes):
    """IoU per class of one image (NaN where the class is in neither) and their mean, by the same rules."""
    iou = iou_per_class(confusion_matrix(pred, target, num_classes))
    return iou.tolist(), float(iou.nanmean())


def metrics_table(metrics):
    """Printable per-class table; a NaN IoU is shown as '-' with why."""
    def cell(value):
        return f"{'-':>8}" if math.isnan(value) else f"{100 * value:>8.2f}"
    lines = [f"{'class':<16}{'IoU':>8}{'Acc':>8}{'gt px':>11}{'pred px':>11}  most mistaken for"]
    for name, m in metrics["per_class"].items():
        other = m["mistaken_for"]
        mistaken = f"{other['class'][:15]} {100 * other['share']:.0f}%" if other else ""
        if math.isnan(m["IoU"]):
            note = "  absent from ground truth and prediction: not in the means"
        elif m["gt_pixels"] == 0:
            note = "  absent from ground truth but predicted: IoU 0, counted"
        else:
            note = ""
        lines.append(f"{name[:15]:<16}{cell(m['IoU'])}{cell(m['Acc'])}{m['gt_pixels']:>11}{m['pred_pixels']:>11}"
                     f"  {mistaken:<24}{note}".rstrip())
    lines.append(f"aAcc {100 * metrics['aAcc']:.2f}  mAcc {100 * metrics['mAcc']:.2f}  mIoU {100 * metrics['mIoU']:.2f}")
    return "\n".join(lines)
