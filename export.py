"""Export a trained checkpoint as a program that runs without this code: a torch.export archive (.pt2) with dynamic
height and width, or ONNX (needs `pip install onnx onnxscript`), each with the class list, input normalisation,
orientation and training size in its metadata.

    python export.py --ckpt runs/x/best.pt -o model.pt2
    python predict.py --ckpt model.pt2 --json test.json --tta          # runs it like a checkpoint
    python export.py --ckpt runs/x/best.pt -o model.onnx --format onnx

The export is checked before it is written: its logits must equal the checkpoint's (max abs difference under 1e-3,
fp32) at the training size and at an odd, non-square size.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from checkpoint import model_from_checkpoint, predicting_info, read_checkpoint
from exported import METADATA_FILE, export_program, save_exported
from model import ModelError
from outputs import OutputError, writing

TOLERANCE = 1e-3


def export_info(ckpt, ckpt_path):
    return dict(predicting_info(ckpt), checkpoint=str(ckpt_path), torch=torch.__version__)


def check_sizes(img_size):
    """The training size, and an odd non-square one: the two the export is checked at."""
    return [(img_size, img_size), ((img_size + 11) | 1, (img_size + 37) | 1)]


def max_difference(exported, model, sizes):
    worst = 0.0
    with torch.no_grad():
        for height, width in sizes:
            x = torch.randn(3, 3, height, width, generator=torch.Generator().manual_seed(height))
            worst = max(worst, (exported(x) - model(x)).abs().max().item())
    return worst


def export_pt2(model, info, args):
    program = export_program(model, info["img_size"], args.min_size, args.max_size)
    difference = max_difference(program.module(), model, check_sizes(info["img_size"]))
    if difference > TOLERANCE:
        raise OutputError(f"the exported program's logits differ from the checkpoint's by {difference:.2e}")
    save_exported(program, info, args.output)
    return difference


def export_onnx(model, info, args):
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the check below runs the file)
    except ImportError:
        raise OutputError("--format onnx needs the onnx packages: pip install onnx onnxscript onnxruntime") from None
    program = export_program(model, info["img_size"], args.min_size, args.max_size)
    program = torch.onnx.export(program, dynamo=True,
                                input_names=["images"], output_names=["logits"])
    proto = program.model_proto
    proto.metadata_props.add(key=METADATA_FILE, value=json.dumps(info))
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    run = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    difference = max_difference(run, model, check_sizes(info["img_size"]))
    if difference > TOLERANCE:
        raise OutputError(f"the ONNX model's logits differ from the checkpoint's by {difference:.2e}")
    with writing(args.output, args.output):
        onnx.save(proto, str(args.output))
    return difference


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint")
    p.add_argument("-o", "--output", type=Path, required=True, help="the file to write (.pt2, or .onnx)")
    p.add_argument("--format", choices=("pt2", "onnx"), default="pt2")
    p.add_argument("--min-size", type=int, default=64, help="smallest height/width the program accepts")
    p.add_argument("--max-size", type=int, default=4096, help="largest height/width the program accepts")
    args = p.parse_args(argv)
    try:
        ckpt = read_checkpoint(args.ckpt)
        model = model_from_checkpoint(ckpt, args.ckpt).eval()
        info = export_info(ckpt, args.ckpt)
        difference = (export_onnx if args.format == "onnx" else export_pt2)(model, info, args)
    except (OutputError, ModelError) as e:  # a WriteError is an OutputError
        sys.exit(f"error: {e}")
    print(f"wrote {args.output} ({info['arch']}/{info['backbone']}, {len(info['class_names'])} classes, "
          f"{args.min_size}-{args.max_size} px); logits match the checkpoint's within {difference:.1e}")


if __name__ == "__main__":
    main()
