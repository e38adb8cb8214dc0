import re
import urllib.error

import pytest
import torch
import torchvision

import model as model_module
from checkpoint import load_weights
from model import ModelError, build_model

HEAVY = pytest.mark.slow  # a large network: seconds to build and run on the CPU
CASES = [("deeplabv3plus", "resnet18", None), pytest.param("deeplabv3plus", "resnet50", 8, marks=HEAVY),
         pytest.param("deeplabv3plus", "mobilenet_v3_large", None, marks=HEAVY),
         pytest.param("deeplabv3plus", "efficientnet_b0", None, marks=HEAVY),
         pytest.param("deeplabv3plus", "convnext_tiny", None, marks=HEAVY),
         pytest.param("deeplabv3plus", "swin_t", None, marks=HEAVY),
         ("unet", "resnet18", None), pytest.param("unet", "resnet50", None, marks=HEAVY),
         pytest.param("unet", "mobilenet_v3_large", None, marks=HEAVY),
         pytest.param("unet", "efficientnet_b0", None, marks=HEAVY),
         pytest.param("unet", "convnext_tiny", None, marks=HEAVY), pytest.param("unet", "swin_t", None, marks=HEAVY),
         pytest.param("unet", "regnet_y_400mf", None, marks=HEAVY)]


def first_conv(net):
    return next(m for m in net.encoder.net.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("arch,backbone,output_stride", CASES)
def test_shapes_finite_and_gradients_reach_the_first_conv(arch, backbone, output_stride):
    torch.manual_seed(0)
    net = build_model(arch, backbone, num_classes=5, output_stride=output_stride)
    net.train()
    for shape in [(2, 3, 96, 128), (1, 3, 75, 101)]:
        net.zero_grad()
        out = net(torch.randn(*shape))
        assert out.shape == (shape[0], 5, shape[2], shape[3])
        assert torch.isfinite(out).all()
        out.float().pow(2).mean().backward()
        grad = first_conv(net).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.slow
def test_output_stride_by_dilation_and_its_limits():
    net = build_model("deeplabv3plus", "resnet50", 3, output_stride=8)
    assert net.encoder.strides == [2, 4, 8, 8, 8]
    with torch.no_grad():
        feats = net.encoder(torch.zeros(1, 3, 64, 64))
    assert feats[-1].shape[-1] == 8  # 64 / 8
    assert build_model("deeplabv3plus", "mobilenet_v3_large", 3).encoder.output_stride == 16
    assert build_model("deeplabv3plus", "convnext_tiny", 3).encoder.output_stride == 32  # documented fallback
    with pytest.raises(ModelError, match="convnext_tiny .* cannot give output stride 16"):
        build_model("deeplabv3plus", "convnext_tiny", 3, output_stride=16)
    with pytest.raises(ModelError, match="unknown backbone 'resnet9'"):
        build_model("unet", "resnet9")


def test_aspp_rates_follow_the_output_stride():
    rates = lambda net: [b[0].dilation[0] for b in net.aspp.branches[1:]]
    assert rates(build_model("deeplabv3plus", "resnet18", 3, output_stride=16)) == [6, 12, 18]
    assert rates(build_model("deeplabv3plus", "resnet18", 3, output_stride=8)) == [12, 24, 36]


def test_deeplab_head_is_separable_by_default_and_full_on_request():
    def depthwise(net):
        return [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    net = build_model("deeplabv3plus", "resnet18", 3)
    # ASPP's three atrous branches and the refinement conv
    assert len(depthwise(net.aspp)) == 3 and len(depthwise(net.refine)) == 1
    for block in net.refine:  # depthwise feeds the pointwise conv directly, no norm/activation between
        assert isinstance(block[0], torch.nn.Conv2d) and block[0].groups > 1
        assert isinstance(block[1], torch.nn.Conv2d) and block[1].kernel_size == (1, 1)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    full = build_model("deeplabv3plus", "resnet18", 3, separable=False)
    assert not depthwise(full.aspp) and not depthwise(full.refine)
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in net.parameters())


def test_deeplab_decoder_conv_count():
    one = build_model("deeplabv3plus", "resnet18", 3)  # SMP's one by default
    two = build_model("deeplabv3plus", "resnet18", 3, decoder_convs=2)  # the paper's
    assert len(two.refine) == 2 and len(one.refine) == 1
    assert one.refine[0][0].in_channels == 256 + 48  # the one conv takes the fused features
    assert sum(p.numel() for p in one.parameters()) < sum(p.numel() for p in two.parameters())
    assert one(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ModelError, match="at least 1 decoder conv"):
        build_model("deeplabv3plus", "resnet18", 3, decoder_convs=0)


def test_whole_model_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    net = build_model("unet", "resnet18", 4).eval()
    torch.save({"model": net.state_dict()}, tmp_path / "ckpt.pt")  # a checkpoint holding the model
    torch.manual_seed(1)
    other = build_model("unet", "resnet18", 4)
    assert re.match(r".*ckpt.pt: loaded (\d+) of \1 model tensors$", load_weights(other, tmp_path / "ckpt.pt"))
    other.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), other(x))


