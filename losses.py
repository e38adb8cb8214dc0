"""Losses for semantic segmentation: cross-entropy, focal, dice, their weighted sums from a spec string, and class
weights from pixel counts. Every loss is computed in fp32 (safe under fp16/bf16 autocast) and skips ignore_index.

    build_loss("ce:0.75,dice:0.25", num_classes=11)     # weighted sum
    build_loss("focal+dice", num_classes=11)            # equal weights
    class_weights(pixel_counts, "log")                  # --class-weights inverse|log|median
"""
import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from assignment import linear_sum_assignment
from coco import IGNORE_INDEX, pixel_counts

WEIGHT_METHODS = ("inverse", "log", "median")


class CrossEntropyLoss(nn.Module):
    def __init__(self, weight=None, ignore_index=IGNORE_INDEX):
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.ignore_index = ignore_index

    def forward(self, logits, target):
        if not (target != self.ignore_index).any():
            return logits.float().sum() * 0.0  # nothing to learn from; keep the graph for DDP
        return F.cross_entropy(logits.float(), target, weight=self.weight, ignore_index=self.ignore_index)


class FocalLoss(nn.Module):
    """Multi-class softmax focal loss, -alpha_t (1 - p_t)^gamma log p_t (Lin et al. 2017), averaged like
    weighted cross-entropy (divided by the summed alpha of valid pixels), so gamma=0 equals CrossEntropyLoss with
    the same class weights."""

    def __init__(self, gamma=2.0, alpha=None, ignore_index=IGNORE_INDEX):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))
        self.ignore_index = ignore_index

    def forward(self, logits, target):
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, 0).unsqueeze(1)
        log_pt = F.log_softmax(logits.float(), dim=1).gather(1, safe_target).squeeze(1)
        loss = -((1.0 - log_pt.exp()).clamp(min=0) ** self.gamma) * log_pt
        weight = valid.float() if self.alpha is None else self.alpha[safe_target.squeeze(1)] * valid
        return (loss * weight).sum() / weight.sum().clamp(min=1e-12)


class DiceLoss(nn.Module):
    """Soft multi-class dice on softmax probabilities over the whole batch: 1 - mean_c (2 I_c + s) / (P_c + G_c + s).
    Rule for absent classes: the mean runs over the classes present in the target or in the argmax prediction;
    a class absent from both contributes nothing (it would add a free ~0 loss term and dilute the rest), while a
    class predicted but absent from the target still counts, so false positives are punished."""

    def __init__(self, smooth=1.0, ignore_index=IGNORE_INDEX):
        super().__init__()
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits, target):
        num_classes = logits.shape[1]
        valid = (target != self.ignore_index).unsqueeze(1)
        probs = F.softmax(logits.float(), dim=1) * valid
        onehot = F.one_hot(torch.where(valid.squeeze(1), target, 0), num_classes).permute(0, 3, 1, 2) * valid
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        pred_sum, target_sum = probs.sum(dims), onehot.sum(dims).float()
        dice = (2 * intersection + self.smooth) / (pred_sum + target_sum + self.smooth)
        predicted = F.one_hot(logits.argmax(1), num_classes).permute(0, 3, 1, 2).mul(valid).sum(dims) > 0
        counted = (target_sum > 0) | predicted
        if not counted.any():
            return logits.float().sum() * 0.0
        return (1.0 - dice)[counted].mean()


class CombinedLoss(nn.Module):
    """Weighted sum of named losses; forward returns the total, `parts` holds each term of the last call."""

    def __init__(self, terms):
        super().__init__()
        self.names = [name for name, _, _ in terms]
        self.weights = [w for _, w, _ in terms]
        self.losses = nn.ModuleList(loss for _, _, loss in terms)
        self.parts = {}

    def forward(self, logits, target):
        total = 0.0
        for name, w, loss in zip(self.names, self.weights, self.losses):
            value = loss(logits, target)
            self.parts[name] = float(value.detach())
            total = total + w * value
        return total


