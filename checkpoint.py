"""The checkpoint format: train.py writes it, train.py --resume, predict.py and --weights read it, all through here.

A checkpoint is a dict of tensors and plain data (torch.load(path, weights_only=True) reads it) with these keys:
"""
import pickle
import random
from pathlib import Path

import torch
import torch.distributed as dist

from backbones import HEAD_PREFIXES, ModelError
from dataset import IMAGENET_NORMALIZATION
from model import build_model
from outputs import atomic, save_drawing, write_json
from pictures import confusion_picture, curves_picture

CHECKPOINT_KEYS = {
    "model": "the network's state dict",
    "args": "train.py's flags as a dict; the NETWORK_FLAGS among them rebuild the network",
    "class_names": "the run's class list, Background first: index = pixel value",
    "normalization": "{mean, std} on the 0-1 scale that input images get (the backbone weights' own)",
    "epoch": "the last finished epoch (0-based)",
    "best_miou": "the best validation mIoU so far (-1 without validation)",
    "metrics": "this epoch's validation metrics ({} without validation)",
    "optimizer": "optimizer state dict", "scheduler": "LR scheduler state dict", "scaler": "GradScaler state dict",
    "rng": "one RNG state per process: torch, python, cuda",
}
__doc__ += "".join(f"    {key:<12} {meaning}\n" for key, meaning in CHECKPOINT_KEYS.items())
EMA_KEYS = {"train_model": "with --ema: the trained weights, to resume from ('model' holds their average)",
            "ema_updates": "with --ema: the average's update count"}
__doc__ += "".join(f"    {key:<12} {meaning}\n" for key, meaning in EMA_KEYS.items())
MODEL_KEYS = ("model", "args", "class_names")  # what predicting needs; resuming needs every key but normalization
# the flags that shape the network, each with what checkpoints written before the flag existed were built with
NETWORK_FLAGS = {"arch": None, "backbone": None, "output_stride": None, "separable": False, "decoder_convs": 2,
                 "tf_padding": False, "head_channels": 512, "stage_norms": False, "pixel_decoder": "deformable",
                 "queries": 100, "dec_layers": 9}
# other flags newer than some checkpoints, with what those checkpoints did: flips and 90-degree turns
LATER_FLAGS = {"orientation": "any"}
RUN_ONLY_FLAGS = {"resume", "test_only", "force", "stop_after", "device", "output_dir"}  # never taken from a checkpoint


class _RecordingFile:
    """A file for torch.save that keeps the OSError of a failed write: torch reports a full disk as a RuntimeError
    about zip positions ("unexpected pos ...") and loses the reason."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def tensor_bytes(obj):
    """Bytes of the tensors in a nested dict/list: about what a checkpoint of it takes on disk."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(state, path):
    """Atomic: a crash, a full disk or a stop signal mid-write leaves the previous file intact and no .tmp behind;
    a failed write is a WriteError naming the file, the bytes it needed and the free space."""
    with atomic(path, needed=tensor_bytes(state)) as tmp, open(tmp, "wb") as f:
        recording = _RecordingFile(f)
        try:
            torch.save(state, recording)
        except RuntimeError:
            if recording.error is None:
                raise
            raise recording.error from None


# the first bytes of files people pass by mistake -> what they are
FILE_SIGNATURES = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
                   b"BM": "a BMP image", b"%PDF": "a PDF document", b"\x1f\x8b": "a gzip archive"}