def test_backbone_weights_file_from_torchvision_keys(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    net = build_model("deeplabv3plus", "resnet18", 4)
    report = load_weights(net, tmp_path / "resnet18.pth")
    assert "loaded" in report and "unused" not in report  # fc.* is a known head key, silently dropped
    assert torch.equal(net.encoder.net.conv1.weight, tv.conv1.weight)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ModelError, match="shapes differ"):
        load_weights(build_model("unet", "resnet50", 4), tmp_path / "resnet34.pth")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(ModelError, match="no key matches"):
        load_weights(net, tmp_path / "junk.pth")
    with pytest.raises(ModelError, match="not found"):
        load_weights(net, tmp_path / "missing.pth")


def test_offline_pretrained_request_says_what_to_do(monkeypatch):
    def offline(**kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models, "resnet18", offline)
    with pytest.raises(ModelError, match="--no-pretrained.*--weights FILE"):
        build_model("unet", "resnet18", pretrained=True)


def test_pretrained_uses_torchvision_weights_enum(monkeypatch):
    seen = {}
    real = torchvision.models.resnet18

    def fake(weights=None):
        seen["weights"] = weights
        return real(weights=None)
    monkeypatch.setattr(torchvision.models, "resnet18", fake)
    build_model("unet", "resnet18", pretrained=True)
    assert seen["weights"] == "DEFAULT"
    build_model("unet", "resnet18", pretrained=False)
    assert seen["weights"] is None


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    net = build_model("deeplabv3plus", "resnet18", 3).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref = net(x)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-4)


def test_flop_counter_measures(monkeypatch):
    net = build_model("unet", "resnet18", 3)
    assert model_module.count_flops(net, size=64) > 1e8


def stochastic_depth_rates(model):
    return [m.p for m in model.modules() if isinstance(m, torchvision.ops.StochasticDepth)]


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_b0", "efficientnet_v2_s",
                                      "convnext_tiny", "swin_t"])
def test_drop_path_reaches_every_family_and_trains(backbone):
    """--drop-path sets the deepest block's rate (torchvision's linear rise kept), and one training step runs:
    swin_t once crashed here, as torchvision's swin builders pass their own stochastic_depth_prob."""
    import backbones
    default = stochastic_depth_rates(build_model("unet", backbone, 3))
    rates = stochastic_depth_rates(build_model("unet", backbone, 3, drop_path=0.3))
    assert len(rates) == len(default) > 0
    assert rates == pytest.approx([r * 0.3 / backbones.DROP_PATH_DEFAULTS[backbone] for r in default])
    assert 0.25 < max(rates) <= 0.3 and min(rates) < 0.05
    model = build_model("upernet", backbone, 3, head_channels=32, drop_path=0.3, aux=True).train()
    out = model(torch.randn(2, 3, 64, 64))
    logits = out[0] if isinstance(out, (tuple, list)) else out
    logits.mean().backward()
    assert logits.shape == (2, 3, 64, 64)


def test_drop_path_zero_makes_training_passes_repeat():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for rate, equal in ((0.0, True), (0.2, False)):
        model = build_model("unet", "efficientnet_lite0", 3, drop_path=rate).train()
        for m in model.modules():  # batch-norm statistics aside, only stochastic depth makes passes differ
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0
        torch.manual_seed(1)
        first = model(x)
        second = model(x)
        assert torch.equal(first, second) == equal, rate


def test_drop_path_on_a_family_without_it_is_a_clear_error():
    with pytest.raises(ModelError, match="resnet18 has no stochastic depth"):
        build_model("unet", "resnet18", 3, drop_path=0.1)
    build_model("unet", "resnet18", 3, drop_path=0.0)  # 0 asks for nothing it lacks


@pytest.mark.slow
def test_the_table_prints_a_row_per_network_and_flops_on_request():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "model.py"
    plain = subprocess.run([sys.executable, str(script), "--archs", "unet", "upernet", "--backbones", "resnet18",
                            "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    rows = [line for line in plain.stdout.splitlines() if line.startswith("| unet") or line.startswith("| upernet")]
    assert len(rows) == 2 and "GFLOPs" not in plain.stdout
    with_flops = subprocess.run([sys.executable, str(script), "--archs", "unet", "--backbones", "resnet18",
                                 "--repeats", "1", "--flops"], capture_output=True, text=True, timeout=300)
    row = next(line for line in with_flops.stdout.splitlines() if line.startswith("| unet"))
    assert "GFLOPs @512" in with_flops.stdout and float(row.split("|")[5]) > 1  # UNet/resnet18 at 512: ~20 GFLOPs
