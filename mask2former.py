"""Mask2Former for semantic segmentation (Cheng et al. 2022), hand-written in plain PyTorch on model.py's encoders:
learned queries each predict one mask and one class; losses.MaskSetLoss matches them to the image's class masks.

    build_model("mask2former", "resnet50", 11)                       # deformable pixel decoder, 100 queries, 9 layers
    build_model("mask2former", "mobilenet_v2", 11, pixel_decoder="fpn", queries=50, dec_layers=6)

The pixel decoder turns the encoder's strides 4-32 into 256-channel maps: multi-scale deformable attention over
strides 8-32 (6 layers, sampling by grid_sample as the reference's pure-PyTorch path does) or, lighter, an FPN
(the paper: 1.6 mIoU lower on ADE20K with R50); plus stride-4 mask features. The transformer decoder attends to
strides 32, 16, 8 in turn (layer i to level i mod 3): masked cross-attention (each query only where its previous
mask is >= 0.5; a query whose mask is empty everywhere may look everywhere), self-attention, FFN. A class head
(K + no-object) and a mask head (3-layer MLP, dot product with the mask features) predict after the query
initialisation and after every layer; in training the network returns all those predictions (deep supervision),
in eval mode per-class scores at the input size whose softmax is each pixel's class probability, so prediction,
TTA, ensembles and export treat it like the per-pixel networks.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from heads import four_levels


def sine_positions(x, channels=256, temperature=10000):
    """DETR's 2-D sine positional encoding of a (B, C, H, W) map: (B, channels, H, W), normalised to [0, 2 pi]."""
    b, _, h, w = x.shape
    y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32)[:, None].expand(h, w) / (h + 1e-6)
    x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32)[None, :].expand(h, w) / (w + 1e-6)
    half = channels // 2
    dim_t = temperature ** (2 * (torch.arange(half, device=x.device) // 2) / half)
    pos_x, pos_y = x_embed[..., None] * 2 * math.pi / dim_t, y_embed[..., None] * 2 * math.pi / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=3).flatten(2)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)[None].expand(b, -1, -1, -1).to(x.dtype)


def conv_gn(in_ch, out_ch, kernel, relu=True):
    layers = [nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False), nn.GroupNorm(32, out_ch)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


# ----------------------------------------------------------------------------- pixel decoders

class FPNPixelDecoder(nn.Module):
    """MaskFormer's light pixel decoder: lateral 1x1 and output 3x3 convs, top-down from stride 32."""

    def __init__(self, in_channels, dim=256, mask_dim=256):
        super().__init__()
        self.laterals = nn.ModuleList([conv_gn(c, dim, 1, relu=False) for c in in_channels[:-1]])
        self.outputs = nn.ModuleList([conv_gn(dim, dim, 3) for _ in in_channels[:-1]])
        self.top = conv_gn(in_channels[-1], dim, 3)
        self.mask_features = nn.Conv2d(dim, mask_dim, 3, padding=1)

    def forward(self, feats):
        """feats at strides 4, 8, 16, 32 -> (mask features at stride 4, [strides 32, 16, 8] for the decoder)."""
        y = self.top(feats[-1])
        levels = [y]
        for lateral, output, f in zip(self.laterals[::-1], self.outputs[::-1], feats[:-1][::-1]):
            y = output(lateral(f) + F.interpolate(y, size=f.shape[-2:], mode="nearest"))
            levels.append(y)
        return self.mask_features(levels[-1]), levels[:3]