def not_a_torch_file(path):
    """None when the file starts like something torch.save writes (a zip archive, or a pickle in the legacy
    format), else what it looks like instead."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None  # torch.load reports it
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    for signature, kind in FILE_SIGNATURES.items():
        if head.startswith(signature):
            return kind
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON or other text file"
    text = sum(32 <= b < 127 or b in b"\t\r\n" for b in head) / len(head)
    return "a text file" if text > 0.95 else "a file of another kind"


def load_state_file(path, what="weights"):
    """torch.load(..., weights_only=True) with a ModelError naming the file instead of a deep traceback; a file
    that is no checkpoint at all (an image, a JSON, an empty or cut file) is named as such."""
    kind = not_a_torch_file(path)
    if kind:
        raise ModelError(f"{path}: is {kind}, not a {what} file saved by torch (train.py writes runs/<name>/best.pt "
                         f"and last.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: {what} file not found") from None
    except RuntimeError as e:
        if "zip archive" in str(e) or "central directory" in str(e):
            raise ModelError(f"{path}: is cut short or damaged (its zip archive cannot be read: {str(e).split('. ')[0]}); it is not a "
                             f"complete {what} file. A run's last.pt is written atomically: use it or another "
                             f"checkpoint") from None
        raise ModelError(f"{path}: cannot load {what} ({e.__class__.__name__}: {e})") from None
    except pickle.UnpicklingError:
        raise ModelError(
            f"{path}: refused as unsafe: the file holds Python objects other than tensors and plain data, and "
            f"loading those can run code. If you made it yourself or otherwise trust it, re-save its tensors "
            f"from a Python session: torch.save(torch.load(PATH, weights_only=False), NEW_PATH) keeps a "
            f"train.py checkpoint as it is, then use NEW_PATH") from None
    except Exception as e:
        raise ModelError(f"{path}: cannot load {what} ({e.__class__.__name__}: {e})") from None


def read_checkpoint(path, resume=False):
    """A checkpoint dict, checked for the keys predicting (or, with resume, continuing training) needs."""
    ckpt = load_state_file(path, "checkpoint")
    needed = [k for k in CHECKPOINT_KEYS if k != "normalization"] if resume else MODEL_KEYS
    missing = [key for key in needed if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise ModelError(f"{path}: not a train.py checkpoint{' to resume from' if resume else ''} "
                         f"(lacks {', '.join(missing)})")
    return ckpt


def checkpoint_network(saved_args):
    """build_model's arch, backbone and keywords for a checkpoint's saved args."""
    return {key: saved_args.get(key, before) for key, before in NETWORK_FLAGS.items()}


def restore_flags(args, saved, given, path):
    """Resuming: every flag not given on the command line takes the checkpoint's value (the run's own flags
    aside); a given network flag that differs from the checkpoint's is an error: the network cannot change."""
    for key, value in saved.items():
        if key in NETWORK_FLAGS and key in given and value is not None and getattr(args, key) != value:
            raise ModelError(f"--{key.replace('_', '-')} {getattr(args, key)} differs from the checkpoint's "
                             f"{value} ({path}): a resumed run keeps its network")
        if key not in RUN_ONLY_FLAGS and key not in given and hasattr(args, key):
            setattr(args, key, value)
    for key, before in NETWORK_FLAGS.items():  # checkpoints from before a flag existed were built without it
        setattr(args, key, saved.get(key, before))
    for key, before in LATER_FLAGS.items():
        if key not in saved and key not in given:
            setattr(args, key, before)


def resume_from(args, given, rank):
    """The checkpoint to resume (or None) and its folder; args take the checkpoint's flags (restore_flags)."""
    path = Path(args.resume) if args.resume and args.resume != "auto" else None
    # an explicit --train-json names the run after it, so that training on train.json does not meet fold 0's run
    split = Path(args.train_json).stem if args.train_json else f"fold{args.fold}"
    output_dir = Path(args.output_dir or (path.parent if path else Path("runs") / f"{args.arch}_{args.backbone}_{split}"))
    if args.resume == "auto":
        path = output_dir / "last.pt"
    if not path:
        return None, output_dir
    if not path.is_file():
        raise ValueError(f"{path}: no checkpoint to resume from")
    checkpoint = read_checkpoint(path, resume=not args.test_only)
    restore_flags(args, checkpoint["args"], given, path)
    if rank == 0:
        print(f"resuming {path}")
    return checkpoint, output_dir


def trained_with(ckpt):
    """(normalization, orientation) a checkpoint's model was trained with; older checkpoints: ImageNet's, 'any'."""
    return (ckpt.get("normalization") or dict(IMAGENET_NORMALIZATION),
            ckpt["args"].get("orientation", LATER_FLAGS["orientation"]))


def predicting_info(ckpt):
    """What predicting with a checkpoint needs besides the network (export.py stores the same in its metadata):
    class_names, normalization, orientation, img_size, arch, backbone."""
    normalization, orientation = trained_with(ckpt)
    return {"class_names": ckpt["class_names"], "normalization": normalization, "orientation": orientation,
            "img_size": ckpt["args"]["img_size"], "arch": ckpt["args"]["arch"], "backbone": ckpt["args"]["backbone"]}


