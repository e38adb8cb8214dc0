"""Networks: DeepLabV3+ and UNet, hand-written, on torchvision backbones.

    build_model("deeplabv3plus", "resnet50", num_classes=11, output_stride=8)
    build_model("unet", "convnext_tiny", num_classes=11, pretrained=True)     # torchvision's ImageNet weights
    checkpoint.load_weights(model, "resnet34.pth")                            # a local state dict
    python model.py                                # params, GFLOPs at 512x512, CPU forward ms at 256x256

The encoder runs a torchvision classification network's blocks in order and taps the last block at each stride
(2, 4, 8, 16, 32; convnext and swin start at 4). Which blocks form a stride is measured once, by a dry run, and
listed by `Encoder.describe()`. Output stride 16 or 8 is made by dilation: in every block deeper than the asked
stride, stride-2 convolutions become stride 1 and the larger kernels are dilated, which works for every
convolutional family here (resnet, resnext, wide_resnet, regnet, efficientnet, mobilenet); convnext and swin
downsample by patch merging and give stride 32 only (DeepLabV3+ then runs ASPP at stride 32 with halved rates).
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones import BACKBONES, ModelError, classification_net

ARCHS = ("deeplabv3plus", "unet")


class Encoder(nn.Module):
    """A torchvision backbone as a list of feature maps, one per stride."""

    def __init__(self, backbone, pretrained=False, output_stride=32, tf_padding=False):
        super().__init__()
        if backbone not in BACKBONES:
            raise ModelError(f"unknown backbone '{backbone}'; choose from {', '.join(BACKBONES)}")
        blocks, dilatable, self.nhwc = BACKBONES[backbone]
        self.backbone = backbone
        self.net = classification_net(backbone, pretrained, tf_padding)
        for name in ("fc", "classifier", "head", "avgpool", "norm", "permute", "flatten"):
            if hasattr(self.net, name):
                delattr(self.net, name)
        paths = [f"features.{i}" for i in range(blocks)] if isinstance(blocks, int) else blocks
        strides = self._measure_strides(paths)
        # stages: (stride, [block paths]) with the last block of each stride tapped
        self.stage_paths, self.strides = [], []
        for path, stride in zip(paths, strides):
            if self.strides and self.strides[-1] == stride:
                self.stage_paths[-1].append(path)
            else:
                self.stage_paths.append([path])
                self.strides.append(stride)
        if output_stride not in (8, 16, 32):
            raise ModelError(f"output stride must be 8, 16 or 32, not {output_stride}")
        if output_stride < max(self.strides):
            if not dilatable:
                raise ModelError(f"{backbone} downsamples by patch merging and cannot give output stride "
                                 f"{output_stride}; use output stride 32 with it")
            self._dilate(output_stride)
        self.output_stride = output_stride
        self.channels = self._measure_channels()

    def _run(self, x, paths):
        for path in paths:
            x = self.net.get_submodule(path)(x)
        return x

    @torch.no_grad()
    def _measure_strides(self, paths, size=64):
        was_training = self.net.training
        self.net.eval()  # a dry run must not touch BatchNorm statistics of pretrained weights
        x, strides = torch.zeros(1, 3, size, size), []
        for path in paths:
            x = self.net.get_submodule(path)(x)
            height = x.shape[1] if self.nhwc else x.shape[2]
            strides.append(size // height)
        self.net.train(was_training)
        return strides

    @torch.no_grad()
    def _measure_channels(self):
        was_training = self.net.training
        self.net.eval()
        feats = self.forward(torch.zeros(1, 3, 64, 64))
        self.net.train(was_training)
        return [f.shape[1] for f in feats]

    def _dilate(self, output_stride):
        for i, stride in enumerate(self.strides):
            if stride <= output_stride:
                continue
            rate = stride // output_stride
            for path in self.stage_paths[i]:
                for conv in self.net.get_submodule(path).modules():
                    if not isinstance(conv, nn.Conv2d):
                        continue
                    conv.stride = (1, 1)
                    k = conv.kernel_size[0]
                    if k > 1:
                        conv.dilation = (rate, rate)
                        conv.padding = (rate * (k // 2), rate * (k // 2))
            self.strides[i] = output_stride

    def forward(self, x):
        feats = []
        for paths in self.stage_paths:
            x = self._run(x, paths)
            feats.append(x.permute(0, 3, 1, 2) if self.nhwc else x)
        return feats

    def describe(self):
        return "\n".join(f"stride {s:>2}: {c:>4} channels from {', '.join(p)}"
                         for s, c, p in zip(self.strides, self.channels, self.stage_paths))


def conv_bn_relu(in_ch, out_ch, kernel=3, dilation=1, separable=False):
    padding = dilation * (kernel // 2)
    if separable and kernel > 1:
        # depthwise then pointwise: ~8x fewer FLOPs at the same field of view. No norm/activation in between
        # (Chollet 2017 found that trains as well or better).
        return nn.Sequential(
            nn.Conv2d(in_ch, in_ch, kernel, padding=padding, dilation=dilation, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


def upsample_to(x, like_or_size):
    size = like_or_size.shape[-2:] if torch.is_tensor(like_or_size) else like_or_size
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per rate, and image pooling."""

    def __init__(self, in_ch, out_ch=256, rates=(6, 12, 18), separable=False):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_ch, out_ch, 1)] +
                                      [conv_bn_relu(in_ch, out_ch, 3, r, separable) for r in rates])
        # no BatchNorm after pooling: one value per channel and image would break training at batch size 1
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, out_ch, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(conv_bn_relu(out_ch * (len(rates) + 2), out_ch, 1), nn.Dropout(0.1))

    def forward(self, x):
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, 1))


