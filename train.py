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
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from backbones import drop_path_default, input_normalization
from budget import TimeBudget, follow_budget, plan_text
from checkpoint import aux_state, checkpoint_state, load_weights, resume_from, save_checkpoint, save_epoch, trained_with
from coco import DataError, default_cache_dir, load_coco, read_exclude_list
from dataset import AUG_PRESETS, ORIENTATIONS, default_workers, epoch_loader, training_set, validation_loader
from distributed import agree_on_step, rank0_value, setup_distributed
from faults import Stopped, StopSignals, checkpoint_size_check, resume_note
from inference import validate
from losses import WEIGHT_METHODS, training_criterion, training_loss
from model import ModelError, add_network_args, build_model
from optim import WeightAverage, training_state
from outputs import Logger, WriteError, to_json, write_json
from precision import amp_precision, autocast, choose_memory_format, precision_note

NAN_PATIENCE = 20  # consecutive non-finite losses before a run stops


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--fold", type=int, default=0, help="use <data-dir>/folds/{train,val}_fold<k>.json")
    p.add_argument("--folds-dir", help="where folds.py wrote the fold JSONs (default <data-dir>/folds)")
    p.add_argument("--train-json", help="explicit training JSON (path, or name under --data-dir)")
    p.add_argument("--val-json", help="explicit validation JSON; 'none' trains on everything without validation")
    add_network_args(p)
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the auxiliary FCN head's loss on the stride-16 features (mmseg: 0.4; 0: no head)")
    p.add_argument("--img-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--minutes", type=float, metavar="M", help="instead of --epochs: the epochs that fit M minutes")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop after this epoch (schedule still planned for --epochs); --resume continues")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="per process")
    p.add_argument("--accum-steps", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--encoder-lr-mult", type=float, default=1.0, help="the encoder's lr = --lr x this")
    p.add_argument("--layer-decay", type=float, default=1.0,
                   help="the encoder's lr is multiplied by this once per block going down from the head")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights (e.g. 0.999)")
    p.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradients' total norm to NORM")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adam", "sgd"))
    p.add_argument("--momentum", type=float, default=0.9, help="sgd only")
    p.add_argument("--scheduler", default="poly", choices=("poly", "cosine", "onecycle", "step"))
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--loss", default="ce", help="e.g. ce, focal, ce:0.75,dice:0.25, focal+dice")
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--class-weights", metavar="METHOD|NAME=W,...",
                   help=f"{'|'.join(WEIGHT_METHODS)} from the training set's pixel counts, or explicit pairs, e.g. "
                        f"'Battery=3,Glass=2' (others 1)")
    p.add_argument("--class-weight-cap", type=float, metavar="C", help="bound the weights at C x the smallest")
    p.add_argument("--aug", default="basic", choices=AUG_PRESETS)
    p.add_argument("--orientation", default="upright", choices=ORIENTATIONS,
                   help="upright: horizontal flips only; any: vertical flips and 90-degree turns too (and in --tta)")
    p.add_argument("--copy-paste", action="store_true", help="paste objects of the rarest classes")
    p.add_argument("--copy-paste-classes", nargs="+", help="class names to paste (default: the 2 rarest by pixels)")
    p.add_argument("--pseudo", metavar="DIR", help="add images with predicted masks from predict.py --pseudo")
    p.add_argument("--pseudo-weight", type=float, default=1.0, metavar="W",
                   help="the loss weight of the pseudo-labelled images (labelled ones: 1; default %(default)s)")
    p.add_argument("-j", "--workers", type=int, default=default_workers(),
                   help="loader processes (default: the cores but one, at most 8; here %(default)s)")
    p.add_argument("--mask-cache", default=str(default_cache_dir()), help="folder, or 'none'")
    p.add_argument("--skip-bad", action="store_true", help="skip bad images/annotations with a warning")
    p.add_argument("--exclude", metavar="FILE", help="training file_names to leave out, one per line ('#' comments)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--amp", action="store_true", help="fp16 on CUDA; bf16 on a CPU with native bf16, else fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default: CUDA yes, CPU measured")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="ImageNet weights for the backbone, offline for efficientnet_lite0/1/2 (--no-pretrained: scratch)")
    p.add_argument("--weights", metavar="FILE", help="local weights: a backbone or whole-model state dict")
    p.add_argument("--output-dir", help="default runs/<arch>_<backbone>_fold<k> (with --train-json: "
                                        "runs/<arch>_<backbone>_<its name>)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                   help="continue from PATH, or from <output-dir>/last.pt without one")
    p.add_argument("--force", action="store_true", help="start afresh in an output dir that holds a run")
    p.add_argument("--test-only", action="store_true", help="only validate (the --resume checkpoint)")
    p.add_argument("--val-every", type=int, default=1, metavar="EPOCHS")
    p.add_argument("--print-freq", type=int, default=20, metavar="STEPS")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    return p


def given_flags(argv):
    """The flags written on the command line (argparse cannot tell '--lr 2e-4' from the default 2e-4 otherwise)."""
    parser = get_args_parser()
    for action in parser._actions:  # with no default at all, only what was written ends up in the namespace
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------- set-up

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output_dir(output_dir, args, resuming, rank):
    if not resuming and not args.test_only and (output_dir / "last.pt").exists():
        if not args.force:
            raise ValueError(f"{output_dir} holds a run (last.pt): --resume to continue it, --force to start "
                             f"over, or another --output-dir")
        if rank == 0:
            (output_dir / "log.jsonl").unlink(missing_ok=True)
    if rank == 0 and not args.test_only:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "config.json", vars(args), indent=1)


