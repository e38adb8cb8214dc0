"""Mask2Former: shapes at odd sizes, gradients, the empty-mask guard, the set loss (matching, fp32 under autocast,
a perfect prediction), and the pipeline's stages on a tiny checkpoint."""
import json

import pytest
import torch

import ensemble
import losses
import predict
import train
from losses import MaskSetLoss, class_masks
from mask2former import MaskDecoder
from model import build_model
from test_train import tiny_args

SMALL = {"queries": 8, "dec_layers": 3}


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("pixel_decoder", ["fpn", "deformable"])
def test_shapes_at_odd_sizes_and_eval_probabilities(backbone, pixel_decoder):
    model = build_model("mask2former", backbone, 5, pixel_decoder=pixel_decoder, **SMALL)
    out = model.train()(torch.randn(2, 3, 75, 101))
    assert out["logits"].shape == (2, 8, 6) and out["masks"].shape[:2] == (2, 8)  # K + no-object
    assert out["masks"].shape[2:] == (19, 26)  # stride 4 of 75 x 101
    assert len(out["aux"]) == 3  # the start and layers 1-2; the last layer's prediction is the main one
    with torch.no_grad():
        scores = model.eval()(torch.randn(1, 3, 75, 101))
    assert scores.shape == (1, 5, 75, 101)
    assert torch.allclose(scores.softmax(1).sum(1), torch.ones(1, 75, 101), atol=1e-5)


def test_a_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = build_model("mask2former", "resnet18", 4, **SMALL).train()
    loss_fn = MaskSetLoss(4, points=300)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    for _ in range(2):  # the deformable attention starts with zero weights: its inputs learn from the second step
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
              or p.grad.abs().sum() == 0]
    assert not silent
    assert set(loss_fn.parts) == {"class", "mask", "dice"}


def test_a_query_whose_mask_is_empty_may_look_everywhere():
    decoder = MaskDecoder(3, dim=32, queries=4, layers=3, heads=4, ffn=64, mask_dim=32)
    with torch.no_grad():
        decoder.mask_head[-1].weight.zero_()
        decoder.mask_head[-1].bias.fill_(1.0)
    mask_features = -torch.ones(1, 32, 16, 16)  # every mask logit -32: every query's mask empty
    _, masks, blocked = decoder.predict(decoder.query_feat.weight[None], mask_features, (4, 4))
    assert (masks.sigmoid() < 0.5).all() and not blocked.any()
    levels = [torch.randn(1, 32, s, s) for s in (4, 8, 16)]
    for logits, masks in decoder(levels, mask_features):
        assert torch.isfinite(logits).all() and torch.isfinite(masks).all()


def perfect_prediction(target, num_classes, queries=6):
    """Query k predicts class k (confidently) with the exact mask where the image holds class k; every other query
    predicts no object."""
    b, h, w = target.shape
    logits = torch.full((b, queries, num_classes + 1), -10.0)
    logits[:, :, -1] = 10.0
    masks = torch.full((b, queries, h, w), -10.0)
    for i in range(b):
        for k in target[i].unique().tolist():
            if k < num_classes:
                logits[i, k, k], logits[i, k, -1] = 10.0, -10.0
                masks[i, k][target[i] == k] = 10.0
    return {"logits": logits, "masks": masks, "aux": []}


def test_the_set_loss_matches_whatever_the_query_order_and_prefers_the_right_answer():
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, 8:24, 8:24] = 2
    target[1, :4] = 255  # ignored: in no mask
    loss_fn = MaskSetLoss(3, points=500)

    def loss(out):
        torch.manual_seed(0)  # the same random points for each
        return float(loss_fn(out, target))
    perfect = perfect_prediction(target, 3)
    reordered = {"logits": perfect["logits"][:, [5, 2, 4, 0, 3, 1]], "masks": perfect["masks"][:, [5, 2, 4, 0, 3, 1]],
                 "aux": []}
    assert loss(reordered) == pytest.approx(loss(perfect), rel=1e-5)  # matching, not query order, decides
    assert loss_fn.parts["class"] < 1e-3  # the classes are right; the mask parts are the masks' sharp borders
    swapped = perfect_prediction(target, 3)
    swapped["logits"] = swapped["logits"][:, [2, 1, 0, 3, 4, 5]]  # the right masks under the wrong classes
    noise = {"logits": torch.randn(2, 6, 4), "masks": torch.randn(2, 6, 32, 32), "aux": []}
    assert loss(perfect) < 0.3 * loss(swapped) and loss(perfect) < 0.3 * loss(noise)
    labels, masks, valid = class_masks(target)[1]
    assert labels.tolist() == [0, 2] and masks[:, :4].sum() == 0 and valid[:4].sum() == 0


