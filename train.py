"""Train a segmentation network on COCO-annotated photos; validate with mIoU; checkpoint atomically; resume.

    python train.py --fold 0 --amp                                   # data/folds/{train,val}_fold0.json
    python train.py --train-json train.json --val-json val.json      # explicit files
    python train.py --fold 0 --resume                                # continue runs/<arch>_<backbone>_fold0
    torchrun --nproc_per_node 4 train.py --fold 0 --amp              # DistributedDataParallel
    python train.py --test-only --resume runs/x/best.pt --fold 0     # validate a checkpoint

Defaults are a GPU recipe for 512x512 photos; README gives a CPU-sized command.
"""
import argparse
import datetime
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from data import (AUG_PRESETS, CopyPaste, DataError, SegmentationDataset, collate_full_masks, default_cache_dir,
                  load_coco, pixel_counts, to_json, write_json)
from losses import IGNORE_INDEX, WEIGHT_METHODS, build_loss, class_weights
from model import ARCHS, BACKBONES, ModelError, build_model, load_state_file

NAN_PATIENCE = 20  # consecutive non-finite losses before a run stops
RUN_ONLY_FLAGS = {"resume", "test_only", "force", "stop_after", "device", "output_dir"}  # never taken from a checkpoint
# the flags that shape the network, each with what checkpoints written before the flag existed were built with
NETWORK_FLAGS = {"arch": None, "backbone": None, "output_stride": None, "separable": False, "decoder_convs": 2}


def checkpoint_network(saved_args):
    """build_model's arch, backbone and keywords for a checkpoint's saved args."""
    return {key: saved_args.get(key, before) for key, before in NETWORK_FLAGS.items()}


# ----------------------------------------------------------------------------- metrics (shared with predict/ensemble)

def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE_INDEX):
    """(num_classes, num_classes) int64, rows = ground truth, columns = prediction; ignore_index pixels skipped."""
    target, pred = target.long(), pred.long()
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    # invalid pixels go to an extra bin that is dropped: cheaper than boolean indexing
    index = torch.where(valid, target * num_classes + pred, num_classes ** 2)
    counts = torch.bincount(index.flatten(), minlength=num_classes ** 2 + 1)
    return counts[:num_classes ** 2].reshape(num_classes, num_classes)


def segmentation_metrics(confusion, class_names):
    """aAcc, mAcc, mIoU and per-class IoU / accuracy from one confusion matrix accumulated over a whole set.
    A class absent from both ground truth and prediction has IoU and accuracy NaN and is left out of the means;
    a class absent from ground truth but predicted has IoU 0 (counted) and accuracy NaN."""
    cm = torch.as_tensor(confusion, dtype=torch.float64).cpu()
    tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    return {"aAcc": float(tp.sum() / cm.sum().clamp(min=1)), "mAcc": float(acc.nanmean()),
            "mIoU": float(iou.nanmean()),
            "per_class": {name: {"IoU": float(iou[c]), "Acc": float(acc[c]), "gt_pixels": int(gt[c]),
                                 "pred_pixels": int(pred[c])} for c, name in enumerate(class_names)}}