def weighted_loss(loss_fn, logits, masks, sample_weight):
    """loss_fn over the batch; with sample_weight (one per image) the images of each weight are scored apart and
    the parts averaged by image count x weight, so that the weight scales what those images teach whatever the
    loss (cross-entropy, focal, dice). A part with no labelled pixel (an all-ignored pseudo mask) adds nothing."""
    if sample_weight is None:
        return loss_fn(logits, masks)
    total = logits.new_zeros(())
    for w in sample_weight.unique():
        part = sample_weight == w
        if w > 0 and (masks[part] != IGNORE_INDEX).any():
            total = total + loss_fn(logits[part], masks[part]) * (w * part.sum())
    return total / len(sample_weight)


def parse_loss_spec(spec):
    """'ce:0.75,dice:0.25' or 'focal+dice' -> [('ce', 0.75), ('dice', 0.25)] / [('focal', 1.0), ('dice', 1.0)]."""
    terms = []
    for part in spec.replace("+", ",").split(","):
        name, _, weight = part.strip().partition(":")
        if name not in ("ce", "focal", "dice"):
            raise ValueError(f"unknown loss '{name}' in '{spec}' (known: ce, focal, dice)")
        try:
            terms.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"loss weight '{weight}' in '{spec}' is not a number") from None
    return terms


def build_loss(spec="ce", class_weight=None, focal_gamma=2.0, ignore_index=IGNORE_INDEX):
    """Loss from a spec string; class_weight (per class) goes to cross-entropy and to focal's alpha."""
    made = {"ce": lambda: CrossEntropyLoss(class_weight, ignore_index),
            "focal": lambda: FocalLoss(focal_gamma, class_weight, ignore_index),
            "dice": lambda: DiceLoss(ignore_index=ignore_index)}
    return CombinedLoss([(name, w, made[name]()) for name, w in parse_loss_spec(spec)])


def class_weights(counts, method):
    """Per-class loss weights from pixel counts, normalised to mean 1 over the classes.
    counts: (C,) totals, or (num_images, C) per image (median then uses each class's frequency over the images
    that hold it, as Eigen & Fergus define it).
      inverse: 1 / f_c;  log: 1 / ln(1.02 + f_c) (ENet);  median: median(f) / f_c.
    A class with no pixels gets the largest weight among the present classes: finite, and harmless, since it never
    occurs as a target. No pixels at all gives all ones."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(0) if counts.ndim == 2 else counts
    present = totals > 0
    if not present.any():
        return torch.ones(len(totals))
    if method == "median" and counts.ndim == 2:
        image_pixels = counts.sum(1, keepdims=True)
        freq = totals / np.maximum(((counts > 0) * image_pixels).sum(0), 1)
    else:
        freq = totals / totals.sum()
    raw = np.zeros_like(freq)
    if method == "inverse":
        raw[present] = 1.0 / freq[present]
    elif method == "log":
        raw[present] = 1.0 / np.log(1.02 + freq[present])
    elif method == "median":
        raw[present] = np.median(freq[present]) / freq[present]
    else:
        raise ValueError(f"unknown class-weight method '{method}' (choose from {', '.join(WEIGHT_METHODS)})")
    raw[~present] = raw[present].max()
    return torch.tensor(raw / raw.mean(), dtype=torch.float32)


def capped(weights, cap):
    """Weights bounded at cap x the smallest one (cap None: unchanged). The losses divide by the weights of the
    pixels they count, so only the ratios matter."""
    if cap is None:
        return weights
    if cap < 1:
        raise ValueError(f"--class-weight-cap must be at least 1, not {cap}")
    return torch.minimum(weights, weights.min() * cap)


def run_class_weights(spec, counts, class_names, cap=None):
    """train.py --class-weights: a method (WEIGHT_METHODS) on the training set's pixel counts, or explicit
    'Name=value,...' pairs (classes not named get 1) checked against the class list by name; then the cap."""
    if spec in WEIGHT_METHODS:
        return capped(class_weights(counts, spec), cap)
    weights = torch.ones(len(class_names))
    for pair in spec.split(","):
        name, sep, value = pair.partition("=")
        if not sep or name.strip() not in class_names:
            raise ValueError(f"--class-weights '{pair}': expected a method ({', '.join(WEIGHT_METHODS)}) or "
                             f"Name=value pairs with names from the class list ({', '.join(class_names)})")
        try:
            weights[class_names.index(name.strip())] = float(value)
        except ValueError:
            raise ValueError(f"--class-weights '{pair}': '{value}' is not a number") from None
    if (weights < 0).any():
        raise ValueError(f"--class-weights {spec}: weights must not be negative")
    return capped(weights, cap)


def main():
    p = argparse.ArgumentParser(description="Print class weights for pixel counts, e.g. --counts 900 90 9 0")
    p.add_argument("--counts", type=float, nargs="+", required=True)
    args = p.parse_args()
    for m in WEIGHT_METHODS:
        print(f"{m:>8}: " + " ".join(f"{w:.4f}" for w in class_weights(args.counts, m).tolist()))


if __name__ == "__main__":
    main()


def training_loss(out, masks, loss_fn, aux_weight, sample_weight=None):
    """The loss of the main logits, plus aux_weight x that of the auxiliary head's where the network has one; a
    mask-classification network's output (a dict) goes to its set loss whole."""
    if isinstance(out, dict):
        return loss_fn(out, masks)
    logits, aux_logits = out if isinstance(out, tuple) else (out, None)
    aux_loss = 0.0
    if aux_logits is not None:
        aux_loss = weighted_loss(loss_fn, aux_logits, masks, sample_weight) * aux_weight
    return weighted_loss(loss_fn, logits, masks, sample_weight) + aux_loss  # main loss last: its parts are logged


