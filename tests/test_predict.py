import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import coco
import ensemble
import inference
import outputs
import predict
import train
from checkpoint import model_from_checkpoint, read_checkpoint
from ensemble import hard_vote
from metrics import per_image_iou
from model import ModelError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dirs(demo_dir, tmp_path_factory):
    """Two tiny trained checkpoints on the demo set (1 epoch each, different seeds)."""
    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", "1"), ("b", "2")):
        train.main(["--data-dir", str(demo_dir), "--train-json", "train_all.json", "--val-json", "none",
                    "--arch", "unet", "--backbone", "resnet18", "--no-pretrained", "--img-size", "48", "-b", "4",
                    "--no-channels-last", "--workers", "0", "--epochs", "1", "--seed", seed,
                    "--output-dir", str(root / name), "--mask-cache", str(root / "cache"), "--print-freq", "100"])
    return root


def run_predict(demo_dir, ckpt, out, *extra):
    predict.main(["--ckpt", str(ckpt), "--data-dir", str(demo_dir), "--output-dir", str(out), "--workers", "0",
                  *extra])


def read_csv(path):
    csv.field_size_limit(1 << 30)
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.slow
def test_submission_csv_format(demo_dir, run_dirs, tmp_path):
    out = tmp_path / "pred"
    run_predict(demo_dir, run_dirs / "a" / "best.pt", out, "--json", "test.json", "--tta")
    rows = read_csv(out / "submission.csv")
    assert rows[0] == ["image_id", "PredictionString"]
    test = json.loads((Path(demo_dir) / "test.json").read_text())
    assert [r[0] for r in rows[1:]] == [img["file_name"] for img in test["images"]]  # JSON order
    for _, prediction in rows[1:]:
        ids = prediction.split(" ")
        assert len(ids) == 256 * 256
        assert all(0 <= int(v) <= 10 for v in set(ids))
    manifest = json.loads((out / "predictions.json").read_text())
    first = manifest["images"][0]
    mask = coco.read_mask(out / first["mask"])
    assert mask.shape == (first["height"], first["width"])  # original size
    assert len({(e["height"], e["width"]) for e in manifest["images"]}) > 1  # the demo mixes sizes
    for entry in manifest["images"]:  # probabilities come back at each image's own size
        probs = np.load(out / entry["probs"])
        assert probs.dtype == np.float16 and probs.shape == (11, entry["height"], entry["width"])
        assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)
        assert (probs.argmax(0) == coco.read_mask(out / entry["mask"])).mean() > 0.99


def test_prob_size_caps_the_longer_side_keeping_aspect():
    assert predict.prob_shape(270, 480, 0) == (270, 480)
    assert predict.prob_shape(270, 480, 1000) == (270, 480)  # never enlarged
    assert predict.prob_shape(270, 480, 240) == (135, 240)
    assert predict.prob_shape(360, 480, 256) == (192, 256)
    assert predict.prob_shape(512, 512, 256) == (256, 256)


def test_csv_row_is_nearest_resized_row_major():
    mask = np.zeros((4, 6), np.uint8)
    mask[:, 3:] = 2
    mask[0, 0] = 1
    name, prediction = outputs.csv_row("x.jpg", mask, 2)
    assert name == "x.jpg" and prediction == "1 2 0 2"


def test_flip_tta_changes_nothing_for_a_flip_equivariant_network():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 1)).eval()
    images = torch.randn(3, 3, 16, 16)
    every_flip = inference.tta_flips(True, "any")
    plain = inference.predict_probs(net, images, 16)
    assert torch.allclose(plain, inference.predict_probs(net, images, 16, every_flip), atol=1e-6)
    # and a network that is not flip-equivariant is changed by it: TTA really ran
    net3 = torch.nn.Conv2d(3, 5, 3, padding=1).eval()
    assert not torch.allclose(inference.predict_probs(net3, images, 16),
                              inference.predict_probs(net3, images, 16, every_flip))
    with torch.no_grad():  # the mean of the views, each flipped back
        plain3, h3 = net3(images).softmax(1), net3(images.flip(-1)).softmax(1).flip(-1)
        v3 = net3(images.flip(-2)).softmax(1).flip(-2)
    assert torch.allclose(inference.predict_probs(net3, images, 16, every_flip, channels_last=True),
                          (plain3 + h3 + v3) / 3, atol=1e-6)
    upright = inference.tta_flips(True, "upright")  # a model trained upright never saw vertical flips
    assert torch.allclose(inference.predict_probs(net3, images, 16, upright), (plain3 + h3) / 2, atol=1e-6)
    assert inference.tta_flips(False, "any") == [()]
    multi = inference.predict_probs(net, images, 16, every_flip, scales=(0.5, 1.0, 1.5))
    assert multi.shape == (3, 5, 16, 16) and torch.allclose(multi.sum(1), torch.ones(3, 16, 16), atol=1e-5)