def resolve_jsons(args):
    folds_dir = Path(args.folds_dir) if args.folds_dir else Path(args.data_dir) / "folds"
    train = args.train_json or folds_dir / f"train_fold{args.fold}.json"
    val = args.val_json or folds_dir / f"val_fold{args.fold}.json"
    return train, None if str(val).lower() == "none" else val


def build_network(args, num_classes, checkpoint, device, world, log):
    """(the network, what runs it: under DDP and compiled when asked)."""
    model = build_model(args.arch, args.backbone, num_classes, pretrained=args.pretrained and not checkpoint,
                        output_stride=args.output_stride, separable=args.separable, decoder_convs=args.decoder_convs,
                        tf_padding=args.tf_padding, head_channels=args.head_channels, stage_norms=args.stage_norms,
                        drop_path=args.drop_path, aux=args.aux_weight > 0, pixel_decoder=args.pixel_decoder,
                        queries=args.queries, dec_layers=args.dec_layers)
    args.output_stride = model.encoder.output_stride
    if checkpoint:
        # with --ema, "model" holds the average (what validates) and "train_model" the weights that train on
        weights = checkpoint["model"] if args.test_only else checkpoint.get("train_model", checkpoint["model"])
        model.load_state_dict(aux_state(weights, model))
    elif args.weights:
        log.print(load_weights(model, args.weights))
    model.to(device)
    if args.channels_last is None:  # measured on a CPU; every process takes rank 0's answer
        choice, note = choose_memory_format(model, (args.batch_size, 3, args.img_size, args.img_size), num_classes,
                                            device, args.precision)
        args.channels_last = bool(rank0_value(choice, world, device))
        if note:
            log.print(note)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if world > 1 and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, torch.compile(ddp) if args.compile else ddp


