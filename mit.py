"""Mix Transformer (MiT-B0..B5), SegFormer's encoder (Xie et al. 2021), hand-written as its reference code defines
it: four stages, each an overlapped patch embedding (a strided conv, then LayerNorm), transformer blocks whose
self-attention shrinks keys and values by a strided conv (spatial reduction 8, 4, 2, 1), a Mix-FFN (a 3x3 depthwise
conv between its two linear layers: position comes from the conv, there is no position embedding), and a
LayerNorm. Features at strides 4, 8, 16 and 32.

    encoder = MiTEncoder("mit_b0")                 # random weights
    load_weights(model, "mit_b0.pth")              # checkpoint.py: the official ImageNet file, or Hugging Face's
                                                   # nvidia/mit-b0 state dict (its names are mapped)

The official ImageNet weights are not packaged (their licence, NVIDIA's, allows non-commercial use only): give
train.py --weights FILE.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth

# name -> (embedding dims, blocks per stage); every variant: heads 1, 2, 5, 8, reduction 8, 4, 2, 1, MLP ratio 4
MIT_CONFIGS = {"mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)), "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
               "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)), "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
               "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)), "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3))}
HEADS, REDUCTIONS, MLP_RATIO = (1, 2, 5, 8), (8, 4, 2, 1), 4


class PatchEmbed(nn.Module):
    """Overlapping patches: a conv of kernel 7 stride 4 (first stage) or 3 stride 2, then LayerNorm over tokens."""

    def __init__(self, in_ch, dim, kernel, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        height, width = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class ReducedAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from the map shrunk `reduction` times per side."""

    def __init__(self, dim, heads, reduction):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, reduction, reduction) if reduction > 1 else None
        self.norm = nn.LayerNorm(dim) if reduction > 1 else None

    def forward(self, x, height, width):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        if self.sr is not None:
            x = x.transpose(1, 2).reshape(b, c, height, width)
            x = self.norm(self.sr(x).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DepthwiseConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, height, width):
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, height, width)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.dwconv, self.fc2 = nn.Linear(dim, hidden), DepthwiseConv(hidden), nn.Linear(hidden, dim)

    def forward(self, x, height, width):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), height, width)))


class Block(nn.Module):
    def __init__(self, dim, heads, reduction, drop_path):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = ReducedAttention(dim, heads, reduction)
        self.mlp = MixFFN(dim, dim * MLP_RATIO)
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x, height, width):
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class MixTransformer(nn.Module):
    """The network under the official file's key names: patch_embed1..4, block1..4, norm1..4 (its classifier,
    `head`, is not built)."""

    def __init__(self, name, drop_path=0.1):
        super().__init__()
        dims, depths = MIT_CONFIGS[name]
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()  # deeper blocks drop more, as the reference
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            first = sum(depths[:i])
            self.add_module(f"patch_embed{i + 1}", PatchEmbed(3 if i == 0 else dims[i - 1], dim, 7 if i == 0 else 3,
                                                              4 if i == 0 else 2))
            self.add_module(f"block{i + 1}", nn.ModuleList([Block(dim, HEADS[i], REDUCTIONS[i], rates[first + j])
                                                            for j in range(depth)]))
            self.add_module(f"norm{i + 1}", nn.LayerNorm(dim, eps=1e-6))

    def forward(self, x):
        feats = []
        for i in range(1, 5):
            x, height, width = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, height, width)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
            feats.append(x)
        return feats


class MiTEncoder(nn.Module):
    """MiT as model.py's encoders are seen by the heads: strides, channels, block paths for layer decay."""

    def __init__(self, name, drop_path=None):
        super().__init__()
        self.backbone, self.norms, self.output_stride = name, None, 32
        self.net = MixTransformer(name, 0.1 if drop_path is None else drop_path)
        self.strides, self.channels = [4, 8, 16, 32], list(MIT_CONFIGS[name][0])
        depths = MIT_CONFIGS[name][1]
        self.stage_paths = [[f"patch_embed{i + 1}"] + [f"block{i + 1}.{j}" for j in range(depths[i])]
                            + [f"norm{i + 1}"] for i in range(4)]

    def forward(self, x):
        return self.net(x)

    @staticmethod
    def weight_names(state):
        return official_names(state)

    def describe(self):
        return "\n".join(f"stride {s:>2}: {c:>4} channels from stage {i + 1}"
                         for i, (s, c) in enumerate(zip(self.strides, self.channels)))


HF_NAMES = [  # Hugging Face's SegFormer names -> the official ones (keys and values are split there: see below)
    (r"^(segformer\.)?encoder\.patch_embeddings\.(\d)\.proj\.", lambda m: f"patch_embed{int(m[2]) + 1}.proj."),
    (r"^(segformer\.)?encoder\.patch_embeddings\.(\d)\.layer_norm\.", lambda m: f"patch_embed{int(m[2]) + 1}.norm."),
    (r"^(segformer\.)?encoder\.layer_norm\.(\d)\.", lambda m: f"norm{int(m[2]) + 1}."),
    (r"^(segformer\.)?encoder\.block\.(\d)\.(\d+)\.", lambda m: f"block{int(m[2]) + 1}.{m[3]}."),
]
HF_PARTS = {"layer_norm_1.": "norm1.", "layer_norm_2.": "norm2.", "attention.self.query.": "attn.q.",
            "attention.self.sr.": "attn.sr.", "attention.self.layer_norm.": "attn.norm.",
            "attention.output.dense.": "attn.proj.", "mlp.dense1.": "mlp.fc1.", "mlp.dense2.": "mlp.fc2."}


def official_names(state):
    """A MiT state dict under the official key names: Hugging Face's are mapped (their separate key and value
    projections joined into `kv`, keys first); official ones pass unchanged; the classifier is dropped."""
    out = {}
    for key, value in state.items():
        for pattern, stem in HF_NAMES:
            match = re.match(pattern, key)
            if match:
                rest = key[match.end():]
                for hf, ours in HF_PARTS.items():
                    rest = rest.replace(hf, ours) if rest.startswith(hf) else rest
                key = stem(match) + rest
                break
        if not key.startswith(("head.", "classifier.", "decode_head.")):
            out[key] = value
    for key in [k for k in out if ".attention.self.key." in k]:
        prefix, kind = key.split(".attention.self.key.")
        out[f"{prefix}.attn.kv.{kind}"] = torch.cat([out.pop(key), out.pop(f"{prefix}.attention.self.value.{kind}")])
    return out