# ----------------------------------------------------------------------------- Mask2Former's set loss

def point_sample(maps, points):
    """maps (N, C, H, W) at points (N, P, 2) given as (x, y) in [0, 1]: (N, C, P), bilinear."""
    return F.grid_sample(maps, 2 * points[:, :, None, :] - 1, mode="bilinear", align_corners=False)[..., 0]


def uncertain_points(mask_logits, count, oversample=3.0, importance=0.75):
    """PointRend's training points: of count x oversample random points, the importance share whose logits lie
    nearest 0 (uncertainty -|logit|), and the rest at random. mask_logits (N, 1, H, W) -> (N, count, 2)."""
    n = mask_logits.shape[0]
    candidates = torch.rand(n, int(count * oversample), 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits, candidates)[:, 0].abs()
    k = int(importance * count)
    chosen = uncertainty.topk(k, dim=1).indices
    picked = candidates.gather(1, chosen[..., None].expand(-1, -1, 2))
    return torch.cat([picked, torch.rand(n, count - k, 2, device=mask_logits.device)], dim=1)


def class_masks(masks, ignore_index=IGNORE_INDEX):
    """Per image of a (B, H, W) label map: (classes present, their binary masks (n, H, W), valid pixels (H, W)):
    one target mask per class; ignored pixels belong to none and count in no mask loss."""
    targets = []
    for m in masks:
        labels = m.unique()
        labels = labels[labels != ignore_index]
        targets.append((labels, (m[None] == labels[:, None, None]).float(), (m != ignore_index).float()))
    return targets


def pairwise_mask_costs(pred, target, weight):
    """Per-point sigmoid cross-entropy and dice cost of every prediction (Q, P) against every target (n, P), over
    the valid points (weight (P,)): two (Q, n) matrices."""
    norm = weight.sum().clamp_min(1)
    pos, neg = F.softplus(-pred) * weight, F.softplus(pred) * weight
    bce = (pos @ target.T + neg @ (1 - target).T) / norm
    prob = pred.sigmoid() * weight
    dice = 1 - (2 * prob @ target.T + 1) / (prob.sum(-1)[:, None] + (target * weight).sum(-1)[None, :] + 1)
    return bce, dice