class DeformableAttention(nn.Module):
    """Multi-scale deformable attention (Zhu et al. 2021): each query samples `points` locations per head and level
    around its reference point, by bilinear grid_sample, and sums them with learned weights."""

    def __init__(self, dim=256, heads=8, levels=3, points=4):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj, self.output_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():  # the reference's start: each head looks in its own direction, farther per point
            angles = torch.arange(heads) * (2 * math.pi / heads)
            grid = torch.stack([angles.cos(), angles.sin()], -1)
            grid = grid / grid.abs().max(-1, keepdim=True)[0]
            grid = grid[:, None, None, :].repeat(1, levels, points, 1) * torch.arange(1, points + 1)[None, None, :, None]
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(self, query, reference, value, shapes):
        """query (B, Q, C), reference (B, Q, levels, 2) in [0, 1] as (x, y), value (B, sum HW, C), shapes [(H, W)]."""
        b, q, c = query.shape
        head_dim = c // self.heads
        value = self.value_proj(value).view(b, -1, self.heads, head_dim)
        offsets = self.sampling_offsets(query).view(b, q, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(b, q, self.heads, self.levels * self.points).softmax(-1)
        normaliser = torch.tensor([[w, h] for h, w in shapes], device=query.device, dtype=query.dtype)
        locations = reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        sampled = []
        for level, part in enumerate(value.split([h * w for h, w in shapes], dim=1)):
            h, w = shapes[level]
            part = part.permute(0, 2, 3, 1).reshape(b * self.heads, head_dim, h, w)
            grid = 2 * locations[:, :, :, level].transpose(1, 2).flatten(0, 1) - 1  # (B*heads, Q, points, 2)
            sampled.append(F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        sampled = torch.stack(sampled, dim=-2).flatten(-2)  # (B*heads, head_dim, Q, levels*points)
        weights = weights.transpose(1, 2).reshape(b * self.heads, 1, q, self.levels * self.points)
        out = (sampled * weights).sum(-1).view(b, self.heads * head_dim, q).transpose(1, 2)
        return self.output_proj(out)


class DeformableLayer(nn.Module):
    def __init__(self, dim, heads, levels, ffn=1024):
        super().__init__()
        self.attn = DeformableAttention(dim, heads, levels)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, dim))

    def forward(self, x, pos, reference, shapes):
        x = self.norm1(x + self.attn(x + pos, reference, x, shapes))
        return self.norm2(x + self.ffn(x))


class DeformablePixelDecoder(nn.Module):
    """Mask2Former's pixel decoder: strides 8-32 projected to `dim` (1x1 conv + GroupNorm), six deformable
    encoder layers over all three at once (sine positions plus a level embedding), then an FPN step that adds
    the stride-4 features and a 1x1 conv giving the mask features."""

    def __init__(self, in_channels, dim=256, mask_dim=256, layers=6, heads=8):
        super().__init__()
        self.projections = nn.ModuleList([conv_gn(c, dim, 1, relu=False) for c in in_channels[1:][::-1]])
        self.level_embed = nn.Parameter(torch.randn(3, dim) * 0.02)
        self.layers = nn.ModuleList([DeformableLayer(dim, heads, 3) for _ in range(layers)])
        self.lateral = conv_gn(in_channels[0], dim, 1, relu=False)
        self.output = conv_gn(dim, dim, 3)
        self.mask_features = nn.Conv2d(dim, mask_dim, 1)

    @staticmethod
    def reference_points(shapes, device, dtype):
        """Each position's centre, normalised to [0, 1] as (x, y), for every level: (1, sum HW, levels, 2)."""
        points = []
        for h, w in shapes:
            y, x = torch.meshgrid(torch.arange(h, device=device, dtype=dtype) + 0.5,
                                  torch.arange(w, device=device, dtype=dtype) + 0.5, indexing="ij")
            points.append(torch.stack([x.flatten() / w, y.flatten() / h], -1))
        return torch.cat(points)[None, :, None, :].expand(-1, -1, len(shapes), -1)

    def forward(self, feats):
        maps = [proj(f) for proj, f in zip(self.projections, feats[1:][::-1])]  # strides 32, 16, 8
        shapes = [tuple(m.shape[-2:]) for m in maps]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        pos = torch.cat([(sine_positions(m, m.shape[1]) + self.level_embed[i][None, :, None, None])
                         .flatten(2).transpose(1, 2) for i, m in enumerate(maps)], 1)
        reference = self.reference_points(shapes, tokens.device, tokens.dtype)
        for layer in self.layers:
            tokens = layer(tokens, pos, reference, shapes)
        levels = [t.transpose(1, 2).reshape(m.shape) for t, m in zip(tokens.split([h * w for h, w in shapes], 1),
                                                                         maps)]
        finest = self.lateral(feats[0])
        finest = self.output(finest + F.interpolate(levels[-1], size=finest.shape[-2:], mode="bilinear",
                                                    align_corners=False))
        return self.mask_features(finest), levels


# ----------------------------------------------------------------------------- transformer decoder

class DecoderLayer(nn.Module):
    """Masked cross-attention to one level, self-attention among the queries, FFN; each followed by a residual and
    LayerNorm (the reference's post-norm)."""

    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, queries, query_pos, memory, memory_pos, blocked):
        x = self.cross(queries + query_pos, memory + memory_pos, memory, attn_mask=blocked, need_weights=False)[0]
        queries = self.norms[0](queries + x)
        x = self.self_attn(queries + query_pos, queries + query_pos, queries, need_weights=False)[0]
        queries = self.norms[1](queries + x)
        return self.norms[2](queries + self.ffn(queries))


