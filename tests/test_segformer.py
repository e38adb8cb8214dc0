"""SegFormer's all-MLP head on the project's encoders: shapes at odd sizes, gradients everywhere, the reference's
level order, and a run through train.py and predict.py."""
import json

import pytest
import torch

import predict
import train
from model import build_model
from test_train import tiny_args


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_output_matches_odd_input_sizes_and_every_parameter_learns(backbone):
    torch.manual_seed(0)
    model = build_model("segformer", backbone, 5)
    assert [model.encoder.strides[i] for i in model.levels] == [4, 8, 16, 32]
    assert all(linear.out_channels == 256 for linear in model.linears)  # the B0 head's width by default
    model.train()
    for shape in [(2, 3, 96, 128), (1, 3, 75, 101)]:
        model.zero_grad()
        out = model(torch.randn(*shape))
        assert out.shape == (shape[0], 5, shape[2], shape[3]) and torch.isfinite(out).all()
        torch.nn.functional.cross_entropy(out, torch.randint(0, 5, (shape[0],) + shape[2:])).backward()
        head = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in head)
        first = next(m for m in model.encoder.net.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.weight.grad.abs().sum() > 0


def test_levels_are_concatenated_coarsest_first_at_stride_4():
    model = build_model("segformer", "resnet18", 3, head_channels=8).eval()
    with torch.no_grad():
        for level, linear in enumerate(model.linears):  # level 0: stride 4 ... level 3: stride 32
            linear.weight.zero_()
            linear.bias.fill_(level + 1.0)
    seen = []
    model.fuse.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    fused_input = seen[0]
    assert fused_input.shape == (1, 32, 16, 24)  # four levels of 8 channels at stride 4
    assert [fused_input[0, 8 * k].unique().item() for k in range(4)] == [4.0, 3.0, 2.0, 1.0]


@pytest.mark.slow
def test_segformer_trains_and_predicts_through_the_stages(demo_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(demo_dir, out, "--arch", "segformer", "--epochs", "1", "--head-channels", "32"))
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "segformer" and config["head_channels"] == 32
    predict.main(["--ckpt", str(out / "last.pt"), "--data-dir", str(demo_dir), "--json", "train_all.json", "--eval",
                  "--output-dir", str(tmp_path / "preds"), "--workers", "0"])
    scored = json.loads((tmp_path / "preds" / "metrics.json").read_text())["mIoU"]
    validated = json.loads((out / "best_metrics.json").read_text())["mIoU"]
    assert scored == pytest.approx(validated, abs=1e-6)  # the checkpoint rebuilds the same head and weights