def test_eval_of_a_perfect_prediction_gives_miou_one(demo_dir, tmp_path):
    demo = coco.load_coco(demo_dir, "train_all.json")
    results = [(img["file_name"], coco.load_mask(demo, i), coco.load_mask(demo, i)) for i, img in enumerate(demo.images[:3])]
    out = tmp_path / "perfect"
    out.mkdir()
    metrics = outputs.write_results(out, demo.class_names, results, demo_dir, 256, 0, True)
    assert metrics["mIoU"] == 1.0
    per_image = read_csv(out / "per_image.csv")
    assert per_image[0][:3] == ["image_id", "mIoU", "loss"] and all(float(r[1]) == 1.0 for r in per_image[1:])
    assert all(r[2] == "" for r in per_image[1:])  # masks alone: no probabilities, no loss
    probs = torch.tensor([[[0.9, 0.2]], [[0.1, 0.8]]])
    assert predict.image_loss(probs, torch.tensor([[0, 255]])) == pytest.approx(-math.log(0.9))


@pytest.mark.slow
def test_eval_vis_worst_first_and_pseudo_labels(demo_dir, run_dirs, tmp_path):
    out = tmp_path / "eval"
    run_predict(demo_dir, run_dirs / "a" / "best.pt", out, "--json", "train_all.json", "--eval", "--vis", "3")
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["mIoU"] <= 1 and len(metrics["confusion"]) == 11
    rows = read_csv(out / "per_image.csv")[1:]
    assert [float(r[1]) for r in rows] == sorted(float(r[1]) for r in rows)  # worst first
    assert all(float(r[2]) > 0 for r in rows)  # each image's loss, beside its IoU
    worst = rows[:3]
    vis = sorted(p.name for p in (out / "vis").glob("*.png"))
    assert [v.split("_", 1)[1] for v in vis] == [Path(r[0]).stem + ".png" for r in worst]

    pseudo = tmp_path / "pseudo"
    run_predict(demo_dir, run_dirs / "a" / "best.pt", pseudo, "--json", "test.json", "--pseudo", "--no-probs",
                "--pseudo-threshold", "0.5")
    assert not (pseudo / "probs").exists()
    pseudo_masks = [np.array(Image.open(p)) for p in sorted((pseudo / "pseudo_masks").rglob("*.png"))]
    masks = [np.array(Image.open(p)) for p in sorted((pseudo / "masks").rglob("*.png"))]
    assert len(pseudo_masks) == 4 and any((p == 255).any() for p in pseudo_masks)  # a 1-epoch model is unsure
    for confident, full in zip(pseudo_masks, masks):  # kept pixels are the prediction's own
        assert np.array_equal(confident[confident != 255], full[confident != 255])
    train.main(["--data-dir", str(demo_dir), "--train-json", "train_all.json", "--val-json", "none",
                "--pseudo", str(pseudo), "--arch", "unet", "--backbone", "resnet18", "--no-pretrained",
                "--img-size", "48", "-b", "4", "--workers", "0", "--epochs", "1", "--output-dir",
                str(tmp_path / "retrain"), "--mask-cache", "none", "--print-freq", "100"])
    log = (tmp_path / "retrain" / "log.jsonl").read_text()
    assert json.loads(log.splitlines()[-1])["epoch"] == 0
    from dataset import SegmentationDataset
    pseudo_set = coco.load_coco(demo_dir, pseudo / "pseudo.json",
                                class_names=coco.load_coco(demo_dir, "train_all.json").class_names)
    assert pseudo_set.labeled and len(pseudo_set) == 4
    image, mask, _ = SegmentationDataset(pseudo_set, 48)[0]
    assert mask.shape == (48, 48)


