"""MiT (SegFormer's encoder): shapes, and the official ImageNet file's key names and shapes (and Hugging Face's)
loading onto it, from synthetic state dicts written here from the reference code's naming, not from mit.py."""
import pytest
import torch

from checkpoint import load_weights
from model import ModelError, build_model

B0_DIMS, B0_DEPTHS = (32, 64, 160, 256), (2, 2, 2, 2)


def official_b0(seed=0):
    """Every tensor of SegFormer's released mit_b0.pth by name and shape (biases, norms, classifier included)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {}
    for s, (dim, depth) in enumerate(zip(B0_DIMS, B0_DEPTHS), start=1):
        before, kernel, reduction = 3 if s == 1 else B0_DIMS[s - 2], 7 if s == 1 else 3, (8, 4, 2, 1)[s - 1]
        shapes.update({f"patch_embed{s}.proj.weight": (dim, before, kernel, kernel), f"patch_embed{s}.proj.bias": (dim,),
                       f"patch_embed{s}.norm.weight": (dim,), f"patch_embed{s}.norm.bias": (dim,),
                       f"norm{s}.weight": (dim,), f"norm{s}.bias": (dim,)})
        for j in range(depth):
            b = f"block{s}.{j}."
            shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "norm2.weight": (dim,),
                           b + "norm2.bias": (dim,), b + "attn.q.weight": (dim, dim), b + "attn.q.bias": (dim,),
                           b + "attn.kv.weight": (2 * dim, dim), b + "attn.kv.bias": (2 * dim,),
                           b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                           b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                           b + "mlp.dwconv.dwconv.weight": (4 * dim, 1, 3, 3), b + "mlp.dwconv.dwconv.bias": (4 * dim,),
                           b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
            if reduction > 1:
                shapes.update({b + "attn.sr.weight": (dim, dim, reduction, reduction), b + "attn.sr.bias": (dim,),
                               b + "attn.norm.weight": (dim,), b + "attn.norm.bias": (dim,)})
    shapes.update({"head.weight": (1000, 256), "head.bias": (1000,)})
    return {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}


def hugging_face(official):
    """The same tensors under Hugging Face's SegformerForImageClassification names (keys and values apart)."""
    parts = {"norm1.": "layer_norm_1.", "norm2.": "layer_norm_2.", "attn.q.": "attention.self.query.",
             "attn.sr.": "attention.self.sr.", "attn.norm.": "attention.self.layer_norm.",
             "attn.proj.": "attention.output.dense.", "mlp.fc1.": "mlp.dense1.", "mlp.fc2.": "mlp.dense2.",
             "mlp.dwconv.": "mlp.dwconv."}
    out = {}
    for key, value in official.items():
        if key.startswith("head."):
            out["classifier." + key[5:]] = value
        elif key.startswith("patch_embed"):
            stage, rest = key[len("patch_embed"):].split(".", 1)
            out[f"segformer.encoder.patch_embeddings.{int(stage) - 1}.{rest.replace('norm.', 'layer_norm.')}"] = value
        elif key.startswith("norm"):
            stage, rest = key[4:].split(".", 1)
            out[f"segformer.encoder.layer_norm.{int(stage) - 1}.{rest}"] = value
        else:
            stage, block, rest = key[5:].split(".", 2)
            prefix = f"segformer.encoder.block.{int(stage) - 1}.{block}."
            if rest.startswith("attn.kv."):
                key_half, value_half = value.chunk(2)
                out[prefix + "attention.self.key." + rest[8:]] = key_half
                out[prefix + "attention.self.value." + rest[8:]] = value_half
            else:
                part = next(p for p in parts if rest.startswith(p))
                out[prefix + parts[part] + rest[len(part):]] = value
    return out


@pytest.mark.parametrize("arch", ["segformer", "upernet"])
def test_mit_gives_four_strides_at_odd_sizes_and_learns_everywhere(arch):
    model = build_model(arch, "mit_b0", 4, head_channels=32).train()
    assert model.encoder.strides == [4, 8, 16, 32] and model.encoder.channels == list(B0_DIMS)
    out = model(torch.randn(2, 3, 75, 101))
    assert out.shape == (2, 4, 75, 101)
    torch.nn.functional.cross_entropy(out, torch.randint(0, 4, (2, 75, 101))).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


@pytest.mark.parametrize("names", ["official", "hugging_face"])
def test_the_official_file_loads_whole(tmp_path, names):
    official = official_b0()
    state = official if names == "official" else hugging_face(official)
    torch.save(state, tmp_path / "mit_b0.pth")
    model = build_model("segformer", "mit_b0", 4)
    report = load_weights(model, tmp_path / "mit_b0.pth")
    encoder_tensors = len(model.encoder.net.state_dict())
    assert f"loaded {encoder_tensors} of {encoder_tensors} backbone tensors" in report
    assert encoder_tensors == len(official) - 2  # every tensor but the classifier's
    loaded = model.encoder.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in official.items() if not k.startswith("head."))


def test_pretrained_mit_says_where_its_weights_come_from():
    with pytest.raises(ModelError, match="non-commercial.*--weights mit_b2.pth"):
        build_model("segformer", "mit_b2", 4, pretrained=True)
    with pytest.raises(ModelError, match="cannot give output stride 16"):
        build_model("deeplabv3plus", "mit_b0", 4, output_stride=16)
