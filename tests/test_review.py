"""review.py on hand-made out-of-fold probabilities (no model): a swapped class, a hidden annotation, a missing object,
its outputs and its errors; tools/corrupt_labels.py and the ranking figures of tools/review_bench.py."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import square, write_set

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import corrupt_labels  # noqa: E402
import review  # noqa: E402
import review_bench  # noqa: E402
from coco import read_exclude_list  # noqa: E402
from outputs import SUSPECT_HEADER  # noqa: E402

CLASSES = ["Background", "Paper", "Metal", "Battery"]


def ann(image_id, cat, box):
    x0, y0, x1, y1 = box
    return {"image_id": image_id, "category_id": cat, "segmentation": square(*box), "area": (x1 - x0) * (y1 - y0)}


def probs_of(classes_map, sure=0.95):
    """(C, H, W) probabilities: `sure` on the class the map names, the rest spread over the others."""
    c = len(CLASSES)
    probs = np.full((c,) + classes_map.shape, (1 - sure) / (c - 1), np.float32)
    np.put_along_axis(probs, classes_map[None].astype(np.int64), sure, 0)
    return probs


def write_oof(folder, data_dir, items):
    """A predict.py-like folder: predictions.json and probs/<name>.npy for items [(file_name, class map)]."""
    folder.mkdir(parents=True)
    entries = []
    for name, classes_map in items:
        rel = "probs/" + str(Path(name).with_suffix(".npy"))
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(folder / rel, probs_of(classes_map).astype(np.float16))
        entries.append({"file_name": name, "height": classes_map.shape[0], "width": classes_map.shape[1],
                        "mask": "masks/x.png", "probs": rel})
    (folder / "predictions.json").write_text(json.dumps({"class_names": CLASSES, "data_dir": str(data_dir),
                                                         "images": entries}))
    return folder


@pytest.fixture()
def setup(tmp_path):
    """Three 40x40 images. a: Paper square labelled Metal (swap) with a small right Battery on top of it;
    b: a right Paper square and an unlabelled Metal object; c: a right Metal square. Folds: {a, b} and {c}."""
    data = tmp_path / "data"
    anns = [ann(1, 2, (0, 0, 30, 30)), ann(1, 3, (2, 2, 8, 8)),      # ids 1 (wrong: Paper), 2 (right, on top)
            ann(2, 1, (0, 0, 20, 20)),                                 # id 3
            ann(3, 2, (10, 10, 30, 30))]                               # id 4
    json_path = write_set(data, [("a.jpg", 40, 40), ("b.jpg", 40, 40), ("c.jpg", 40, 40)], anns,
                          categories=[{"id": 1, "name": "Paper"}, {"id": 2, "name": "Metal"},
                                      {"id": 3, "name": "Battery"}])
    a = np.zeros((40, 40), np.uint8)
    a[0:30, 0:30], a[2:8, 2:8] = 1, 3
    b = np.zeros((40, 40), np.uint8)
    b[0:20, 0:20], b[25:35, 25:38] = 1, 2
    c = np.zeros((40, 40), np.uint8)
    c[10:30, 10:30] = 2
    f0 = write_oof(tmp_path / "oof" / "fold0", data, [("a.jpg", a), ("b.jpg", b)])
    f1 = write_oof(tmp_path / "oof" / "fold1", data, [("c.jpg", c)])
    return data, json_path, [str(f0), str(f1)], tmp_path / "review"


def run_review(setup, *extra):
    data, json_path, folds, out = setup
    return review.run(review.parse_args(folds + ["--data-dir", str(data), "--json", "train_all.json",
                                                 "--output-dir", str(out), "--min-area", "50", *extra]))


def read_rows(path):
    return review_bench.read_csv(path)


def test_finds_the_swap_and_the_missing_object(setup):
    data, json_path, _, out = setup
    before = json_path.read_bytes()
    summary = run_review(setup, "--vis", "2")
    rows = read_rows(out / "suspects.csv")
    assert list(rows[0]) == SUSPECT_HEADER
    first = rows[0]
    assert (first["image"], first["annotation"], first["labelled"], first["suggested"]) == ("a.jpg", "1", "Metal",
                                                                                         "Paper")
    # only its visible pixels count: 30x30 less the Battery square painted on top of it
    assert int(first["area"]) == 900 - 36 and float(first["share"]) == pytest.approx(1.0)
    assert float(first["confidence"]) == pytest.approx(0.95, abs=1e-3)
    missing = [r for r in rows if r["annotation"] == "missing"]
    assert [(r["image"], r["suggested"], int(r["area"])) for r in missing] == [("b.jpg", "Metal", 130)]
    assert {r["annotation"] for r in rows} == {"1", "missing"}  # the right annotations are not suspects
    images = read_rows(out / "images.csv")
    assert [r["image"] for r in images] == ["a.jpg", "b.jpg", "c.jpg"] and float(images[2]["score"]) < 0.1
    excluded, _ = read_exclude_list(out / "exclude.txt")
    assert excluded == ["a.jpg", "b.jpg"]
    relabel = json.loads((out / "relabel.json").read_text())
    by_id = {a["id"]: a for a in relabel["annotations"]}
    assert by_id[1]["category_id"] == 1 and by_id[1]["review"]["labelled"] == "Metal"
    assert by_id[2]["category_id"] == 3 and "review" not in by_id[2]
    added = [a for a in relabel["annotations"] if a.get("review", {}).get("missing")]
    assert len(added) == 1 and added[0]["category_id"] == 2 and added[0]["area"] == 130
    assert json_path.read_bytes() == before  # the input is never touched
    assert len(json.loads((out / "missing.json").read_text())["annotations"]) == 1
    assert len(list((out / "vis").glob("*.png"))) == 2
    assert summary["relabelled"] == 1 and summary["added"] == 1


def test_relabelled_json_trains_as_a_coco_file(setup):
    from coco import load_coco, paint_mask
    data, _, _, out = setup
    run_review(setup)
    coco = load_coco(data, str(out / "relabel.json"), CLASSES)
    mask = paint_mask(coco.images[1], coco.annotations(coco.images[1]), coco.cat_to_class)
    assert (mask[25:35, 25:38] == 2).all() and mask.sum() == 400 + 2 * 130


def test_image_scores_and_threshold(setup, capsys):
    data, _, _, out = setup
    run_review(setup, "--threshold", "0.99", "--force")  # no pixel is that sure: nothing is doubtful
    assert read_rows(out / "suspects.csv") == []
    summary = run_review(setup, "--image-score", "area", "--force")
    assert summary["settings"]["exclude_above"] == review.EXCLUDE_DOUBT  # the default follows the score's scale
    scores = {r["image"]: float(r["score"]) for r in read_rows(out / "images.csv")}
    assert scores["a.jpg"] == pytest.approx((900 - 36) / 1600, abs=1e-4)
    assert scores["b.jpg"] == pytest.approx(130 / 1600, abs=1e-4)
    # own (the default): 1 - the labelled class's probability at the worst 5% of pixels; b's unlabelled object
    # is 8% of the image
    summary = run_review(setup, "--force")
    assert summary["settings"]["image_score"] == "own" and summary["settings"]["exclude_above"] == review.EXCLUDE_OWN
    assert "exclude.txt lists 2 of 3 photos" in capsys.readouterr().out  # most photos doubted: said so
    scores = {r["image"]: float(r["score"]) for r in read_rows(out / "images.csv")}
    assert scores["a.jpg"] == pytest.approx(1 - 0.05 / 3, abs=1e-3)
    assert scores["b.jpg"] == pytest.approx(1 - 0.05 / 3, abs=1e-3)
    assert scores["c.jpg"] == pytest.approx(0.05, abs=1e-3)


def test_errors_name_the_folder(setup, tmp_path):
    data, json_path, folds, out = setup
    with pytest.raises(review.ReviewError, match=
                       "train_all.json: 1 labelled image.* no out-of-fold prediction, e.g. c.jpg"):
        run_review((data, json_path, folds[:1], out))
    summary = run_review((data, json_path, folds[:1], out), "--partial")
    assert summary["images"] == 2
    with pytest.raises(review.ReviewError, match="predicted twice, in .*fold0 and .*fold0"):
        run_review((data, json_path, [folds[0], folds[0], folds[1]], tmp_path / "r2"))
    with pytest.raises(review.ReviewError, match="already holds a review"):
        run_review(setup)
    with pytest.raises(review.ReviewError, match="relabel.json must never sit beside"):
        run_review((data, json_path, folds, data))
    (Path(folds[1]) / "probs" / "c.npy").write_bytes(b"cut")
    with pytest.raises(review.ReviewError, match="c.npy: cannot read the probabilities"):
        run_review((data, json_path, folds, tmp_path / "r5"))
    for p in (Path(folds[1]) / "probs").iterdir():
        p.unlink()
    (Path(folds[1]) / "probs").rmdir()
    with pytest.raises(review.ReviewError, match="fold1: no probs/ folder"):
        run_review((data, json_path, folds, tmp_path / "r3"))
    result = subprocess.run([sys.executable, str(ROOT / "review.py"), folds[0], "--data-dir", str(data),
                             "--output-dir", str(tmp_path / "r4")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_corrupt_labels_is_seeded_and_truthful(setup, tmp_path):
    data, json_path, _, _ = setup
    raw = json.loads(json_path.read_text())
    raw["annotations"] = [dict(ann(1 + i % 3, 1 + i % 3, (0, 0, 20, 20)), id=i + 1) for i in range(300)]
    rates = {"swap": 0.2, "delete": 0.1, "grow": 0.1, "shrink": 0.1}
    noisy, truth = corrupt_labels.corrupt(raw, rates, 0.1, seed=3)
    again, _ = corrupt_labels.corrupt(raw, rates, 0.1, seed=3)
    assert noisy == again and raw["annotations"][0]["category_id"] == 1  # seeded; the input untouched
    counts = {k: sum(r["kind"] == k for r in truth) for k in rates}
    for k, rate in rates.items():
        assert abs(counts[k] - 300 * rate) < 300 * rate * 0.5
    by_id = {a["id"]: a for a in noisy["annotations"]}
    original = {a["id"]: a for a in raw["annotations"]}
    for r in truth:
        if r["kind"] == "delete":
            assert r["annotation"] not in by_id and r["segmentation"] == original[r["annotation"]]["segmentation"]
        elif r["kind"] == "swap":
            assert by_id[r["annotation"]]["category_id"] != original[r["annotation"]]["category_id"]
        else:
            grown = by_id[r["annotation"]]["area"]
            assert (grown > 400) == (r["kind"] == "grow") and grown != 400
    untouched = set(original) - {r["annotation"] for r in truth}
    assert all(by_id[i] == original[i] for i in untouched)


def test_corrupt_labels_touches_only_the_drawn_share_of_photos(setup):
    _, json_path, _, _ = setup
    raw = json.loads(json_path.read_text())
    raw["images"] = [dict(raw["images"][0], id=i, file_name=f"p{i}.png") for i in range(40)]
    raw["annotations"] = [dict(ann(i % 40, 1 + i % 3, (0, 0, 20, 20)), id=i + 1) for i in range(400)]
    rates = {"swap": 0.5, "delete": 0.0, "grow": 0.0, "shrink": 0.0}
    _, every = corrupt_labels.corrupt(raw, rates, 0.1, seed=3)
    _, some = corrupt_labels.corrupt(raw, rates, 0.1, seed=3, photos=0.25)
    touched = {r["image"] for r in some}
    assert len(touched) == 10  # each of the 10 drawn photos holds 10 annotations, half of them swapped
    # the same annotation draws as with every photo, only those outside the drawn photos are spared
    assert [r for r in every if r["image"] in touched] == some
    with pytest.raises(ValueError, match="--photos"):
        corrupt_labels.corrupt(raw, rates, 0.1, seed=3, photos=1.5)


def test_corrupt_labels_writes_noisy_train_folds(setup, tmp_path):
    data, json_path, _, _ = setup
    folds = tmp_path / "folds"
    folds.mkdir()
    raw = json.loads(json_path.read_text())
    for i, (train, val) in enumerate([([1, 2], [3]), ([3], [1, 2])]):
        for name, ids in (("train", train), ("val", val)):
            part = dict(raw, images=[m for m in raw["images"] if m["id"] in ids],
                        annotations=[a for a in raw["annotations"] if a["image_id"] in ids])
            (folds / f"{name}_fold{i}.json").write_text(json.dumps(part))
    corrupt_labels.main(["--data-dir", str(data), "--output", str(tmp_path / "noisy.json"), "--truth",
                         str(tmp_path / "truth.json"), "--swap", "1", "--delete", "0", "--grow", "0",
                         "--folds-dir", str(folds), "--output-folds-dir", str(tmp_path / "noisy_folds")])
    for i in range(2):
        val = json.loads((tmp_path / "noisy_folds" / f"val_fold{i}.json").read_text())
        assert val == json.loads((folds / f"val_fold{i}.json").read_text())
        train = json.loads((tmp_path / "noisy_folds" / f"train_fold{i}.json").read_text())
        clean = json.loads((folds / f"train_fold{i}.json").read_text())
        assert [m["id"] for m in train["images"]] == [m["id"] for m in clean["images"]]
        assert all(a["category_id"] != b["category_id"] for a, b in zip(train["annotations"], clean["annotations"]))
    with pytest.raises(SystemExit, match="is the input JSON"):
        corrupt_labels.main(["--data-dir", str(data), "--output", str(json_path), "--truth", str(tmp_path / "t")])


def test_ranking_figures():
    assert review_bench.average_precision([0.9, 0.8, 0.1], [True, False, True]) == pytest.approx((1 + 2 / 3) / 2)
    assert review_bench.auroc([0.9, 0.8, 0.1], [True, False, True]) == pytest.approx(0.5)
    assert review_bench.auroc([3, 2, 1], [True, True, False]) == 1.0
    assert review_bench.auroc([1, 1, 1, 1], [True, False, True, False]) == 0.5


def test_bench_scores_the_review_against_the_truth(setup, tmp_path):
    data, json_path, folds, out = setup
    run_review(setup, "--min-share", "0")
    truth = {"corrupted": [{"annotation": 1, "image": "a.jpg", "kind": "swap", "category": "Paper"},
                           {"annotation": 9, "image": "b.jpg", "kind": "delete", "category": "Metal",
                            "segmentation": square(25, 25, 38, 35)}]}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    figures = review_bench.main(["--data-dir", str(data), "--json", "train_all.json", "--truth",
                                 str(tmp_path / "truth.json"), "--review-dir", str(out), "--oof-dirs", *folds])
    assert figures["annotations"]["swap"] == {"K": 1, "precision_at_K": 1.0, "recall_at_2K": 1.0,
                                              "recall_at_2K_all": 1.0, "suggestion_right": 1.0}
    assert figures["missing"]["precision_at_K"] == 1.0
    assert figures["images"]["review"]["AP"] == 1.0 and figures["images"]["loss (per_image.csv)"]["AP"] == 1.0


def test_bench_also_scores_the_swaps_large_enough_to_judge():
    # two swaps, one under review.py's --min-area: the ranking can reach one of them, and is scored on it as well
    truth = [{"annotation": 1, "kind": "swap", "category": "Paper"},
             {"annotation": 2, "kind": "swap", "category": "Metal"}]
    suspects = [{"annotation": "1", "suggested": "Paper"}, {"annotation": "7", "suggested": "Glass"}]
    swap = review_bench.annotation_figures(suspects, truth, judged={1, 7})["swap"]
    assert (swap["K"], swap["precision_at_K"], swap["K_judged"], swap["precision_at_K_judged"]) == (2, 0.5, 1, 1.0)
    assert "K_judged" not in review_bench.annotation_figures(suspects, truth, judged={1, 2, 7})["swap"]