def test_pseudo_masks_ignore_exactly_the_unconfident_pixels():
    probs = torch.tensor([[[0.9, 0.5], [0.2, 0.34]],
                          [[0.1, 0.5], [0.7, 0.33]],
                          [[0.0, 0.0], [0.1, 0.33]]])
    assert outputs.pseudo_mask(probs, 0.0).tolist() == [[0, 0], [1, 0]]  # every pixel: the argmax
    assert outputs.pseudo_mask(probs, 0.6).tolist() == [[0, 255], [1, 255]]
    assert outputs.pseudo_mask(probs, 0.95).tolist() == [[255, 255], [255, 255]]


@pytest.mark.slow
def test_output_dir_is_never_overwritten_silently(demo_dir, run_dirs, tmp_path):
    out = tmp_path / "once"
    run_predict(demo_dir, run_dirs / "a" / "best.pt", out, "--json", "test.json", "--no-probs")
    with pytest.raises(SystemExit, match="already holds outputs; use --force"):
        run_predict(demo_dir, run_dirs / "a" / "best.pt", out, "--json", "test.json")
    run_predict(demo_dir, run_dirs / "a" / "best.pt", out, "--json", "test.json", "--force")
    assert (out / "probs").is_dir()


@pytest.mark.slow
def test_checkpoint_of_another_shape_is_a_clear_error(run_dirs, tmp_path):
    ckpt = torch.load(run_dirs / "a" / "best.pt", weights_only=True)
    ckpt["class_names"] = ckpt["class_names"][:5]
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="do not fit unet/resnet18 with 5 classes"):
        model_from_checkpoint(read_checkpoint(tmp_path / "bad.pt"), tmp_path / "bad.pt")
    torch.save({"model": ckpt["model"]}, tmp_path / "weights_only.pt")
    with pytest.raises(SystemExit, match="not a train.py checkpoint .lacks args, class_names"):
        predict.main(["--ckpt", str(tmp_path / "weights_only.pt"), "--output-dir", str(tmp_path / "p")])


class Pickled:
    """An object torch.load(weights_only=True) refuses to unpickle: stands for code hidden in a file."""


def test_a_checkpoint_holding_objects_is_refused_in_plain_words(tmp_path):
    torch.save({"model": {}, "args": Pickled(), "class_names": ["Background"]}, tmp_path / "unsafe.pt")
    with pytest.raises(SystemExit) as info:
        predict.main(["--ckpt", str(tmp_path / "unsafe.pt"), "--output-dir", str(tmp_path / "p")])
    message = str(info.value)
    assert "unsafe.pt: refused as unsafe" in message and "objects other than tensors" in message
    assert "weights_only" in message and "Check the documentation" not in message


def test_per_image_iou_on_crafted_masks():
    target = np.array([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [0, 0, 255, 255],
                       [0, 0, 0, 0]])
    pred = np.array([[0, 0, 1, 3],
                     [0, 1, 1, 3],
                     [0, 0, 3, 1],  # predictions on ignored pixels count for nothing
                     [0, 0, 0, 0]])
    ious, mean = per_image_iou(pred, target, 4)
    # class 0: 9 of 10 hit, no false positive -> 9/10; class 1: 2 of 4 hit, 1 false positive -> 2/5;
    # class 2 in neither -> NaN, left out of the mean; class 3 predicted only -> IoU 0, counted
    assert ious[0] == pytest.approx(0.9) and ious[1] == pytest.approx(0.4)
    assert np.isnan(ious[2]) and ious[3] == 0
    assert mean == pytest.approx((0.9 + 0.4 + 0) / 3)