def model_from_checkpoint(ckpt, path="checkpoint"):
    """The checkpoint's own network with its weights (CPU, train mode)."""
    network = checkpoint_network(ckpt["args"])
    arch, backbone = network.pop("arch"), network.pop("backbone")
    model = build_model(arch, backbone, len(ckpt["class_names"]), pretrained=False, **network)
    try:
        model.load_state_dict(aux_state(ckpt["model"], model))
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit {arch}/{backbone} with {len(ckpt['class_names'])} classes: "
                         f"{str(e).splitlines()[0]}") from None
    return model


def aux_state(state, model):
    """A checkpoint's weights for `model`: the auxiliary head's (training only) dropped where the model has none."""
    if getattr(model, "aux_head", None) is None:
        return {k: v for k, v in state.items() if not k.startswith("aux_head.")}
    return state


def load_weights(model, file):
    """Load a local state dict: a whole model's (ours, or a checkpoint holding one under 'model') or a
    backbone's (torchvision's classification keys). Returns a one-paragraph report; a shape mismatch on a
    backbone key or a file matching nothing is a ModelError."""
    state = load_state_file(file, "weights")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelError(f"{file}: not a state dict of tensors")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}  # DDP, compile
    if hasattr(model.encoder, "weight_names"):  # an encoder whose files come under other names (MiT: Hugging Face's)
        state = model.encoder.weight_names(state)
    whole = any(k.startswith("encoder.") for k in state)
    target = model if whole else model.encoder.net
    own = target.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                     if k in own and own[k].shape != v.shape]
    if not loaded:
        raise ModelError(f"{file}: no key matches {'the model' if whole else model.encoder.backbone} "
                         f"(first keys: {', '.join(list(state)[:3])})")
    if skipped_shape and not whole:
        raise ModelError(f"{file}: shapes differ from {model.encoder.backbone}: {'; '.join(skipped_shape[:5])}")
    target.load_state_dict(loaded, strict=False)
    unused = [k for k in state if k not in own and not (not whole and k.startswith(HEAD_PREFIXES))]
    missing = [k for k in own if k not in loaded]
    lines = [f"{file}: loaded {len(loaded)} of {len(own)} {'model' if whole else 'backbone'} tensors"]
    for label, keys in (("kept own weights where shapes differ", skipped_shape), ("not in file", missing),
                        ("unused keys", unused)):
        if keys:
            lines.append(f"  {label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    return "\n".join(lines)


def rng_state():
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(model, optimizer, scheduler, scaler, epoch, best_miou, args, data, world, metrics=None,
                     ema=None):
    """The checkpoint dict (CHECKPOINT_KEYS, and EMA_KEYS with ema: optim.WeightAverage); data = {class_names,
    normalization}. A collective under DDP: it gathers every rank's RNG."""
    states = [rng_state()]
    if world > 1:  # every rank's RNG, so a resumed DDP run continues each stream
        states = [None] * world
        dist.all_gather_object(states, rng_state())
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "epoch": epoch, "best_miou": best_miou, "args": vars(args),
             "class_names": data["class_names"], "normalization": data["normalization"], "rng": states,
             "metrics": metrics or {}}
    if ema:  # the average is what predicts; the trained weights go on training after a resume
        state.update(model=ema.model.state_dict(), train_model=model.state_dict(), ema_updates=ema.updates)
    return state


def save_epoch(saved, epoch, metrics, confusion, improved, run, output_dir, log):
    """best.pt before last.pt, each atomic; run["saved"] follows the last complete one, for the stop message. Then
    the pictures: curves.png redrawn from the log, confusion.png beside best_metrics.json."""
    if improved or not run["validating"]:  # without validation the last weights are the best we know
        save_checkpoint(saved, output_dir / "best.pt")
        run["saved"] = (output_dir / "best.pt", epoch)
    save_checkpoint(saved, output_dir / "last.pt")
    run["saved"] = (output_dir / "last.pt", epoch)
    class_names = saved["class_names"]
    if improved:
        write_json(output_dir / "best_metrics.json", dict(metrics, epoch=epoch, confusion=confusion.tolist()), 1)
        title = f"epoch {epoch} (best): rows ground truth, % of the row"
        save_drawing(lambda: confusion_picture(confusion, class_names, title), output_dir / "confusion.png", log.print)
    save_drawing(lambda: curves_picture(log.records(), class_names, output_dir.name), output_dir / "curves.png",
                 log.print)
