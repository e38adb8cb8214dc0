"""export.py: a torch.export program that predicts what the checkpoint predicts, without the model code."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import export
import predict
from backbones import input_normalization
from coco import COMPETITION_CLASSES
from exported import load_exported
from model import build_model

REPO = Path(__file__).resolve().parent.parent
CLASSES = list(COMPETITION_CLASSES)  # the demo set's classes


def make_checkpoint(path, arch, backbone="resnet18", img_size=64, **network):
    """A checkpoint as train.py writes it, of an untrained network (weights seeded, so outputs vary by pixel)."""
    torch.manual_seed(0)
    model = build_model(arch, backbone, len(CLASSES), **network)
    for module in model.modules():  # non-trivial batch-norm statistics: eval mode must use them
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    args = {"arch": arch, "backbone": backbone, "img_size": img_size, "orientation": "upright",
            "output_stride": model.encoder.output_stride, "separable": True, "decoder_convs": 1, **network}
    torch.save({"model": model.state_dict(), "args": args, "class_names": CLASSES,
                "normalization": input_normalization(backbone)}, path)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch, backbone, network", [("deeplabv3plus", "resnet18", {}), ("unet", "resnet18", {}),
                                                     ("upernet", "resnet18", {"head_channels": 64})])
def test_the_export_gives_the_checkpoints_logits_at_two_sizes(tmp_path, arch, backbone, network):
    model = make_checkpoint(tmp_path / "best.pt", arch, backbone, **network)
    export.main(["--ckpt", str(tmp_path / "best.pt"), "-o", str(tmp_path / "model.pt2")])
    program, info = load_exported(tmp_path / "model.pt2")
    assert info["class_names"] == CLASSES and info["img_size"] == 64 and info["orientation"] == "upright"
    assert info["normalization"] == input_normalization(backbone)
    for size in [(64, 64), (75, 101)]:  # the second odd and not square
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert (program(x) - model(x)).abs().max() < 1e-3


@pytest.mark.slow
def test_predict_runs_the_export_like_the_checkpoint_without_the_model_code(demo_dir, tmp_path):
    make_checkpoint(tmp_path / "best.pt", "unet")
    export.main(["--ckpt", str(tmp_path / "best.pt"), "-o", str(tmp_path / "model.pt2")])
    common = ["--data-dir", str(demo_dir), "--json", "test.json", "--tta", "--workers", "0", "--no-probs",
              "--mask-cache", "none"]
    predict.main(["--ckpt", str(tmp_path / "best.pt"), *common, "--output-dir", str(tmp_path / "from_ckpt")])
    script = ("import sys, predict; predict.main(sys.argv[1:]); "
              "loaded = [m for m in ('model', 'backbones', 'checkpoint') if m in sys.modules]; "
              "assert not loaded, f'model code imported: {loaded}'")
    done = subprocess.run([sys.executable, "-c", script, "--ckpt", str(tmp_path / "model.pt2"), *common,
                           "--output-dir", str(tmp_path / "from_export")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    masks = sorted((tmp_path / "from_ckpt" / "masks").rglob("*.png"))
    assert masks
    for mask in masks:
        other = tmp_path / "from_export" / mask.relative_to(tmp_path / "from_ckpt")
        assert np.array_equal(np.array(Image.open(mask)), np.array(Image.open(other))), mask.name
    assert (tmp_path / "from_ckpt" / "submission.csv").read_text() == \
        (tmp_path / "from_export" / "submission.csv").read_text()


def test_a_file_that_is_not_an_export_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(SystemExit, match="bad.pt2: not a torch.export program"):
        predict.main(["--ckpt", str(tmp_path / "bad.pt2"), "--data-dir", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
                    reason="onnx and onnxruntime are optional: pip install onnx onnxscript onnxruntime")
def test_onnx_export_carries_the_metadata(tmp_path):
    import onnx
    make_checkpoint(tmp_path / "best.pt", "deeplabv3plus")
    export.main(["--ckpt", str(tmp_path / "best.pt"), "-o", str(tmp_path / "model.onnx"), "--format", "onnx"])
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert '"class_names": ["Background", "General trash", ' in meta["trashseg.json"]
