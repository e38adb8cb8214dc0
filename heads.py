"""Decoder heads on an Encoder (model.py): DeepLabV3+, UNet, UPerNet, and the auxiliary FCN head used in training.
Each head's `decode` turns the encoder's feature maps (one per stride) into logits; SegmentationNet upsamples them
to the input size.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones import ModelError


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


class SegmentationNet(nn.Module):
    """An encoder and a decoder head (`decode`: the encoder's feature maps -> logits at some stride), the logits
    upsampled to the input. With an auxiliary head (training only) forward returns (logits, auxiliary logits) in
    train mode; in eval mode, and so in validation, prediction, TTA and export, logits alone."""

    def __init__(self):
        super().__init__()
        self.aux_head, self.aux_index = None, None

    def forward(self, x):
        feats = self.encoder(x)
        logits = upsample_to(self.decode(feats), x.shape[-2:])
        if self.aux_head is not None and self.training:
            return logits, upsample_to(self.aux_head(feats[self.aux_index]), x.shape[-2:])
        return logits

    def add_aux_head(self, num_classes):
        """mmsegmentation's auxiliary FCN head on the second deepest stage (stride 16 unless dilated): 3x3 conv to
        256, BN, ReLU, dropout 0.1,
        classifier. Its loss (train.py --aux-weight) adds a gradient path into the encoder's middle."""
        self.aux_index = len(self.encoder.strides) - 2  # the stage before the deepest: stride 16 without dilation
        self.aux_head = nn.Sequential(conv_bn_relu(self.encoder.channels[self.aux_index], 256, 3), nn.Dropout(0.1),
                                      nn.Conv2d(256, num_classes, 1))
        return self


class DeepLabV3Plus(SegmentationNet):
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

    def decode(self, feats):
        low = self.low_project(feats[self.low_index])
        y = upsample_to(self.aspp(feats[-1]), low)
        return self.classifier(self.refine(torch.cat([y, low], 1)))


class UNetBlock(nn.Module):
    def __init__(self, in_ch, skip_ch, out_ch):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(in_ch + skip_ch, out_ch), conv_bn_relu(out_ch, out_ch))

    def forward(self, x, skip):
        # upsample to the skip's exact size (not x2), so odd input sizes line up
        return self.convs(torch.cat([upsample_to(x, skip), skip], 1))


class UNet(SegmentationNet):
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

    def decode(self, feats):
        y = feats[-1]
        for block, index in zip(self.blocks, self.skip_indices):
            y = block(y, feats[index])
        return self.head(y)




class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module as UPerNet uses it: the features average-pooled to 1x1, 2x2, 3x3 and 6x6
    grids, each 1x1 conv + BN + ReLU, upsampled and concatenated with the features, then a 3x3 conv. The 1x1 grid
    has no BN (one value per channel and image breaks BN at batch size 1), as in ASPP's pooling branch."""

    def __init__(self, in_ch, out_ch, scales=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(in_ch, out_ch, 1), nn.ReLU(inplace=True)) if s == 1
            else nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_ch, out_ch, 1)) for s in scales])
        self.bottleneck = conv_bn_relu(in_ch + len(scales) * out_ch, out_ch, 3)

    def forward(self, x):
        return self.bottleneck(torch.cat([x] + [upsample_to(stage(x), x) for stage in self.stages], 1))


def four_levels(encoder, head):
    """The encoder's four deepest stages at strides 4 and deeper (a CNN stem's stride 2 is unused)."""
    levels = [i for i, s in enumerate(encoder.strides) if s >= 4][-4:]
    if len(levels) < 4:
        raise ModelError(f"{head} needs four stages at strides 4 and deeper; {encoder.backbone} gives "
                         f"{encoder.strides}")
    return levels


class UPerNet(SegmentationNet):
    """Xiao et al. 2018, as mmsegmentation's UPerHead: pyramid pooling on the deepest of four stages (strides
    4-32), lateral 1x1 convs on the other three, a top-down path adding each upsampled level to the next finer one,
    a 3x3 conv on each level, all four upsampled to stride 4 and concatenated, a 3x3 fusion conv, dropout 0.1 and
    the classifier. `channels` is the head's width (mmseg: 512)."""

    def __init__(self, encoder, num_classes, channels=512):
        super().__init__()
        self.encoder = encoder
        self.levels = four_levels(encoder, "UPerNet")
        *fine, deepest = [encoder.channels[i] for i in self.levels]
        self.ppm = PyramidPooling(deepest, channels)
        self.laterals = nn.ModuleList([conv_bn_relu(c, channels, 1) for c in fine])
        self.fpn_convs = nn.ModuleList([conv_bn_relu(channels, channels, 3) for _ in fine])
        self.fuse = nn.Sequential(conv_bn_relu(4 * channels, channels, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def decode(self, feats):
        *fine, deepest = [feats[i] for i in self.levels]
        levels = [lateral(f) for lateral, f in zip(self.laterals, fine)] + [self.ppm(deepest)]
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the coarser one, upsampled
            levels[i - 1] = levels[i - 1] + upsample_to(levels[i], levels[i - 1])
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        outs = [outs[0]] + [upsample_to(o, outs[0]) for o in outs[1:]]
        return self.classifier(self.fuse(torch.cat(outs, 1)))


class SegFormer(SegmentationNet):
    """Xie et al. 2021's all-MLP decoder, as its reference code: on each of the four stages at strides 4-32 a linear
    layer (1x1 conv) to `channels`, each upsampled to stride 4, concatenated coarsest first, fused by a 1x1 conv +
    BN + ReLU, dropout 0.1, the classifier. Light by design: it leans on its encoder's large receptive fields (the
    paper: 45.4 ADE20K mIoU on MiT-B2, 34.7 on ResNet-50)."""

    def __init__(self, encoder, num_classes, channels=256):
        super().__init__()
        self.encoder = encoder
        self.levels = four_levels(encoder, "SegFormer's head")
        self.linears = nn.ModuleList([nn.Conv2d(encoder.channels[i], channels, 1) for i in self.levels])
        self.fuse = nn.Sequential(conv_bn_relu(4 * channels, channels, 1), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def decode(self, feats):
        outs = [linear(feats[i]) for linear, i in zip(self.linears, self.levels)]
        finest = outs[0]
        return self.classifier(self.fuse(torch.cat([upsample_to(o, finest) for o in reversed(outs)], 1)))