class NonFiniteLoss(Exception):
    """NAN_PATIENCE non-finite losses in a row; raised on every rank together."""


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(model, loss_fn, optimizer, scheduler, scaler, loader, epoch, run, args, log):
    """One pass over the loader. run: {steps_per_epoch, epochs_left, world, device, bad_steps, stop}; bad_steps
    carries over epochs; a stop signal (on any rank) raises Stopped after the step. Returns images seen per s."""
    model.train()
    batches, world, device = run["steps_per_epoch"] * args.accum_steps, run["world"], run["device"]
    t_epoch = t_print = time.time()
    seen, seen_print, loss_sum, loss_count, window_has_grad = 0, 0, 0.0, 0, False
    for i, (images, masks, meta) in enumerate(loader):
        if i >= batches:
            break
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        sample_weight = None
        if args.pseudo and args.pseudo_weight != 1:  # pseudo-labelled images teach pseudo_weight x as much
            sample_weight = torch.where(meta["pseudo"], args.pseudo_weight, 1.0).to(device)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, args.precision):
            out = model(images)
        loss = training_loss(out, masks, loss_fn, args.aux_weight, sample_weight)
        finite, stop_signum = agree_on_step(loss, run["stop"].signum, world)
        if not finite:
            # only this micro-batch is dropped: gradients of the window's earlier micro-batches stay and are
            # stepped at the window's end, so one bad batch does not cost --accum-steps good ones
            run["bad_steps"] += 1
            warnings.warn(f"epoch {epoch} step {i}: non-finite loss, batch skipped ({run['bad_steps']} in a row)")
            if run["bad_steps"] >= NAN_PATIENCE:
                raise NonFiniteLoss
        else:
            run["bad_steps"], window_has_grad = 0, True
            scaler.scale(loss / args.accum_steps).backward()
            loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
        if (i + 1) % args.accum_steps == 0:
            if window_has_grad:  # a window of only bad batches has nothing to step
                if args.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if run["ema"]:
                    run["ema"].update()
            window_has_grad = False
        seen, seen_print = seen + images.shape[0] * world, seen_print + images.shape[0] * world
        if (i + 1) % (args.print_freq * args.accum_steps) == 0 or i + 1 == batches:
            now = time.time()
            rate = seen_print / max(now - t_print, 1e-9)
            remaining = (batches - i - 1 + run["epochs_left"] * batches) * args.batch_size * world
            record = {"epoch": epoch, "step": (i + 1) // args.accum_steps, "steps": run["steps_per_epoch"],
                      "loss": loss_sum / max(loss_count, 1), "lr": optimizer.param_groups[-1]["lr"],
                      "images_per_s": rate}
            record.update({f"loss_{k}": v for k, v in loss_fn.parts.items()} if len(loss_fn.parts) > 1 else {})
            log.print(f"epoch {epoch} [{record['step']}/{record['steps']}] loss {record['loss']:.4f} lr "
                      f"{record['lr']:.2e} {rate:.1f} img/s ETA {datetime.timedelta(seconds=int(remaining / rate))}")
            log.log(record)
            t_print, seen_print, loss_sum, loss_count = now, 0, 0.0, 0
        if stop_signum:
            raise Stopped(stop_signum, epoch, (i + 1) // args.accum_steps, run["steps_per_epoch"])
    return seen / max(time.time() - t_epoch, 1e-9)


# ----------------------------------------------------------------------------- main

def one_epoch(epoch, parts, run, args, log):
    """Train one epoch, validate when due, checkpoint. parts: the run's objects (fit builds them)."""
    rank, world, device, output_dir = run["rank"], run["world"], run["device"], parts["output_dir"]
    loader = epoch_loader(parts["train_set"], parts["sampler"], epoch, args, device)
    t = time.time()
    try:
        rate = train_one_epoch(parts["forward_model"], parts["loss_fn"], parts["optimizer"], parts["scheduler"],
                               parts["scaler"], loader, epoch, run, args, log)
    except NonFiniteLoss:
        saved = parts["state"](epoch - 1)  # every rank gets here together (the finite flag was reduced)
        if rank == 0:
            save_checkpoint(saved, output_dir / "nan_stop.pt")
        raise ValueError(f"{run['bad_steps']} non-finite losses in a row at epoch {epoch}: lower --lr, check the "
                         f"data, or drop --amp; state saved to {output_dir / 'nan_stop.pt'}") from None
    train_seconds = time.time() - t
    record = {"epoch": epoch, "epoch_seconds": train_seconds, "images_per_s": rate}
    if device.type == "cuda":  # what a GPU user sizes the batch by
        record["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    log.log(record)
    metrics, confusion, improved = None, None, False
    planning = run["budget"] is not None and args.budget is None  # --minutes' first epoch: time a validation too
    if parts["val_loader"] and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs or planning):
        validated = run["ema"].model if run["ema"] else parts["forward_model"]
        metrics, confusion = validate(validated, parts["val_loader"], parts["data"]["class_names"], epoch, args,
                                      world, device, log)
        improved, run["best_miou"] = metrics["mIoU"] > run["best_miou"], max(run["best_miou"], metrics["mIoU"])
    if run["budget"]:  # before the checkpoint, so that it holds the plan
        follow_budget(run, epoch, train_seconds, time.time() - t - train_seconds if metrics else None, args, log)
    saved = parts["state"](epoch, metrics)  # on every rank: it gathers each rank's RNG state
    if rank == 0:
        save_epoch(saved, epoch, metrics, confusion, improved, run, output_dir, log)
    stop_signum = agree_on_step(torch.zeros(()), run["stop"].signum, world)[1]
    if stop_signum and epoch + 1 < run["last_epoch"]:  # it came during validation or saving: this epoch is whole
        raise Stopped(stop_signum, epoch)


def fit(model, forward_model, train_set, val_loader, train_coco, data, checkpoint, output_dir,
        args, rank, world, device, log):
    """The training run: epochs, validation and checkpoints. A stop signal or a failed write ends it with one
    line naming the last complete checkpoint."""
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed) \
        if world > 1 else None
    steps_per_epoch = len(train_set) // (args.batch_size * world) // args.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images make no optimizer step of {args.batch_size} x "
                         f"{world} process(es) x --accum-steps {args.accum_steps}")
    loss_fn = training_criterion(args, train_coco, data["class_names"], device, log)
    optimizer, scheduler, scaler, start_epoch, best_miou = training_state(model, steps_per_epoch, checkpoint,
                                                                          args, rank, device, log)
    last_epoch = min(args.epochs, args.stop_after if args.stop_after is not None else args.epochs)
    log.print(f"training {args.arch}/{args.backbone} on {len(train_set)} images, {world} process(es) on {device}, "
              f"{steps_per_epoch} steps/epoch x {plan_text(args, checkpoint)}, {args.precision}, output {output_dir}")
    size_line, size_warning = checkpoint_size_check(model, args.optimizer, output_dir)
    log.print(size_line)
    if size_warning and rank == 0:
        print(f"warning: {size_warning}", file=sys.stderr, flush=True)
    resumed = Path(args.resume) if args.resume not in (None, "auto") else output_dir / "last.pt"
    ema = WeightAverage(model, args.ema, checkpoint.get("ema_updates", 0) if checkpoint else 0) if args.ema else None
    if ema and checkpoint:
        ema.model.load_state_dict(aux_state(checkpoint["model"], model))
    # a resumed --minutes run keeps its plan (its epochs are in the checkpoint's args)
    budget = TimeBudget(args.minutes, steps_per_epoch, args.val_every, time.time()) \
        if args.minutes and not checkpoint else None
    run = {"steps_per_epoch": steps_per_epoch, "rank": rank, "world": world, "device": device, "bad_steps": 0,
           "best_miou": best_miou, "last_epoch": last_epoch, "validating": val_loader is not None,
           "saved": (resumed, start_epoch - 1) if checkpoint else None, "budget": budget, "output_dir": output_dir,
           "ema": ema}
    parts = {"forward_model": forward_model, "loss_fn": loss_fn, "optimizer": optimizer, "scheduler": scheduler,
             "scaler": scaler, "train_set": train_set, "sampler": sampler, "val_loader": val_loader, "data": data,
             "output_dir": output_dir,
             "state": lambda epoch, metrics=None: checkpoint_state(model, optimizer, scheduler, scaler, epoch,
                                                                   run["best_miou"], args, data, world, metrics,
                                                                   ema)}
    epoch = start_epoch
    with StopSignals(rank) as run["stop"]:
        try:
            while epoch < run["last_epoch"]:  # --minutes fixes last_epoch after the first epoch
                run["epochs_left"] = run["last_epoch"] - epoch - 1
                one_epoch(epoch, parts, run, args, log)
                epoch += 1
        except WriteError as e:
            raise WriteError(f"{e}. {resume_note(run['saved'], full_disk=True)}") from None
        except Stopped as e:
            e.epoch = epoch if e.epoch is None else e.epoch
            log.print(f"stopped by {e} at {e.where()}. {resume_note(run['saved'])}")
            sys.exit(e.exit_code)
    best = f"best mIoU {run['best_miou']:.4f}" if run["best_miou"] >= 0 else "no validation"
    log.print(f"done: epochs {start_epoch}-{run['last_epoch'] - 1}, {best}, checkpoints in {output_dir}")