def metrics_table(metrics):
    """Printable per-class table; a NaN IoU is shown as '-' with why."""
    lines = [f"{'class':<16}{'IoU':>8}{'Acc':>8}{'gt px':>11}{'pred px':>11}"]
    for name, m in metrics["per_class"].items():
        if math.isnan(m["IoU"]):
            note = "  absent from ground truth and prediction: not in the means"
        elif m["gt_pixels"] == 0:
            note = "  absent from ground truth but predicted: IoU 0, counted"
        else:
            note = ""
        fmt = lambda v: f"{'-':>8}" if math.isnan(v) else f"{100 * v:>8.2f}"
        lines.append(f"{name[:15]:<16}{fmt(m['IoU'])}{fmt(m['Acc'])}{m['gt_pixels']:>11}{m['pred_pixels']:>11}{note}")
    lines.append(f"aAcc {100 * metrics['aAcc']:.2f}  mAcc {100 * metrics['mAcc']:.2f}  mIoU {100 * metrics['mIoU']:.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- set-up helpers

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--fold", type=int, default=0, help="use <data-dir>/folds/{train,val}_fold<k>.json")
    p.add_argument("--folds-dir", help="where folds.py wrote the fold JSONs (default <data-dir>/folds)")
    p.add_argument("--train-json", help="explicit training JSON (path, or name under --data-dir)")
    p.add_argument("--val-json", help="explicit validation JSON; 'none' trains on everything without validation")
    p.add_argument("--arch", default="deeplabv3plus", choices=ARCHS)
    p.add_argument("--backbone", default="resnet50", choices=list(BACKBONES))
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="default: 16 for DeepLabV3+ where possible")
    p.add_argument("--separable", action=argparse.BooleanOptionalAction, default=True,
                   help="depthwise-separable 3x3 convs in the DeepLabV3+ head (ASPP and decoder)")
    p.add_argument("--decoder-convs", type=int, default=1,
                   help="3x3 convs after the DeepLabV3+ decoder's fusion (SMP: 1; the paper: 2)")
    p.add_argument("--img-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop after this epoch (schedule still planned for --epochs); --resume continues")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="per process")
    p.add_argument("--accum-steps", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adam", "sgd"))
    p.add_argument("--momentum", type=float, default=0.9, help="sgd only")
    p.add_argument("--scheduler", default="poly", choices=("poly", "cosine", "onecycle", "step"))
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--loss", default="ce", help="e.g. ce, focal, ce:0.75,dice:0.25, focal+dice")
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--class-weights", choices=WEIGHT_METHODS, help="weights from the training set's pixel counts")
    p.add_argument("--aug", default="basic", choices=AUG_PRESETS)
    p.add_argument("--copy-paste", action="store_true", help="paste objects of the rarest classes")
    p.add_argument("--copy-paste-classes", nargs="+", help="class names to paste (default: the 2 rarest by pixels)")
    p.add_argument("--pseudo", metavar="DIR", help="add images with predicted masks from predict.py --pseudo")
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--mask-cache", default=str(default_cache_dir()), help="folder, or 'none'")
    p.add_argument("--skip-bad", action="store_true", help="skip bad images/annotations with a warning")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--amp", action="store_true", help="fp16 + GradScaler on CUDA, bf16 autocast on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="torchvision ImageNet weights for the backbone (--no-pretrained: from scratch)")
    p.add_argument("--weights", metavar="FILE", help="local weights: a backbone or whole-model state dict")
    p.add_argument("--output-dir", help="default runs/<arch>_<backbone>_fold<k>")
    p.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                   help="continue from PATH, or from <output-dir>/last.pt without one")
    p.add_argument("--force", action="store_true", help="start afresh in an output dir that holds a run")
    p.add_argument("--test-only", action="store_true", help="only validate (the --resume checkpoint)")
    p.add_argument("--val-every", type=int, default=1, metavar="EPOCHS")
    p.add_argument("--print-freq", type=int, default=20, metavar="STEPS")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    return p.parse_args(argv)


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on GPUs, gloo on CPU. Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        rank = dist.get_rank()
        device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    else:
        rank, device = 0, torch.device(args.device or ("cuda" if cuda else "cpu"))
    return rank, world, device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_jsons(args):
    folds_dir = Path(args.folds_dir) if args.folds_dir else Path(args.data_dir) / "folds"
    train = args.train_json or folds_dir / f"train_fold{args.fold}.json"
    val = args.val_json or folds_dir / f"val_fold{args.fold}.json"
    return train, None if str(val).lower() == "none" else val


def build_optimizer(model, args):
    # no weight decay on norms and biases: decaying them only hurts
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    # fused: one kernel over all tensors instead of a chain of small ops per tensor; the same update, and a
    # resnet18 DeepLabV3+ step of AdamW took 4 ms instead of 27 on this project's CPU. cpu and cuda have it.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(groups, lr=args.lr, fused=fused)
    return torch.optim.AdamW(groups, lr=args.lr, fused=fused)


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


