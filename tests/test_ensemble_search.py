"""ensemble.py --search-weights: weights chosen on labelled images that no member trained on."""
import json

import numpy as np
import pytest
from PIL import Image

import ensemble
from conftest import CATEGORIES, square, write_set

CLASSES = ["Background"] + [c["name"] for c in CATEGORIES]


def member(folder, labels, right, confidence):
    """A predict.py output dir whose probabilities put `confidence` on the true class where right, else on another
    (the rest spread evenly)."""
    images = []
    for name, mask in labels.items():
        guess = mask if right else (mask + 1) % len(CLASSES)
        probs = np.eye(len(CLASSES))[guess].transpose(2, 0, 1) * confidence + (1 - confidence) / len(CLASSES)
        (folder / "probs").mkdir(parents=True, exist_ok=True)
        np.save(folder / "probs" / f"{name[:-4]}.npy", probs.astype(np.float16))
        images.append({"file_name": name, "height": mask.shape[0], "width": mask.shape[1],
                       "mask": f"masks/{name[:-4]}.png", "probs": f"probs/{name[:-4]}.npy"})
    (folder / "predictions.json").write_text(json.dumps({"class_names": CLASSES, "images": images}))
    return folder


def read_pseudo(out, index):
    """An ensemble output dir's pseudo.json, and the pseudo mask of its image `index`."""
    pseudo = json.loads((out / "pseudo.json").read_text())
    return pseudo, np.array(Image.open(out / pseudo["images"][index]["mask_file"]))


@pytest.fixture
def labelled(tmp_path):
    """Two 16x16 images, each with one Paper square, and their masks."""
    write_set(tmp_path, [("a.jpg", 16, 16), ("b.jpg", 16, 16)],
              [{"image_id": 1, "category_id": 1, "segmentation": square(2, 2, 10, 10), "area": 64},
               {"image_id": 2, "category_id": 1, "segmentation": square(4, 4, 14, 12), "area": 80}], name="val.json")
    masks = {"a.jpg": np.zeros((16, 16), np.int64), "b.jpg": np.zeros((16, 16), np.int64)}
    masks["a.jpg"][2:10, 2:10] = 1
    masks["b.jpg"][4:12, 4:14] = 1
    return tmp_path, masks


def test_the_search_finds_the_member_that_is_right(labelled, tmp_path, capsys):
    root, masks = labelled
    # the wrong member is the more confident: with equal weights it wins every pixel
    good, bad = member(tmp_path / "good", masks, True, 0.6), member(tmp_path / "bad", masks, False, 0.9)
    out = tmp_path / "ens"
    ensemble.main([str(bad), str(good), "--search-weights", "--eval", "--data-dir", str(root), "--json", "val.json",
                   "--output-dir", str(out), "--mask-cache", "none"])
    chosen = json.loads((out / "weights.json").read_text())
    assert chosen["mIoU"] == 1.0 and chosen["weights"][1] > chosen["weights"][0]
    assert json.loads((out / "metrics.json").read_text())["mIoU"] == 1.0  # the outputs use the chosen weights
    said = capsys.readouterr().out
    assert "| 0 | 1 | 100.00 |" in said and "(equal weights: 0.00)" in said and len(chosen["tried"]) >= 6
    # the same weights applied to another set of predictions (here the same members) by --weights-from
    ensemble.main([str(bad), str(good), "--weights-from", str(out / "weights.json"), "--output-dir",
                   str(tmp_path / "test_ens")])
    assert json.loads((tmp_path / "test_ens" / "predictions.json").read_text())["images"]


def test_the_search_reads_each_image_once_per_step_not_once_per_weighting(labelled, tmp_path, monkeypatch):
    # an out-of-fold set of the competition's size is thousands of images: a pass per weighting tried is hours
    root, masks = labelled
    inputs = [member(tmp_path / n, masks, n != "c", 0.6 + 0.1 * i) for i, n in enumerate("abc")]
    reads, load = [], ensemble.load_probs
    monkeypatch.setattr(ensemble, "load_probs", lambda *a: reads.append(a[1]) or load(*a))
    out = tmp_path / "ens"
    ensemble.main([*map(str, inputs), "--search-weights", "--eval", "--data-dir", str(root), "--json", "val.json",
                   "--output-dir", str(out), "--mask-cache", "none"])
    tried = json.loads((out / "weights.json").read_text())["tried"]
    during_search = len(reads) - len(masks) * len(inputs)  # the chosen weights' own outputs read each image once
    assert len(tried) > 7 and during_search <= (1 + 2 * len(inputs)) * len(masks) * len(inputs)