class DeepLabV3Plus(nn.Module):
    """Chen et al. 2018: ASPP on the deepest features, upsampled and fused with stride-4 features projected to 48
    channels, 3x3 refinement convs, 1x1 classifier, logits upsampled to the input. One refinement conv by default,
    as in SMP; decoder_convs=2 gives the paper's (docs/results.md compares them)."""

    def __init__(self, encoder, num_classes, separable=True, decoder_convs=1):
        super().__init__()
        self.encoder = encoder
        base = (6, 12, 18)  # the paper's rates at output stride 16; doubled at 8, halved at 32
        rates = tuple(r * 16 // encoder.output_stride for r in base)
        self.low_index = encoder.strides.index(4)
        self.aspp = ASPP(encoder.channels[-1], 256, rates, separable)
        self.low_project = conv_bn_relu(encoder.channels[self.low_index], 48, 1)
        if decoder_convs < 1:
            raise ModelError(f"DeepLabV3+ needs at least 1 decoder conv, not {decoder_convs}")
        self.refine = nn.Sequential(*[conv_bn_relu(256 + 48 if i == 0 else 256, 256, 3, separable=separable)
                                      for i in range(decoder_convs)])
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, x):
        feats = self.encoder(x)
        low = self.low_project(feats[self.low_index])
        y = upsample_to(self.aspp(feats[-1]), low)
        y = self.classifier(self.refine(torch.cat([y, low], 1)))
        return upsample_to(y, x.shape[-2:])


class UNetBlock(nn.Module):
    def __init__(self, in_ch, skip_ch, out_ch):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(in_ch + skip_ch, out_ch), conv_bn_relu(out_ch, out_ch))

    def forward(self, x, skip):
        # upsample to the skip's exact size (not x2), so odd input sizes line up
        return self.convs(torch.cat([upsample_to(x, skip), skip], 1))


class UNet(nn.Module):
    """Ronneberger et al. 2015 decoder on a backbone: from the deepest features up through every shallower
    stride the encoder gives (down to 2, or 4 for convnext/swin), then a 3x3 head whose logits are upsampled
    to the input size (no decoder block at full resolution: it costs the most and adds little)."""

    def __init__(self, encoder, num_classes, decoder_channels=(256, 128, 64, 32)):
        super().__init__()
        self.encoder = encoder
        skips = [i for i, s in enumerate(encoder.strides) if s < encoder.strides[-1]]
        self.skip_indices = skips[::-1]  # deepest skip first
        blocks, in_ch = [], encoder.channels[-1]
        for i, index in enumerate(self.skip_indices):
            out_ch = decoder_channels[min(i, len(decoder_channels) - 1)]
            blocks.append(UNetBlock(in_ch, encoder.channels[index], out_ch))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(in_ch, num_classes, 3, padding=1)

    def forward(self, x):
        feats = self.encoder(x)
        y = feats[-1]
        for block, index in zip(self.blocks, self.skip_indices):
            y = block(y, feats[index])
        return upsample_to(self.head(y), x.shape[-2:])


def build_model(arch, backbone, num_classes=11, pretrained=False, output_stride=None, separable=True,
                decoder_convs=1, tf_padding=False):
    """A segmentation network. output_stride None = 16 for DeepLabV3+ where the backbone can dilate, else 32.
    tf_padding: efficientnet_lite's stride-2 convs pad as TensorFlow's "SAME" (ignored by other backbones)."""
    if arch not in ARCHS:
        raise ModelError(f"unknown arch '{arch}'; choose from {', '.join(ARCHS)}")
    if backbone not in BACKBONES:
        raise ModelError(f"unknown backbone '{backbone}'; choose from {', '.join(BACKBONES)}")
    if output_stride is None:
        output_stride = 16 if arch == "deeplabv3plus" and BACKBONES[backbone][1] else 32
    encoder = Encoder(backbone, pretrained=pretrained, output_stride=output_stride, tf_padding=tf_padding)
    if arch == "deeplabv3plus":
        model = DeepLabV3Plus(encoder, num_classes, separable, decoder_convs)
    else:
        model = UNet(encoder, num_classes)
    return model


def count_flops(model, size=512):
    """Forward FLOPs (2 x multiply-adds) measured by torch's FLOP counter on one size x size image."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def forward_ms(model, size=256, repeats=10):
    model.eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description="Table of parameters, GFLOPs at 512x512 and CPU forward ms at 256x256.")
    p.add_argument("--archs", nargs="+", default=list(ARCHS))
    p.add_argument("--backbones", nargs="+",
                   default=["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"])
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--describe", action="store_true", help="also print each backbone's feature taps")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward = median of {args.repeats}, "
          f"batch 1, fp32, eval")
    print("| arch | backbone | output stride | params (M) | GFLOPs @512 | CPU forward ms @256 |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs:
        for backbone in args.backbones:
            model = build_model(arch, backbone, args.num_classes)
            if args.describe:
                print(model.encoder.describe())
            params = sum(p.numel() for p in model.parameters()) / 1e6
            gflops = count_flops(model) / 1e9
            ms = forward_ms(model, repeats=args.repeats)
            print(f"| {arch} | {backbone} | {model.encoder.output_stride} | {params:.2f} | {gflops:.1f} | {ms:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
