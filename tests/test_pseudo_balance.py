"""Class-balanced pseudo labels (ensemble.py --pseudo --pseudo-balance P): every predicted class keeps its P% most
confident pixels, so a rare, confusable class keeps as large a share as a frequent, easy one."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ensemble
from outputs import CONFIDENCE_BINS, add_confidences, balanced_thresholds, pseudo_mask

CLASSES = ["Background", "Paper", "Glass"]


def hand_made_probs(rng):
    """(3, 40, 40): Paper on the left 30 columns, sure (0.95-0.99); Glass on the right 10, unsure (0.40-0.60)."""
    top = np.empty((40, 40))
    top[:, :30] = rng.uniform(0.95, 0.99, (40, 30))
    top[:, 30:] = rng.uniform(0.40, 0.60, (40, 10))
    winner = np.ones((40, 40), np.int64)
    winner[:, 30:] = 2
    probs = np.empty((3, 40, 40))
    for c in range(3):
        probs[c] = np.where(winner == c, top, (1 - top) / 2)
    return torch.from_numpy(probs).float(), winner


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
def test_each_class_keeps_the_same_share(share):
    probs, winner = hand_made_probs(np.random.default_rng(0))
    histogram = torch.zeros(3, CONFIDENCE_BINS, dtype=torch.int64)
    add_confidences(probs, histogram)
    assert histogram.sum(1).tolist() == [0, 1200, 400]
    thresholds = balanced_thresholds(histogram, share)
    assert thresholds[0] == 1.0  # never predicted
    mask = pseudo_mask(probs, thresholds).numpy()
    for c, total in ((1, 1200), (2, 400)):
        kept = ((mask == c) & (winner == c)).sum() / total
        assert share <= kept <= share + 0.02, (c, kept)
    # one global threshold instead starves the unsure class
    global_mask = pseudo_mask(probs, 0.9).numpy()
    assert (global_mask == 1).mean() > 0.7 and (global_mask == 2).sum() == 0


def test_ensemble_writes_balanced_pseudo_labels(tmp_path, capsys):
    rng = np.random.default_rng(1)
    folder, images = tmp_path / "member", []
    (folder / "probs").mkdir(parents=True)
    for name in ("a", "b"):
        probs, _ = hand_made_probs(rng)
        np.save(folder / "probs" / f"{name}.npy", probs.numpy().astype(np.float16))
        images.append({"file_name": f"{name}.jpg", "height": 40, "width": 40, "mask": f"masks/{name}.png",
                       "probs": f"probs/{name}.npy"})
    (folder / "predictions.json").write_text(json.dumps({"class_names": CLASSES, "images": images}))
    out = tmp_path / "pseudo"
    ensemble.main([str(folder), "--pseudo", "--pseudo-balance", "50", "--output-dir", str(out)])
    pseudo = json.loads((out / "pseudo.json").read_text())
    assert set(pseudo["pseudo_threshold"]) == set(CLASSES)
    assert 0.4 < pseudo["pseudo_threshold"]["Glass"] < 0.6 < 0.95 < pseudo["pseudo_threshold"]["Paper"]
    kept = [np.array(Image.open(out / image["mask_file"])) for image in pseudo["images"]]
    paper = sum(((m[:, :30] == 1).sum() for m in kept)) / 2400
    glass = sum(((m[:, 30:] == 2).sum() for m in kept)) / 800
    assert 0.5 <= paper <= 0.52 and 0.5 <= glass <= 0.52
    assert "class-balanced" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="in percent"):
        ensemble.main([str(folder), "--pseudo", "--pseudo-balance", "0", "--output-dir", str(tmp_path / "x")])


def test_predict_writes_balanced_pseudo_labels(demo_dir, tmp_path, capsys):
    import predict
    import train
    from test_train import tiny_args
    train.main(tiny_args(demo_dir, tmp_path / "run", "--epochs", "1", "--val-json", "none"))
    out = tmp_path / "pseudo"
    args = ["--ckpt", str(tmp_path / "run" / "last.pt"), "--data-dir", str(demo_dir), "--json", "test.json",
            "--workers", "0", "--pseudo", "--pseudo-balance", "40", "--output-dir", str(out)]
    predict.main(args)
    pseudo = json.loads((out / "pseudo.json").read_text())
    thresholds = pseudo["pseudo_threshold"]
    assert isinstance(thresholds, dict) and len(set(thresholds.values())) > 1
    predicted, kept = {}, {}
    for image in pseudo["images"]:
        full = np.array(Image.open(out / "masks" / (Path(image["file_name"]).with_suffix(".png"))))
        confident = np.array(Image.open(out / image["mask_file"]))
        # kept pixels are the prediction's own, but for near-ties the float16 probs/ order differently (a 1-epoch
        # network has many: with one torch thread 0.4% of the kept pixels, with two under 0.1%)
        assert (confident[confident != 255] == full[confident != 255]).mean() > 0.99
        for c in np.unique(full):
            predicted[c] = predicted.get(c, 0) + (full == c).sum()
            kept[c] = kept.get(c, 0) + (confident == c).sum()
    for c, total in predicted.items():
        if total > 500:  # each class keeps its 40% surest pixels (up to one histogram bin of ties)
            assert 0.38 <= kept[c] / total <= 0.45, (c, kept[c] / total)
    assert "class-balanced" not in capsys.readouterr().err
    with pytest.raises(SystemExit, match="reads probs/: drop --no-probs"):
        predict.main(args[:-2] + ["--no-probs", "--output-dir", str(tmp_path / "x")])
    default = [a for a in args if a not in ("--pseudo-balance", "40")]
    with pytest.raises(SystemExit, match="reads probs/: drop --no-probs"):  # the default is class-balanced too
        predict.main(default[:-2] + ["--no-probs", "--output-dir", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="give --pseudo too"):
        predict.main([a for a in args if a != "--pseudo"][:-2] + ["--output-dir", str(tmp_path / "z")])
