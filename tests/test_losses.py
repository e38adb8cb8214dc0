import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import (CrossEntropyLoss, DiceLoss, FocalLoss, WEIGHT_METHODS, build_loss, class_weights,
                    parse_loss_spec)


def batch(seed=0, n=2, c=4, h=9, w=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g), torch.randint(0, c, (n, h, w), generator=g)


def test_focal_with_gamma_zero_equals_cross_entropy():
    logits, target = batch()
    assert torch.allclose(FocalLoss(gamma=0)(logits, target), F.cross_entropy(logits, target), atol=1e-6)
    weight = torch.tensor([0.2, 1.0, 3.0, 0.5])
    assert torch.allclose(FocalLoss(gamma=0, alpha=weight)(logits, target),
                          F.cross_entropy(logits, target, weight=weight), atol=1e-6)
    assert FocalLoss(gamma=2)(logits, target) < FocalLoss(gamma=0)(logits, target)


def test_dice_of_perfect_prediction_is_near_zero_and_of_wrong_one_positive():
    _, target = batch()
    perfect = F.one_hot(target, 4).permute(0, 3, 1, 2).float() * 100
    assert DiceLoss()(perfect, target) < 1e-3
    wrong = F.one_hot((target + 1) % 4, 4).permute(0, 3, 1, 2).float() * 100
    assert DiceLoss()(wrong, target) > 0.9


def test_dice_ignores_classes_absent_from_target_and_prediction():
    # a 6-class head where classes 4 and 5 are neither in the target nor predicted: same loss as 4 classes
    logits, target = batch(c=4)
    padded = torch.cat([logits, torch.full_like(logits[:, :2], -50.0)], 1)
    assert torch.allclose(DiceLoss()(padded, target), DiceLoss()(logits, target), atol=1e-4)


@pytest.mark.parametrize("spec", ["ce", "focal", "dice", "ce:0.75,dice:0.25"])
def test_ignored_pixels_do_not_change_the_loss(spec):
    logits, target = batch()
    target[:, :3] = 255
    loss = build_loss(spec)
    before = loss(logits, target)
    changed = logits.clone()
    changed[:, :, :3] = torch.randn_like(changed[:, :, :3]) * 10
    assert torch.allclose(before, loss(changed, target), atol=1e-6)
    all_ignored = torch.full_like(target, 255)
    assert loss(logits.requires_grad_(), all_ignored).item() == 0.0


def test_loss_spec_parsing_and_combination():
    assert parse_loss_spec("ce:0.75,dice:0.25") == [("ce", 0.75), ("dice", 0.25)]
    assert parse_loss_spec("focal+dice") == [("focal", 1.0), ("dice", 1.0)]
    with pytest.raises(ValueError, match="unknown loss 'bce'"):
        parse_loss_spec("bce")
    logits, target = batch()
    combined = build_loss("ce:0.75,dice:0.25")(logits, target)
    expected = 0.75 * CrossEntropyLoss()(logits, target) + 0.25 * DiceLoss()(logits, target)
    assert torch.allclose(combined, expected)


def test_class_weight_formulas_on_known_counts():
    counts = [700, 200, 100]
    f = np.array(counts) / 1000
    inverse = 1 / f
    assert np.allclose(class_weights(counts, "inverse"), inverse / inverse.mean())
    log = 1 / np.log(1.02 + f)
    assert np.allclose(class_weights(counts, "log"), log / log.mean(), atol=1e-6)
    median = 0.2 / f
    assert np.allclose(class_weights(counts, "median"), median / median.mean())
    assert math.isclose(float(class_weights(counts, "log").mean()), 1.0, rel_tol=1e-6)


def test_median_frequency_uses_images_holding_the_class():
    per_image = np.array([[90, 10, 0], [100, 0, 0], [50, 0, 50]])  # class 2 only in image 3
    freq = np.array([240 / 300, 10 / 100, 50 / 100])
    raw = np.median(freq) / freq
    assert np.allclose(class_weights(per_image, "median"), raw / raw.mean())


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_zero_count_class_gets_a_finite_weight(method):
    weights = class_weights([1000, 10, 0, 1], method)
    assert torch.isfinite(weights).all() and weights[2] == weights[[1, 3]].max()
    logits, target = batch()
    assert torch.isfinite(build_loss("ce", class_weight=weights)(logits, target))
    assert torch.equal(class_weights([0, 0, 0], method), torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_are_finite_under_autocast(dtype):
    logits, target = batch(c=11)
    conv = torch.nn.Conv2d(11, 11, 1)
    with torch.autocast("cpu", dtype=dtype):
        out = conv(logits * 30)  # large logits: overflow in half precision if computed there
        for spec in ("ce", "focal", "dice", "focal+dice"):
            value = build_loss(spec, class_weight=torch.rand(11) + 0.1)(out, target)
            assert value.dtype == torch.float32 and torch.isfinite(value)
            value.backward(retain_graph=True)
    assert torch.isfinite(conv.weight.grad).all()


def test_class_weights_by_name_and_a_cap():
    from losses import run_class_weights
    names = ["Background", "Paper", "Battery"]
    counts = [9000, 900, 9]
    assert run_class_weights("Battery=3,Paper=1.5", counts, names).tolist() == [1.0, 1.5, 3.0]
    with pytest.raises(ValueError, match="'Batery=3': expected a method .* class list .Background, Paper, Battery"):
        run_class_weights("Batery=3", counts, names)
    with pytest.raises(ValueError, match="'x' is not a number"):
        run_class_weights("Paper=x", counts, names)
    free = run_class_weights("inverse", counts, names)
    bounded = run_class_weights("inverse", counts, names, cap=20)
    assert free.max() / free.min() > 900 and bounded.max() / bounded.min() == pytest.approx(20)
    assert torch.equal(bounded[:2], free[:2])  # only the weights above the cap change
