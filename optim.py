"""Optimizer and learning-rate schedule of train.py, fresh or as a checkpoint left them.

    optimizer = build_optimizer(model, "adamw", lr=2e-4, weight_decay=1e-4)
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, "poly"))
    ema = WeightAverage(model, 0.999); ...; ema.update()   # after each optimizer step; ema.model validates
"""
import copy
import math

import torch

from checkpoint import set_rng_state


# Swin's position tables are biases too; Mask2Former's query and level embeddings are not decayed by its reference
NO_DECAY_NAMES = ("relative_position_bias_table", "query_feat.weight", "query_pos.weight", "level_embed",
                  "level_embed.weight")


def lr_multipliers(model, encoder_lr_mult=1.0, layer_decay=1.0):
    """Each parameter's multiple of --lr: the head's 1; the encoder's encoder_lr_mult, times layer_decay once per
    block between it and the head (the deepest block once, the stem most), as the ConvNeXt and BEiT fine-tuning
    recipes do."""
    stages = getattr(getattr(model, "encoder", None), "stage_paths", [])
    blocks, last_of_stage = [path for paths in stages for path in paths], [paths[-1] for paths in stages]
    multipliers = {}
    for name, _ in model.named_parameters():
        if not name.startswith("encoder."):
            multipliers[name] = 1.0
            continue
        if not blocks:  # an encoder with no block list (a peer's network in bench.py): no layer decay
            multipliers[name] = encoder_lr_mult
            continue
        if name.startswith("encoder.norms."):  # a stage's output norm sits with that stage's last block
            block = last_of_stage[int(name.split(".")[2])]
        else:
            block = next((b for b in blocks if name.startswith(f"encoder.net.{b}.")), blocks[0])
        multipliers[name] = encoder_lr_mult * layer_decay ** (len(blocks) - blocks.index(block))
    return multipliers


def param_groups(model, lr, weight_decay, encoder_lr_mult=1.0, layer_decay=1.0):
    """One group per learning rate and decay: no weight decay on norms, biases and Swin's position tables
    (decaying them only hurts); learning rates from lr_multipliers (a pretrained encoder needs smaller steps
    than a new decoder, its early blocks smaller still)."""
    multipliers = lr_multipliers(model, encoder_lr_mult, layer_decay)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not name.endswith(NO_DECAY_NAMES)
        groups.setdefault((multipliers[name], decay), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * mult}
            for (mult, decay), params in sorted(groups.items(), key=lambda item: (item[0][0], not item[0][1]))]


def build_optimizer(model, name="adamw", lr=2e-4, weight_decay=1e-4, momentum=0.9, encoder_lr_mult=1.0,
                    layer_decay=1.0):
    groups = param_groups(model, lr, weight_decay, encoder_lr_mult, layer_decay)
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
                                args.encoder_lr_mult, getattr(args, "layer_decay", 1.0))
    warmup = int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.epochs * steps_per_epoch, warmup, args.scheduler))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if not checkpoint:
        return optimizer, scheduler, scaler, 0, -1.0
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"][rank] if rank < len(checkpoint["rng"]) else checkpoint["rng"][0])
    log.print(f"resumed at epoch {checkpoint['epoch'] + 1} (best mIoU {checkpoint['best_miou']:.4f})")
    return optimizer, scheduler, scaler, checkpoint["epoch"] + 1, checkpoint["best_miou"]


class WeightAverage:
    """train.py --ema DECAY: an exponential moving average of the weights (and of BatchNorm's running statistics),
    updated after every optimizer step; it is what validates and what best.pt/last.pt hold as "model". The decay
    starts low and rises to DECAY, min(DECAY, (1 + n) / (10 + n)) at update n (TensorFlow's ExponentialMovingAverage
    with num_updates), so that a short CPU run is not dominated by its random start."""

    def __init__(self, model, decay, updates=0):
        if not 0 < decay < 1:
            raise ValueError(f"--ema decay must lie between 0 and 1, not {decay}")
        self.source, self.decay, self.updates = model, decay, updates
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.model.state_dict().values(), self.source.state_dict().values()):
            if average.is_floating_point():
                average.lerp_(current.detach(), 1 - decay)
            else:  # BatchNorm's batch counter
                average.copy_(current)
