"""--pseudo-weight W: the pseudo-labelled images' loss weighs W, the labelled ones' 1; and a student started from the
teacher's checkpoint (--weights) begins at the teacher's weights."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import train
from losses import build_loss, weighted_loss
from test_train import load, tiny_args


def test_weighted_loss_scales_only_the_weighted_images():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, requires_grad=True)
    masks = torch.randint(0, 3, (4, 8, 8))
    for spec in ("ce", "focal+dice"):
        loss_fn = build_loss(spec)
        got = weighted_loss(loss_fn, logits, masks, torch.tensor([1.0, 1.0, 0.5, 0.5]))
        expected = (2 * loss_fn(logits[:2], masks[:2]) + 0.5 * 2 * loss_fn(logits[2:], masks[2:])) / 4
        assert torch.isclose(got, expected), spec
    assert torch.equal(weighted_loss(loss_fn, logits, masks, None), loss_fn(logits, masks))
    ce = build_loss("ce")
    weighted_loss(ce, logits, masks, torch.tensor([1.0, 1.0, 0.0, 0.0])).backward()
    assert logits.grad[2:].abs().sum() == 0 and logits.grad[:2].abs().sum() > 0  # weight 0 teaches nothing
    ignored = masks.clone()
    ignored[2:] = 255  # pseudo masks with no confident pixel: they add nothing and the loss stays finite
    got = weighted_loss(ce, logits, ignored, torch.tensor([1.0, 1.0, 0.5, 0.5]))
    assert torch.isclose(got, 2 * ce(logits[:2], masks[:2]) / 4)


@pytest.fixture()
def pseudo_dir(demo_dir, tmp_path):
    """A predict.py --pseudo-like folder over the demo's unlabelled photos: random class ids, some ignored."""
    test = json.loads((demo_dir / "test.json").read_text())
    out = tmp_path / "pseudo"
    rng = np.random.default_rng(0)
    images = []
    for img in test["images"]:
        mask = rng.integers(0, 11, (img["height"], img["width"])).astype(np.uint8)
        mask[: img["height"] // 3] = 255
        name = f"pseudo_masks/{img['id']}.png"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(out / name)
        images.append(dict(img, mask_file=name))
    categories = json.loads((demo_dir / "train_all.json").read_text())["categories"]
    (out / "pseudo.json").write_text(json.dumps({"images": images, "categories": categories}))
    return out, len(images)


def test_training_weighs_each_pseudo_image(demo_dir, tmp_path, pseudo_dir, monkeypatch):
    folder, count = pseudo_dir
    seen, loss = [], train.training_loss
    monkeypatch.setattr(train, "training_loss", lambda out, masks, fn, aux, weight=None:
                        seen.append(weight) or loss(out, masks, fn, aux, weight))
    train.main(tiny_args(demo_dir, tmp_path / "run", "--epochs", "1", "--val-json", "none", "--pseudo",
                         str(folder), "--pseudo-weight", "0.5", "--print-freq", "1"))
    weights = torch.cat(seen)
    assert set(weights.tolist()) == {0.5, 1.0}
    assert (weights == 0.5).sum() <= count and (weights == 1.0).sum() <= 12 and len(weights) >= 12  # drop_last
    seen.clear()
    train.main(tiny_args(demo_dir, tmp_path / "plain", "--epochs", "1", "--val-json", "none", "--pseudo",
                         str(folder)))
    assert seen and all(w is None for w in seen)  # weight 1: the plain batch loss, as before
    with pytest.raises(SystemExit):
        train.main(tiny_args(demo_dir, tmp_path / "bad", "--pseudo-weight", "0.5"))


def test_student_starts_from_the_teacher(demo_dir, tmp_path, pseudo_dir, capsys):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    train.main(tiny_args(demo_dir, teacher, "--epochs", "1", "--val-json", "none"))
    capsys.readouterr()
    # lr 0: the student's parameters stay where they started, so they must equal the teacher's
    train.main(tiny_args(demo_dir, student, "--epochs", "1", "--val-json", "none", "--lr", "0", "--weights",
                         str(teacher / "last.pt"), "--pseudo", str(pseudo_dir[0])))
    assert "last.pt: loaded" in capsys.readouterr().out
    taught, learnt = load(teacher / "last.pt")["model"], load(student / "last.pt")["model"]
    params = [k for k in taught if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params and all(torch.equal(taught[k], learnt[k]) for k in params)
    fresh = tmp_path / "fresh"
    train.main(tiny_args(demo_dir, fresh, "--epochs", "1", "--val-json", "none", "--lr", "0"))
    assert not all(torch.equal(taught[k], load(fresh / "last.pt")["model"][k]) for k in params)


def test_pseudo_photos_that_are_validation_photos_are_named_transductive():
    from types import SimpleNamespace
    from dataset import pseudo_overlap
    photos = lambda *names: SimpleNamespace(images=[{"file_name": n} for n in names])
    pseudo, train = photos("a.jpg", "b.jpg", "c.jpg"), photos("c.jpg", "d.jpg")
    line = pseudo_overlap(pseudo, train, ["a.jpg", "b.jpg", "e.jpg"])
    assert "1 of them are labelled training photos" in line and "2 of them are validation photos: transductive" in line
    assert pseudo_overlap(photos("x.jpg"), train, ["a.jpg"]) == ""