def test_the_search_refuses_inputs_that_miss_labelled_images(labelled, tmp_path):
    root, masks = labelled
    partial = {"a.jpg": masks["a.jpg"]}
    a, b = member(tmp_path / "a", partial, True, 0.9), member(tmp_path / "b", partial, False, 0.9)
    with pytest.raises(SystemExit, match="do not cover 1 labelled images of val.json .b.jpg."):
        ensemble.main([str(a), str(b), "--search-weights", "--eval", "--data-dir", str(root), "--json", "val.json",
                       "--output-dir", str(tmp_path / "ens"), "--mask-cache", "none"])


def test_ensemble_pseudo_labels_keep_only_confident_averaged_pixels(labelled, tmp_path):
    root, masks = labelled
    a, b = member(tmp_path / "a", masks, True, 0.9), member(tmp_path / "b", masks, True, 0.5)
    for threshold, kept in (("0.6", True), ("0.8", False)):  # averaged top probability: (0.925 + 0.625) / 2
        out = tmp_path / f"pseudo_{threshold}"
        ensemble.main([str(a), str(b), "--pseudo", "--pseudo-threshold", threshold, "--output-dir", str(out)])
        pseudo, mask = read_pseudo(out, 0)
        assert pseudo["pseudo_threshold"] == float(threshold) and len(pseudo["images"]) == 2
        assert np.array_equal(mask, masks["a.jpg"]) if kept else (mask == 255).all()


def test_min_region_cleans_the_voted_masks(labelled, tmp_path):
    root, masks = labelled
    specked = {name: mask.copy() for name, mask in masks.items()}
    specked["a.jpg"][14, 14] = 2  # a one-pixel speck of Metal on the background
    a, b = member(tmp_path / "a", specked, True, 0.9), member(tmp_path / "b", specked, True, 0.9)
    for min_region, out in ((0, tmp_path / "raw"), (4, tmp_path / "clean")):
        ensemble.main([str(a), str(b), "--min-region", str(min_region), "--output-dir", str(out)])
    assert np.array(Image.open(tmp_path / "raw" / "masks" / "a.png"))[14, 14] == 2
    assert np.array_equal(np.array(Image.open(tmp_path / "clean" / "masks" / "a.png")), masks["a.jpg"])


def test_one_input_is_rethresholded_for_pseudo_labels_but_not_voted_alone(labelled, tmp_path):
    root, masks = labelled
    a = member(tmp_path / "a", masks, True, 0.7)  # top probability 0.7 + 0.3 / 11
    for threshold, kept in (("0.5", True), ("0.9", False)):
        out = tmp_path / f"pseudo_{threshold}"
        ensemble.main([str(a), "--pseudo", "--pseudo-threshold", threshold, "--output-dir", str(out)])
        mask = read_pseudo(out, 1)[1]
        assert np.array_equal(mask, masks["b.jpg"]) if kept else (mask == 255).all()
    with pytest.raises(SystemExit, match="need at least two inputs"):
        ensemble.main([str(a), "--output-dir", str(tmp_path / "alone")])


def test_pseudo_labels_by_default_keep_half_of_each_class(labelled, tmp_path):
    root, masks = labelled
    member_dir = member(tmp_path / "m", masks, True, 0.9)
    ensemble.main([str(member_dir), "--pseudo", "--output-dir", str(tmp_path / "default")])
    ensemble.main([str(member_dir), "--pseudo", "--pseudo-balance", "50", "--output-dir", str(tmp_path / "half")])
    default, half = json.loads((tmp_path / "default" / "pseudo.json").read_text()), \
        json.loads((tmp_path / "half" / "pseudo.json").read_text())
    assert isinstance(default["pseudo_threshold"], dict) and default["pseudo_threshold"] == half["pseudo_threshold"]
    for i in range(2):
        assert np.array_equal(read_pseudo(tmp_path / "default", i)[1], read_pseudo(tmp_path / "half", i)[1])
    with pytest.raises(SystemExit, match="not both"):
        ensemble.main([str(member_dir), "--pseudo", "--pseudo-threshold", "0.9", "--pseudo-balance", "50",
                       "--output-dir", str(tmp_path / "both")])
    for flag, value in (("--pseudo-balance", "80"), ("--pseudo-threshold", "0.9")):  # as predict.py: never ignored
        with pytest.raises(SystemExit, match="give --pseudo too"):
            ensemble.main([str(member_dir), flag, value, "--output-dir", str(tmp_path / "no_pseudo")])
        assert not (tmp_path / "no_pseudo").exists()