def test_matching_and_losses_run_in_fp32_under_autocast(monkeypatch):
    seen = []
    real = losses.pairwise_mask_costs
    monkeypatch.setattr(losses, "pairwise_mask_costs", lambda p, t, w: seen.append(p.dtype) or real(p, t, w))
    model = build_model("mask2former", "resnet18", 3, pixel_decoder="fpn", **SMALL).train()
    x, y = torch.randn(1, 3, 64, 64), torch.randint(0, 3, (1, 64, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out["logits"].dtype == torch.bfloat16
        loss = MaskSetLoss(3, points=200)(out, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and set(seen) == {torch.float32}


@pytest.mark.slow
def test_a_tiny_mask2former_goes_through_predict_ensemble_and_export(demo_dir, tmp_path):
    import export
    out = tmp_path / "run"
    train.main(tiny_args(demo_dir, out, "--arch", "mask2former", "--pixel-decoder", "fpn", "--queries", "8",
                         "--dec-layers", "3", "--epochs", "1", "--img-size", "64"))
    assert json.loads((out / "config.json").read_text())["queries"] == 8
    for name, extra in (("a", ["--tta"]), ("b", [])):
        predict.main(["--ckpt", str(out / "last.pt"), "--data-dir", str(demo_dir), "--json", "train_all.json",
                      "--eval", "--output-dir", str(tmp_path / name), "--workers", "0", *extra])
    validated = json.loads((out / "best_metrics.json").read_text())["mIoU"]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["mIoU"] == pytest.approx(validated, abs=1e-6)
    ensemble.main([str(tmp_path / "a"), str(tmp_path / "b"), "--eval", "--json", "train_all.json",
                   "--data-dir", str(demo_dir), "--output-dir", str(tmp_path / "vote")])
    assert (tmp_path / "vote" / "submission.csv").is_file()
    import review
    review.main([str(tmp_path / "b"), "--data-dir", str(demo_dir), "--json", "train_all.json",
                 "--output-dir", str(tmp_path / "review")])
    assert (tmp_path / "review" / "images.csv").read_text().count("\n") > len(list(demo_dir.glob("images/*")))
    export.main(["--ckpt", str(out / "last.pt"), "-o", str(tmp_path / "model.pt2")])  # checks its logits itself
    predict.main(["--ckpt", str(tmp_path / "model.pt2"), "--data-dir", str(demo_dir), "--json", "train_all.json",
                  "--eval", "--output-dir", str(tmp_path / "exported"), "--workers", "0"])
    scored = json.loads((tmp_path / "exported" / "metrics.json").read_text())["mIoU"]
    assert scored == pytest.approx(validated, abs=1e-3)


def test_the_reference_recipe_leaves_queries_and_level_embeddings_undecayed():
    from optim import param_groups
    model = build_model("mask2former", "resnet18", 3, **SMALL)
    groups = param_groups(model, 1e-4, 0.05, encoder_lr_mult=0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("decoder.query_feat.weight", "decoder.query_pos.weight", "decoder.level_embed.weight",
                 "pixel_decoder.level_embed"):
        assert id(named[name]) not in decayed, name
    assert id(named["decoder.class_head.weight"]) in decayed
    encoder_lrs = {g["lr"] for g in groups for p in g["params"] if any(p is q for q in model.encoder.parameters())}
    assert len(encoder_lrs) == 1 and encoder_lrs.pop() == pytest.approx(1e-5)
