"""UPerNet, the auxiliary head, and the fine-tuning recipe of hierarchical encoders (stage norms, stochastic depth,
layer-wise learning-rate decay, gradient clipping)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import predict
import train
from checkpoint import model_from_checkpoint, read_checkpoint
from losses import build_loss
from model import build_model
from optim import build_optimizer, lr_multipliers
from test_train import tiny_args

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backbone", ["resnet18", "regnet_y_400mf", "efficientnet_lite0", "mobilenet_v2",
                                      pytest.param("convnext_tiny", marks=pytest.mark.slow),
                                      pytest.param("swin_t", marks=pytest.mark.slow)])
def test_upernet_output_matches_odd_input_sizes(backbone):
    model = build_model("upernet", backbone, 5, head_channels=32, stage_norms=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 75, 101)).shape == (1, 5, 75, 101)
    assert len(model.levels) == 4 and [model.encoder.strides[i] for i in model.levels] == [4, 8, 16, 32]
    has_norms = backbone in ("convnext_tiny", "swin_t")  # the others end each stage in a BN already
    assert (model.encoder.norms is not None) == has_norms


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["swin_t", "convnext_tiny"])
def test_upernet_512_with_aux_head_has_the_papers_size(backbone):
    # the Swin and ConvNeXt papers: about 60 M parameters for UPerNet (512 channels) + auxiliary head
    model = build_model("upernet", backbone, 150, stage_norms=True, aux=True)
    assert 57e6 <= sum(p.numel() for p in model.parameters()) <= 63e6


def test_the_aux_head_trains_and_stays_out_of_eval():
    model = build_model("unet", "resnet18", 3, aux=True)
    x, masks = torch.randn(2, 3, 64, 96), torch.randint(0, 3, (2, 64, 96))
    model.train()
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 3, 64, 96)
    loss_fn = build_loss("ce")
    assert torch.isclose(train.training_loss((logits, aux), masks, loss_fn, 0.4),
                         loss_fn(logits, masks) + 0.4 * loss_fn(aux, masks))
    model.eval()
    out = model(x)
    assert torch.is_tensor(out) and out.shape == (2, 3, 64, 96)
    assert torch.isclose(train.training_loss(out, masks, loss_fn, 0.4), loss_fn(out, masks))


def test_layer_decay_puts_each_parameter_in_one_group_with_rates_falling_to_the_stem():
    model = build_model("upernet", "resnet18", 3, head_channels=16)
    groups = build_optimizer(model, "adamw", lr=1e-3, layer_decay=0.8).param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    mult = lr_multipliers(model, layer_decay=0.8)
    blocks = [b for paths in model.encoder.stage_paths for b in paths if any(
        n.startswith(f"encoder.net.{b}.") for n in mult)]  # relu and maxpool have no parameters
    rates = [mult[next(n for n in mult if n.startswith(f"encoder.net.{b}."))] for b in blocks]
    assert rates == sorted(rates) and rates[0] < rates[-1] < 1.0  # stem smallest, deepest block below the head
    assert rates[-1] == pytest.approx(0.8) and mult["classifier.weight"] == 1.0
    no_decay = [n for n, p in model.named_parameters() if any(p is q for g in groups if g["weight_decay"] == 0
                                                              for q in g["params"])]
    assert all(model.get_parameter(n).ndim <= 1 for n in no_decay) and no_decay


@pytest.mark.slow
def test_swin_position_tables_get_no_weight_decay():
    model = build_model("upernet", "swin_t", 3, head_channels=16)
    groups = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05).param_groups
    tables = {id(p) for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and all(g["weight_decay"] == 0 for g in groups for p in g["params"] if id(p) in tables)


@pytest.mark.slow
def test_stochastic_depth_is_off_in_eval_mode():
    model = build_model("unet", "convnext_tiny", 3, drop_path=0.5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        first = model(x)
        assert not torch.equal(first, model(x))


@pytest.mark.slow
def test_an_upernet_run_with_aux_head_predicts_without_it_and_scores_as_test_only(demo_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(demo_dir, out, "--arch", "upernet", "--head-channels", "32", "--aux-weight", "0.4",
                         "--epochs", "2", "--aug", "none", "--layer-decay", "0.9", "--clip-grad", "1.0"))
    ckpt = read_checkpoint(out / "best.pt")
    assert any(k.startswith("aux_head.") for k in ckpt["model"])  # trained with it, resumable with it
    assert model_from_checkpoint(ckpt).aux_head is None            # predicting builds no auxiliary head
    done = subprocess.run([sys.executable, "train.py", "--test-only", "--resume", str(out / "best.pt"), "--workers",
                           "0", "--device", "cpu"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    test_only = json.loads(done.stdout.strip().splitlines()[-1])
    predict.main(["--ckpt", str(out / "best.pt"), "--data-dir", str(demo_dir), "--json", "train_all.json", "--eval",
                  "--workers", "0", "--no-probs", "--output-dir", str(tmp_path / "pred"), "--mask-cache", "none",
                  "--device", "cpu"])
    predicted = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert predicted["mIoU"] == pytest.approx(test_only["mIoU"], abs=1e-9)


def crop_shares(crop):
    counts = torch.unique(crop[crop != 255], return_counts=True)[1]
    return len(counts), float(counts.max() / counts.sum())


def test_scale_crop_redraws_crops_that_one_class_dominates():
    from dataset import ScaleCrop
    mask = torch.zeros(1, 64, 256, dtype=torch.uint8)
    mask[:, :, 160:] = 1  # crops of 64 columns mix both classes below 75% only for 31 of the 193 positions
    image = torch.zeros(3, 64, 256, dtype=torch.uint8)
    torch.manual_seed(0)
    ruled = [crop_shares(ScaleCrop(64, ratio=(1, 1))(image, mask)[1]) for _ in range(200)]
    plain = [crop_shares(ScaleCrop(64, ratio=(1, 1), tries=1)(image, mask)[1]) for _ in range(200)]
    passes = lambda shares: sum(n > 1 and top < 0.75 for n, top in shares) / len(shares)
    assert passes(plain) < 0.3 and passes(ruled) > 0.6  # 16% by chance; 1 - 0.84^10 = 82% with ten draws


def test_scale_crop_zooms_out_and_pads_with_the_ignore_value():
    from dataset import ScaleCrop, build_transform
    from torchvision import tv_tensors
    image, mask = torch.full((3, 64, 96), 200, dtype=torch.uint8), torch.ones(1, 64, 96, dtype=torch.uint8)
    small_image, small_mask = ScaleCrop(64, ratio=(0.5, 0.5))(image, mask)  # 32 x 48, padded to 64 x 64
    assert small_mask.shape == (1, 64, 64) and int((small_mask == 255).sum()) == 64 * 64 - 32 * 48
    assert int((small_image[0] == 0).sum()) == 64 * 64 - 32 * 48
    torch.manual_seed(1)
    out_image, out_mask = build_transform("scale", 64)(tv_tensors.Image(image), tv_tensors.Mask(mask))
    assert out_image.shape == (3, 64, 64) and set(out_mask.unique().tolist()) <= {1, 255}  # labels untouched