class MaskDecoder(nn.Module):
    """Mask2Former's transformer decoder: `queries` learnable query features and positions, `layers` layers
    cycling over the three levels coarsest first, class and mask predictions after the start and every layer."""

    def __init__(self, num_classes, dim=256, queries=100, layers=9, heads=8, ffn=2048, mask_dim=256):
        super().__init__()
        self.heads = heads
        self.query_feat, self.query_pos = nn.Embedding(queries, dim), nn.Embedding(queries, dim)
        self.level_embed = nn.Embedding(3, dim)
        self.layers = nn.ModuleList([DecoderLayer(dim, heads, ffn) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes + 1)  # the last class: no object
        self.mask_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                                       nn.ReLU(inplace=True), nn.Linear(dim, mask_dim))

    def predict(self, queries, mask_features, next_size):
        """(class logits (B, Q, K+1), mask logits (B, Q, H4, W4), the attention mask for the next level)."""
        out = self.norm(queries)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_head(out), mask_features)
        small = F.interpolate(masks, size=next_size, mode="bilinear", align_corners=False)
        blocked = (small.sigmoid() < 0.5).flatten(2)  # True: the query may not look there
        blocked[blocked.all(-1)] = False  # a query with an empty mask may look everywhere (else softmax of -inf: NaN)
        blocked = blocked.repeat_interleave(self.heads, dim=0).detach()
        return self.class_head(out), masks, blocked

    def forward(self, levels, mask_features):
        """levels: three (B, C, H, W) maps, coarsest first; returns [(class logits, mask logits)] per prediction."""
        b = mask_features.shape[0]
        memory = [lv.flatten(2).transpose(1, 2) for lv in levels]
        memory_pos = [(sine_positions(lv, lv.shape[1]).flatten(2).transpose(1, 2) + self.level_embed.weight[i])
                      for i, lv in enumerate(levels)]
        queries = self.query_feat.weight[None].expand(b, -1, -1)
        query_pos = self.query_pos.weight[None].expand(b, -1, -1)
        logits, masks, blocked = self.predict(queries, mask_features, levels[0].shape[-2:])
        predictions = [(logits, masks)]
        for i, layer in enumerate(self.layers):
            level = i % len(levels)
            queries = layer(queries, query_pos, memory[level], memory_pos[level], blocked)
            logits, masks, blocked = self.predict(queries, mask_features, levels[(i + 1) % len(levels)].shape[-2:])
            predictions.append((logits, masks))
        return predictions


class Mask2Former(nn.Module):
    """Encoder, pixel decoder, transformer decoder. Training: {"logits", "masks", "aux"} (the last prediction and
    the earlier ones, each at stride 4); eval: class scores at the input size, as log scores normalised per pixel,
    so that their softmax is softmax(class)[:-1] combined with sigmoid(mask) over the queries, per pixel summing
    to one."""

    def __init__(self, encoder, num_classes, pixel_decoder="deformable", queries=100, dec_layers=9):
        super().__init__()
        self.encoder, self.aux_head = encoder, None
        self.levels = four_levels(encoder, "Mask2Former")
        channels = [encoder.channels[i] for i in self.levels]
        decoders = {"deformable": DeformablePixelDecoder, "fpn": FPNPixelDecoder}
        if pixel_decoder not in decoders:
            raise ValueError(f"--pixel-decoder must be one of {', '.join(decoders)}, not {pixel_decoder!r}")
        self.pixel_decoder = decoders[pixel_decoder](channels)
        self.decoder = MaskDecoder(num_classes, queries=queries, layers=dec_layers)

    def forward(self, x):
        feats = self.encoder(x)
        mask_features, levels = self.pixel_decoder([feats[i] for i in self.levels])
        predictions = self.decoder(levels, mask_features)
        logits, masks = predictions[-1]
        if self.training:
            return {"logits": logits, "masks": masks, "aux": predictions[:-1]}
        return semantic_scores(logits, masks, x.shape[-2:])


def semantic_scores(class_logits, mask_logits, size):
    """(B, K, H, W) log of the per-pixel class scores sum_q softmax(class)[q, k] * sigmoid(mask)[q], normalised
    over k: the reference's semantic inference in a form every stage reads as logits."""
    masks = F.interpolate(mask_logits.float(), size=size, mode="bilinear", align_corners=False).sigmoid()
    scores = torch.einsum("bqk,bqhw->bkhw", class_logits.float().softmax(-1)[..., :-1], masks)
    return torch.log(scores.clamp_min(1e-12) / scores.sum(1, keepdim=True).clamp_min(1e-12))
