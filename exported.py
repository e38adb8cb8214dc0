"""The exported-model format: a torch.export program (.pt2) of the network, with dynamic height and width, and what
predicting needs in its metadata (class list, input normalisation, orientation, training size). export.py writes
it; predict.py reads it without model.py: the program carries its own graph and weights.

    program, info = load_exported("model.pt2")
    logits = program(images)         # (N, 3, H, W) normalised as info["normalization"] says -> (N, C, H, W)
"""
import json

import torch
from torch.export import Dim

from outputs import OutputError, atomic

METADATA_FILE = "trashseg.json"
METADATA_KEYS = ("class_names", "normalization", "orientation", "img_size", "arch", "backbone", "checkpoint")


def export_program(model, img_size, min_size=64, max_size=4096):
    """torch.export of an eval-mode network with batch, height and width left free (height and width within
    min_size..max_size): one program serves every photo size."""
    example = torch.randn(2, 3, img_size, img_size)
    shapes = {"x": {0: Dim("batch", min=1, max=1024), 2: Dim("height", min=min_size, max=max_size),
                    3: Dim("width", min=min_size, max=max_size)}}
    return torch.export.export(model, (example,), dynamic_shapes=shapes)


def save_exported(program, info, path):
    """Atomically: the program with `info` (METADATA_KEYS) stored beside it in the archive."""
    with atomic(path) as tmp:
        torch.export.save(program, tmp, extra_files={METADATA_FILE: json.dumps(info)})


def load_exported(path):
    """(callable module, info) of an export.py file; an OutputError names a file that is not one."""
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except FileNotFoundError:
        raise OutputError(f"{path}: exported model not found") from None
    except Exception as e:
        raise OutputError(f"{path}: not a torch.export program ({e.__class__.__name__}: {e})") from None
    try:
        info = json.loads(extra[METADATA_FILE])
        missing = [key for key in METADATA_KEYS if key not in info]
    except json.JSONDecodeError:
        missing = list(METADATA_KEYS)
    if missing:
        raise OutputError(f"{path}: a torch.export program without export.py's metadata (lacks "
                          f"{', '.join(missing)}); export it with export.py")
    return program.module(), info