def autocast(device, enabled):
    """fp16 on CUDA (with a GradScaler), bf16 on CPU (no scaler needed)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def save_checkpoint(state, path):
    """Atomic: a crash mid-write leaves the previous file intact."""
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state():
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
            with open(self.file, "a") as f:
                f.write(to_json(record) + "\n")


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def evaluate(model, loader, num_classes, device, amp=False, channels_last=False, world=1):
    """Confusion matrix over the whole loader at each image's original size (summed over ranks)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, masks, _ in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        for logit, mask in zip(logits.float(), masks):
            mask = mask.to(device)
            full = nn.functional.interpolate(logit[None], size=mask.shape, mode="bilinear", align_corners=False)
            confusion += confusion_matrix(full[0].argmax(0), mask, num_classes)
    if world > 1:
        dist.all_reduce(confusion)
    return confusion.cpu()


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed(args)
    log = Logger(None, rank)
    try:
        run(args, rank, world, device)
    except (DataError, ModelError, ValueError) as e:
        log.print(f"error: {e}")
        sys.exit(2)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, world, device):
    seed_everything(args.seed + rank)
    resume_path = None
    if args.resume and args.resume != "auto":
        resume_path = Path(args.resume)
    output_dir = Path(args.output_dir or (resume_path.parent if resume_path else
                                          Path("runs") / f"{args.arch}_{args.backbone}_fold{args.fold}"))
    if args.resume == "auto":
        resume_path = output_dir / "last.pt"
    checkpoint = None
    if resume_path:
        if not resume_path.is_file():
            raise ValueError(f"{resume_path}: no checkpoint to resume from")
        checkpoint = load_state_file(resume_path, "checkpoint")
        if not isinstance(checkpoint, dict) or "args" not in checkpoint or "optimizer" not in checkpoint:
            raise ValueError(f"{resume_path}: not a train.py checkpoint")
        # flags left at their defaults take the checkpoint's values, so a bare --resume continues the same run
        defaults = vars(get_args([]))
        for key, value in checkpoint["args"].items():
            if key not in RUN_ONLY_FLAGS and key in defaults and getattr(args, key) == defaults[key]:
                setattr(args, key, value)
        for key, value in checkpoint_network(checkpoint["args"]).items():  # the network must match
            setattr(args, key, value)
        args.img_size = checkpoint["args"]["img_size"]
    if not checkpoint and not args.test_only and (output_dir / "last.pt").exists():
        if not args.force:
            raise ValueError(f"{output_dir} holds a run (last.pt): --resume to continue it, --force to start "
                             f"over, or another --output-dir")
        if rank == 0:
            (output_dir / "log.jsonl").unlink(missing_ok=True)
    if rank == 0 and not args.test_only:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "config.json", vars(args), indent=1)
    log = Logger(None if args.test_only else output_dir, rank)

    # data: the class list comes from the training JSON (or the checkpoint), other JSONs map onto it by name
    train_json, val_json = resolve_jsons(args)
    train_coco = None if args.test_only else load_coco(args.data_dir, train_json, skip_bad=args.skip_bad)
    class_names = checkpoint["class_names"] if checkpoint else train_coco.class_names
    if train_coco is not None and train_coco.class_names != class_names:
        raise ValueError(f"{train_json}: classes {train_coco.class_names} differ from the checkpoint's {class_names}")
    num_classes = len(class_names)
    cache = None if args.mask_cache == "none" else args.mask_cache
    val_loader = None
    if val_json:
        val_coco = load_coco(args.data_dir, val_json, class_names=class_names, skip_bad=args.skip_bad)
        if not val_coco.labeled:
            raise ValueError(f"{val_coco.json_path}: validation JSON has no annotations")
        val_set = SegmentationDataset(val_coco, args.img_size, "none", mask_cache=cache, full_mask=True)
        shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))  # no padding: exact metrics
        val_loader = torch.utils.data.DataLoader(shard, batch_size=args.batch_size, num_workers=args.workers,
                                                 collate_fn=collate_full_masks, pin_memory=device.type == "cuda")

    model = build_model(args.arch, args.backbone, num_classes, pretrained=args.pretrained and not checkpoint,
                        weights=None if checkpoint else args.weights, output_stride=args.output_stride,
                        separable=args.separable, decoder_convs=args.decoder_convs, verbose=rank == 0)
    args.output_stride = model.encoder.output_stride
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if world > 1 and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_without_ddp = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward_model = torch.compile(model) if args.compile else model

    def validate(epoch):
        confusion = evaluate(forward_model, val_loader, num_classes, device, args.amp, args.channels_last, world)
        metrics = segmentation_metrics(confusion, class_names)
        log.print(f"validation after epoch {epoch}:\n{metrics_table(metrics)}")
        log.log({"epoch": epoch, "val": metrics, "confusion": confusion.tolist()})
        return metrics, confusion

    if args.test_only:
        if not val_loader:
            raise ValueError("--test-only needs a validation JSON")
        metrics, _ = validate(checkpoint["epoch"] if checkpoint else 0)
        log.print(to_json({"mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"], "mAcc": metrics["mAcc"]}))
        return metrics

    # training data
    train_sets = []
    copy_paste = CopyPaste(train_coco, args.copy_paste_classes) if args.copy_paste else None
    if copy_paste:
        log.print(f"copy-paste classes: {', '.join(class_names[c] for c in copy_paste.classes)} "
                  f"({len(copy_paste.sources)} objects)")
    train_sets.append(SegmentationDataset(train_coco, args.img_size, args.aug, cache, copy_paste, args.skip_bad))
    if args.pseudo:
        pseudo = load_coco(args.data_dir, Path(args.pseudo) / "pseudo.json", class_names=class_names)
        train_sets.append(SegmentationDataset(pseudo, args.img_size, args.aug, None, None, args.skip_bad))
        log.print(f"pseudo labels: {len(pseudo)} images from {args.pseudo}")
    train_set = torch.utils.data.ConcatDataset(train_sets)
    if len(train_set) < args.batch_size * world:
        raise ValueError(f"{train_json}: {len(train_set)} images is fewer than one batch "
                         f"({args.batch_size} x {world} processes)")
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed) \
        if world > 1 else None

    steps_per_epoch = len(train_set) // (args.batch_size * world) // args.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"--accum-steps {args.accum_steps} leaves no optimizer step per epoch")
    total_steps = args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)
    weight = None
    if args.class_weights:
        weight = class_weights(pixel_counts(train_coco), args.class_weights)
        log.print(f"class weights ({args.class_weights}): " +
                  ", ".join(f"{n} {w:.3f}" for n, w in zip(class_names, weight.tolist())))
    criterion = build_loss(args.loss, weight, args.focal_gamma).to(device)
    optimizer = build_optimizer(model_without_ddp, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, args.scheduler))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    start_epoch, best_miou, bad_steps = 0, -1.0, 0
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best_miou = checkpoint["epoch"] + 1, checkpoint["best_miou"]
        set_rng_state(checkpoint["rng"][rank] if rank < len(checkpoint["rng"]) else checkpoint["rng"][0])
        log.print(f"resumed from {resume_path} at epoch {start_epoch} (best mIoU {best_miou:.4f})")

    def checkpoint_state(epoch, metrics=None):
        states = [rng_state()]
        if world > 1:  # every rank's RNG, so a resumed DDP run continues each stream
            gathered = [None] * world
            dist.all_gather_object(gathered, states[0])
            states = gathered
        return {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "best_miou": best_miou, "args": vars(args), "class_names": class_names, "rng": states,
                "metrics": metrics or {}}

    log.print(f"training {args.arch}/{args.backbone} on {len(train_set)} images ({train_json}), "
              f"{world} process(es) on {device}, {steps_per_epoch} steps/epoch x {args.epochs} epochs, "
              f"output {output_dir}")
    last_epoch = min(args.epochs, args.stop_after if args.stop_after is not None else args.epochs)
    for epoch in range(start_epoch, last_epoch):
        if sampler:
            sampler.set_epoch(epoch)
        # a generator per epoch fixes shuffling and worker seeds, so a resumed epoch sees the same batches
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True,
            num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=False,
            generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        model.train()
        t_epoch = t_print = time.time()
        seen, seen_print, loss_sum, loss_count = 0, 0, 0.0, 0
        batches = steps_per_epoch * args.accum_steps
        for i, (images, masks, _) in enumerate(loader):
            if i >= batches:
                break
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, args.amp):
                logits = forward_model(images)
            loss = criterion(logits, masks)
            finite = torch.isfinite(loss.detach())
            if world > 1:  # every rank must skip together or DDP's all-reduce would hang
                flag = finite.float().to(device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                finite = flag > 0
            if not finite:
                bad_steps += 1
                optimizer.zero_grad(set_to_none=True)
                warnings.warn(f"epoch {epoch} step {i}: non-finite loss, step skipped ({bad_steps} in a row)")
                if bad_steps >= NAN_PATIENCE:  # every rank gets here together (the flag was reduced)
                    state = checkpoint_state(epoch - 1)
                    if rank == 0:
                        save_checkpoint(state, output_dir / "nan_stop.pt")
                    raise ValueError(f"{bad_steps} non-finite losses in a row at epoch {epoch}: lower --lr, "
                                     f"check the data, or drop --amp; state saved to {output_dir / 'nan_stop.pt'}")
                continue
            bad_steps = 0
            scaler.scale(loss / args.accum_steps).backward()
            if (i + 1) % args.accum_steps == 0:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            seen += images.shape[0] * world
            seen_print += images.shape[0] * world
            loss_sum += float(loss.detach())
            loss_count += 1
            step = (i + 1) // args.accum_steps
            if (i + 1) % (args.print_freq * args.accum_steps) == 0 or i + 1 == batches:
                now = time.time()
                rate = seen_print / max(now - t_print, 1e-9)
                remaining = (batches - i - 1 + (last_epoch - epoch - 1) * batches) * args.batch_size * world
                record = {"epoch": epoch, "step": step, "steps": steps_per_epoch, "loss": loss_sum / loss_count,
                          "lr": optimizer.param_groups[0]["lr"], "images_per_s": rate}
                record.update({f"loss_{k}": v for k, v in criterion.parts.items()} if len(criterion.parts) > 1 else {})
                log.print(f"epoch {epoch} [{step}/{steps_per_epoch}] loss {record['loss']:.4f} lr {record['lr']:.2e} "
                          f"{rate:.1f} img/s ETA {datetime.timedelta(seconds=int(remaining / max(rate, 1e-9)))}")
                log.log(record)
                t_print, seen_print, loss_sum, loss_count = now, 0, 0.0, 0
        epoch_s = time.time() - t_epoch
        log.log({"epoch": epoch, "epoch_seconds": epoch_s, "images_per_s": seen / max(epoch_s, 1e-9)})

        metrics, improved = None, False
        if val_loader and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs):
            metrics, confusion = validate(epoch)
            improved = metrics["mIoU"] > best_miou
            best_miou = max(best_miou, metrics["mIoU"])
        state = checkpoint_state(epoch, metrics)  # on every rank: it gathers each rank's RNG state
        if rank == 0:
            save_checkpoint(state, output_dir / "last.pt")
            # without validation the last weights are the best we know
            if improved or val_loader is None:
                save_checkpoint(state, output_dir / "best.pt")
            if improved:
                write_json(output_dir / "best_metrics.json",
                           dict(metrics, epoch=epoch, confusion=confusion.tolist()), indent=1)
    best = f"best mIoU {best_miou:.4f}" if best_miou >= 0 else "no validation"
    log.print(f"done: epochs {start_epoch}-{last_epoch - 1}, {best}, checkpoints in {output_dir}")


if __name__ == "__main__":
    main()