def run(args, given, rank, world, device):
    seed_everything(args.seed + rank)
    args.budget = None  # --minutes' plan, once made (a resumed run takes its checkpoint's)
    if args.minutes is not None and "epochs" in given:
        raise ValueError("--minutes plans the epochs itself: give --minutes or --epochs, not both")
    checkpoint, output_dir = resume_from(args, given, rank)
    if checkpoint and "minutes" in given and not checkpoint["args"].get("minutes"):
        raise ValueError(f"{args.resume}: this run was planned by --epochs; resume it without --minutes")
    if args.test_only and not checkpoint:
        raise ValueError("--test-only validates a checkpoint: give it with --resume PATH")
    if args.pseudo_weight < 0 or args.pseudo_weight != 1 and not args.pseudo:
        raise ValueError("--pseudo-weight W (>= 0) weighs the images of --pseudo DIR: give both")
    excluded, args.excluded = read_exclude_list(args.exclude) if args.exclude else ([], None)  # into config.json
    if args.drop_path is None:  # the rate in effect, recorded in config.json and the checkpoint
        args.drop_path = drop_path_default(args.backbone)
    args.precision = amp_precision(device, args.amp)  # what --amp gives on this machine, into config.json
    prepare_output_dir(output_dir, args, checkpoint is not None, rank)
    log = Logger(None if args.test_only else output_dir, rank)
    if precision_note(device, args.amp):
        log.print(precision_note(device, args.amp))
    log.log({"precision": args.precision})
    # the class list comes from the training JSON (or the checkpoint); other JSONs map onto it by name
    train_json, val_json = resolve_jsons(args)
    train_coco = None if args.test_only else load_coco(args.data_dir, train_json, skip_bad=args.skip_bad)
    if excluded and train_coco is not None:
        args.excluded["dropped"] = train_coco.excluding(excluded)
        log.print(f"excluded {args.excluded['dropped']} training images ({len(excluded)} listed in {args.exclude})")
    class_names = checkpoint["class_names"] if checkpoint else train_coco.class_names
    if train_coco is not None and train_coco.class_names != class_names:
        raise ValueError(f"{train_json}: classes {train_coco.class_names} differ from the checkpoint's {class_names}")
    # input normalisation belongs to the weights: the checkpoint's, or what the backbone's ImageNet weights expect
    data = {"class_names": class_names,
            "normalization": trained_with(checkpoint)[0] if checkpoint else input_normalization(args.backbone)}
    val_loader = validation_loader(args, val_json, data, rank, world, device) if val_json else None
    model, forward_model = build_network(args, len(class_names), checkpoint, device, world, log)
    if rank == 0 and not args.test_only:  # with what the network settled: its output stride, its memory format
        write_json(output_dir / "config.json", vars(args), indent=1)
    if args.test_only:
        if not val_loader:
            raise ValueError("--test-only needs a validation JSON")
        metrics, _ = validate(forward_model, val_loader, class_names, checkpoint["epoch"], args, world, device, log)
        log.print(to_json({"mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"], "mAcc": metrics["mAcc"]}))
        return metrics
    val_names = [img["file_name"] for img in val_loader.dataset.dataset.coco.images] if val_loader else []
    train_set = training_set(args, train_coco, data, log, val_names)
    fit(model, forward_model, train_set, val_loader, train_coco, data, checkpoint, output_dir,
        args, rank, world, device, log)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        return run(args, given_flags(argv), rank, world, device)
    except (DataError, ModelError, ValueError) as e:
        if rank == 0:
            print(f"error: {e}", flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before training began (during training, fit's StopSignals handles it)
        if rank == 0:
            print("stopped by SIGINT before training began: nothing was trained", flush=True)
        sys.exit(130)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
