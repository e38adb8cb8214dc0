"""Optimizer and learning-rate schedule of train.py, fresh or as a checkpoint left them.

    optimizer = build_optimizer(model, "adamw", lr=2e-4, weight_decay=1e-4)
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, "poly"))
"""
import math

import torch

from checkpoint import set_rng_state


def param_groups(model, lr, weight_decay, encoder_lr_mult=1.0):
    """No weight decay on norms and biases (decaying them only hurts); with encoder_lr_mult != 1 the encoder's
    parameters get lr x encoder_lr_mult (a pretrained encoder needs smaller steps than a new decoder)."""
    parts = [list(model.named_parameters())]
    if encoder_lr_mult != 1.0:
        parts = [[(n, p) for n, p in parts[0] if n.startswith("encoder.")],
                 [(n, p) for n, p in parts[0] if not n.startswith("encoder.")]]
    groups = []
    for params, mult in zip(parts, [encoder_lr_mult, 1.0] if len(parts) == 2 else [1.0]):
        params = [p for _, p in params if p.requires_grad]
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lr": lr * mult},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr * mult}]
    return groups


def build_optimizer(model, name="adamw", lr=2e-4, weight_decay=1e-4, momentum=0.9, encoder_lr_mult=1.0):
    groups = param_groups(model, lr, weight_decay, encoder_lr_mult)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    # fused: one kernel over all tensors instead of a chain of small ops per tensor; the same update
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, fused=fused)
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def lr_factor(step, total, warmup, kind):
    """Multiplier of --lr at optimizer step `step` of `total`: linear warm-up, then the schedule."""
    if kind == "onecycle":  # cosine up to the peak over 30% of the run, then cosine down to ~0
        peak = max(1, int(0.3 * total))
        if step < peak:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * step / peak)) / 2
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * (step - peak) / max(1, total - peak))) / 2
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "poly":
        return (1 - progress) ** 0.9
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 0.1 ** int(progress * 3)  # step: x0.1 at 1/3 and 2/3 of the run


def training_state(model, steps_per_epoch, checkpoint, args, rank, device, log):
    """Optimizer, LR schedule, grad scaler, first epoch and best mIoU: fresh, or as the checkpoint left them."""
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay, args.momentum,
                                args.encoder_lr_mult)
    warmup = int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.epochs * steps_per_epoch, warmup, args.scheduler))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    if not checkpoint:
        return optimizer, scheduler, scaler, 0, -1.0
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"][rank] if rank < len(checkpoint["rng"]) else checkpoint["rng"][0])
    log.print(f"resumed at epoch {checkpoint['epoch'] + 1} (best mIoU {checkpoint['best_miou']:.4f})")
    return optimizer, scheduler, scaler, checkpoint["epoch"] + 1, checkpoint["best_miou"]