class MaskSetLoss(nn.Module):
    """Mask2Former's loss for semantic segmentation: each prediction's queries are matched to the image's class
    masks (Hungarian, cost 2 class + 5 BCE + 5 dice on `points` random points), then class cross-entropy (no-object
    weighted 0.1) x 2 over all queries, and mask BCE x 5 and dice x 5 over the matched ones on PointRend's
    uncertain points, each divided by the number of target masks; summed over the final and every intermediate
    prediction. Matching and losses run in fp32 even under autocast (users of the reference report NaN in fp16)."""

    def __init__(self, num_classes, points=12544, no_object_weight=0.1, weights=(2.0, 5.0, 5.0),
                 ignore_index=IGNORE_INDEX):
        super().__init__()
        self.points, self.weights, self.ignore_index = points, weights, ignore_index
        empty = torch.ones(num_classes + 1)
        empty[-1] = no_object_weight
        self.register_buffer("class_weight", empty)
        self.parts = {}

    @torch.no_grad()
    def match(self, logits, mask_logits, targets):
        """[(query indices, target indices)] per image, the least-cost assignment."""
        matches = []
        for b, (labels, target, valid) in enumerate(targets):
            points = torch.rand(1, self.points, 2, device=logits.device)
            pred = point_sample(mask_logits[b][:, None], points.expand(mask_logits.shape[1], -1, -1))[:, 0]
            tgt = point_sample(target[:, None], points.expand(len(labels), -1, -1))[:, 0]
            weight = point_sample(valid[None, None], points)[0, 0]
            bce, dice = pairwise_mask_costs(pred, tgt, weight)
            cost = self.weights[0] * -logits[b].softmax(-1)[:, labels] + self.weights[1] * bce + self.weights[2] * dice
            rows, cols = linear_sum_assignment(cost)
            order = cols.argsort()  # in target order, so that the query order cannot change what is sampled
            matches.append((torch.as_tensor(rows[order], device=logits.device),
                            torch.as_tensor(cols[order], device=logits.device)))
        return matches

    def prediction_loss(self, logits, mask_logits, targets, num_masks):
        """(class, mask BCE, dice) losses of one prediction."""
        matches = self.match(logits, mask_logits, targets)
        classes = torch.full(logits.shape[:2], logits.shape[-1] - 1, dtype=torch.long, device=logits.device)
        for b, (rows, cols) in enumerate(matches):
            classes[b, rows] = targets[b][0][cols]
        class_loss = F.cross_entropy(logits.transpose(1, 2), classes, weight=self.class_weight)
        pred = torch.cat([mask_logits[b][rows] for b, (rows, _) in enumerate(matches)])[:, None]
        if pred.shape[0] == 0:  # nothing labelled in the batch: only the class loss teaches
            return class_loss, mask_logits.sum() * 0, mask_logits.sum() * 0
        target = torch.cat([targets[b][1][cols] for b, (_, cols) in enumerate(matches)])[:, None]
        valid = torch.cat([targets[b][2][None].expand(len(cols), -1, -1) for b, (_, cols) in enumerate(matches)])
        with torch.no_grad():
            points = uncertain_points(pred, self.points)
            labels = point_sample(target, points)[:, 0]
            weight = point_sample(valid[:, None], points)[:, 0]
        point_logits = point_sample(pred, points)[:, 0]
        bce = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none")
        mask_loss = ((bce * weight).sum(1) / weight.sum(1).clamp_min(1)).sum() / num_masks
        prob = point_logits.sigmoid() * weight
        dice = 1 - (2 * (prob * labels).sum(1) + 1) / (prob.sum(1) + (labels * weight).sum(1) + 1)
        return class_loss, mask_loss, dice.sum() / num_masks

    def forward(self, out, masks):
        with torch.autocast(masks.device.type, enabled=False):
            targets = class_masks(masks, self.ignore_index)
            num_masks = max(sum(len(t[0]) for t in targets), 1)
            total, parts = 0.0, None
            for logits, mask_logits in [(out["logits"], out["masks"])] + list(out["aux"]):
                losses = self.prediction_loss(logits.float(), mask_logits.float(), targets, num_masks)
                total = total + sum(w * loss for w, loss in zip(self.weights, losses))
                parts = parts or losses  # the final prediction's, for the log
        self.parts = {name: float(v.detach()) for name, v in zip(("class", "mask", "dice"), parts)}
        return total


def training_criterion(args, train_coco, class_names, device, log):
    """train.py's loss from its flags: the set loss for mask2former, else --loss with --class-weights."""
    if args.arch == "mask2former":  # mask classification: its own set loss, not a per-pixel one
        if args.loss != "ce" or args.class_weights or args.pseudo_weight != 1:
            raise ValueError("mask2former trains with its set loss: --loss, --class-weights and --pseudo-weight "
                             "apply to the per-pixel networks")
        return MaskSetLoss(len(class_names)).to(device)
    weight = None
    if args.class_weights:
        weight = run_class_weights(args.class_weights, pixel_counts(train_coco), class_names, args.class_weight_cap)
        log.print(f"class weights ({args.class_weights}): " +
                  ", ".join(f"{n} {w:.3g}" for n, w in zip(class_names, weight.tolist())))
    return build_loss(args.loss, weight, args.focal_gamma).to(device)