def test_hard_voting_on_crafted_masks():
    a = np.array([[1, 1], [2, 0]], np.uint8)
    b = np.array([[1, 3], [3, 0]], np.uint8)
    c = np.array([[2, 3], [4, 5]], np.uint8)
    assert hard_vote([a, b, c], [1, 1, 1], 6).tolist() == [[1, 3], [2, 0]]  # [1,0]: 3-way tie -> first input
    assert hard_vote([a, b, c], [1, 1, 3], 6).tolist() == [[2, 3], [4, 5]]  # weights
    tie = np.zeros((6, 2, 2))
    tie[4] = 1.0  # probabilities favour class 4 among the tied
    assert hard_vote([a, b, c], [1, 1, 1], 6, tie)[1, 0] == 4


@pytest.mark.slow
def test_soft_and_hard_voting_against_votes_counted_here(demo_dir, run_dirs, tmp_path):
    pa, pb = tmp_path / "pa", tmp_path / "pb"
    run_predict(demo_dir, run_dirs / "a" / "best.pt", pa, "--json", "test.json")
    run_predict(demo_dir, run_dirs / "b" / "best.pt", pb, "--json", "test.json")
    out = tmp_path / "ens"
    ensemble.main([str(pa), str(pb), str(out), "--output-dir", str(out), "--weights", "3", "1"])  # out is skipped
    manifest = json.loads((pa / "predictions.json").read_text())
    for entry in manifest["images"]:  # probabilities are saved at each image's size: average them here
        a = np.load(pa / entry["probs"]).astype(np.float32)
        b = np.load(pb / entry["probs"]).astype(np.float32)
        expected = ((3 * a + b) / 4).argmax(0)
        assert np.array_equal(coco.read_mask(out / entry["mask"]), expected)
    assert len(read_csv(out / "submission.csv")) == 1 + len(manifest["images"])

    # hard vote of three bare CSVs, counted here pixel by pixel: a majority wins, a three-way tie goes to the first
    csvs = [pa / "submission.csv", pb / "submission.csv", out / "submission.csv"]
    hard = tmp_path / "hard"
    ensemble.main([str(c) for c in csvs] + ["--output-dir", str(hard)])
    rows = [read_csv(c)[1:] for c in csvs]
    voted = read_csv(hard / "submission.csv")[1:]
    assert [r[0] for r in voted] == [e["file_name"] for e in manifest["images"]]
    disagreements = 0
    for row, (ra, rb, rc) in zip(voted, zip(*rows)):
        a, b, c = (np.array(r[1].split(), int) for r in (ra, rb, rc))
        expected = np.where(b == c, b, a)  # b and c agree against a: theirs; otherwise a agrees with one, or a wins
        assert np.array_equal(np.array(row[1].split(), int), expected)
        disagreements += int((a != b).sum())
    assert disagreements > 0  # the two runs differ, so the vote decided something


@pytest.mark.slow
def test_mismatched_inputs_are_rejected(demo_dir, run_dirs, tmp_path):
    pa, pb = tmp_path / "pa", tmp_path / "pb"
    run_predict(demo_dir, run_dirs / "a" / "best.pt", pa, "--json", "test.json", "--no-probs")
    run_predict(demo_dir, run_dirs / "b" / "best.pt", pb, "--json", "train_all.json", "--no-probs")
    with pytest.raises(SystemExit, match="cover different images; differing image ids: images/demo_0000.jpg"):
        ensemble.main([str(pa), str(pb), "--output-dir", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match="soft voting needs probs"):
        ensemble.main([str(pa), str(pa), "--mode", "soft", "--output-dir", str(tmp_path / "e2")])


def test_voting_loads_no_network_code():
    probe = "import sys, ensemble; print(sorted(m for m in sys.modules if m.startswith(('torchvision', 'model', 'train', 'predict'))))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


STAGES = ["data", "folds", "train", "predict", "ensemble", "cv", "review", "export", "plots", "bench"]
MODULES = sorted(p.stem for p in REPO.glob("*.py"))


def test_every_stage_script_is_listed():
    assert set(STAGES) <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_no_script_imports_a_stage(name):
    """What several stages share lives in a module they import; no file (stage or module) imports a stage."""
    import ast
    tree = ast.parse((REPO / f"{name}.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & (set(STAGES) - {name})
