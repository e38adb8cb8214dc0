import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coco import load_coco
from conftest import square, write_set
from folds import class_holders, fold_table, image_groups, random_folds, stratified_group_kfold

REPO = Path(__file__).resolve().parent.parent


def imbalanced_counts(n=200, seed=0):
    """Per-image pixel counts: a dominant background, common classes, and two rare classes in few images."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((n, 6), np.int64)
    counts[:, 0] = rng.integers(50_000, 60_000, n)
    counts[:, 1] = rng.integers(0, 20_000, n)
    counts[:, 2] = rng.integers(0, 5_000, n) * (rng.random(n) < 0.5)
    counts[:, 3] = rng.integers(100, 3_000, n) * (rng.random(n) < 0.2)
    rare = rng.choice(n, 8, replace=False)
    counts[rare, 4] = rng.integers(50, 2_000, 8)       # 8 images: must reach all 5 folds
    counts[rare[:5], 5] = rng.integers(10, 100, 5)      # exactly k images
    return counts


def class_deviations(counts, folds, k):
    """Per class: the largest relative deviation over folds of its share of val pixels from the whole set's."""
    whole = counts.sum(0) / counts.sum()
    shares = np.array([counts[folds == f].sum(0) / counts[folds == f].sum() for f in range(k)])
    return (np.abs(shares - whole) / whole).max(0)


def test_every_image_in_exactly_one_val_fold_and_deterministic():
    counts = imbalanced_counts()
    groups = [f"img{i}" for i in range(len(counts))]
    folds = stratified_group_kfold(counts, groups, k=5, seed=7)
    assert folds.shape == (len(counts),) and set(folds.tolist()) == set(range(5))
    assert np.array_equal(folds, stratified_group_kfold(counts, groups, k=5, seed=7))
    assert np.bincount(folds).min() >= 35  # sizes roughly equal (200 / 5 = 40)


def test_balances_better_than_a_seeded_random_split():
    counts = imbalanced_counts()
    groups = [f"img{i}" for i in range(len(counts))]
    ours = class_deviations(counts, stratified_group_kfold(counts, groups, 5, seed=1), 5)
    randoms = np.array([class_deviations(counts, random_folds(groups, 5, seed=s), 5) for s in range(5)])
    assert ours.mean() < 0.5 * randoms.mean(1).min(), (ours, randoms)
    # class 5 sits in exactly k images of unequal size, one per fold: no split can even it out
    assert (ours[:5] < randoms[:, :5].min(0)).all(), (ours, randoms)
    # and the table's figure agrees, once classes held by fewer than k groups are left out
    table_worst = fold_table(counts, stratified_group_kfold(counts, groups, 5, seed=1), [f"c{i}" for i in range(6)],
                             5, class_holders(counts, groups))[1]
    assert np.isclose(table_worst, ours.max())


def test_rare_classes_reach_every_val_fold():
    counts = imbalanced_counts()
    groups = [f"img{i}" for i in range(len(counts))]
    for seed in range(5):
        folds = stratified_group_kfold(counts, groups, 5, seed=seed)
        for c in (4, 5):
            assert {int(f) for f in folds[counts[:, c] > 0]} == set(range(5)), (seed, c)


def test_group_pattern_keeps_each_group_in_one_fold():
    names = [f"images/vid_{v:06d}_frame{f:07d}.jpg" for v in range(12) for f in range(5)]
    groups = image_groups(names, r"vid_[0-9]+")
    assert len(set(groups)) == 12
    counts = np.random.default_rng(0).integers(0, 1000, (len(names), 4))
    folds = stratified_group_kfold(counts, groups, k=4, seed=0)
    for g in set(groups):
        assert len({folds[i] for i in range(len(names)) if groups[i] == g}) == 1
    assert image_groups(["a.jpg", "b.jpg"]) == ["a.jpg", "b.jpg"]  # default: every image its own group


def test_absent_class_gives_no_nan_in_the_table():
    counts = imbalanced_counts(50)
    counts[:, 5] = 0
    folds = stratified_group_kfold(counts, list(range(50)), 5)
    table, worst, missing = fold_table(counts, folds, [f"c{i}" for i in range(6)], 5,
                                       class_holders(counts, list(range(50))))
    assert "nan" not in table.lower() and np.isfinite(worst)


@pytest.mark.slow
def test_command_writes_valid_partitioning_coco_files(demo_dir, tmp_path):
    out = subprocess.run([sys.executable, "folds.py", "--data-dir", str(demo_dir), "--output-dir", str(tmp_path),
                          "--k", "3", "--compare-random"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "largest relative deviation" in out.stdout
    all_ids = {img["id"] for img in json.loads((Path(demo_dir) / "train_all.json").read_text())["images"]}
    seen = []
    for f in range(3):
        train = json.loads((tmp_path / f"train_fold{f}.json").read_text())
        val = json.loads((tmp_path / f"val_fold{f}.json").read_text())
        train_ids, val_ids = {i["id"] for i in train["images"]}, {i["id"] for i in val["images"]}
        assert not train_ids & val_ids and train_ids | val_ids == all_ids
        assert {a["image_id"] for a in val["annotations"]} <= val_ids
        assert all((Path(demo_dir) / i["file_name"]).is_file() for i in val["images"])  # still root-relative
        assert val["categories"] == train["categories"]
        seen += list(val_ids)
    assert sorted(seen) == sorted(all_ids)


def test_too_few_groups_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="3 groups cannot fill 5 folds"):
        stratified_group_kfold(np.ones((3, 2)), ["a", "b", "c"], k=5)


def test_skip_bad_keeps_dropped_annotations_out_of_the_fold_files(tmp_path):
    images = [(f"{i}.jpg", 8, 8) for i in range(6)]
    anns = [{"image_id": i + 1, "category_id": 1, "segmentation": square(0, 0, 4, 4), "area": 16} for i in range(6)]
    anns.append({"image_id": 2, "category_id": 1, "segmentation": [[0, 0, 3, 3]], "area": 1})  # 2 points: bad
    anns.append({"image_id": 3, "category_id": 99, "segmentation": square(0, 0, 2, 2), "area": 4})  # unknown class
    write_set(tmp_path, images, anns)
    out = subprocess.run([sys.executable, "folds.py", "--data-dir", str(tmp_path), "--output-dir",
                          str(tmp_path / "folds"), "--k", "3", "--skip-bad"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "skipping 2 bad entries" in out.stderr
    total = 0
    for f in range(3):
        for part in ("train", "val"):
            fold = load_coco(tmp_path, tmp_path / "folds" / f"{part}_fold{f}.json")  # no --skip-bad needed now
            total += sum(len(a) for a in fold.anns_by_image.values()) if part == "val" else 0
    assert total == 6  # the six good annotations, each in exactly one val fold


@pytest.mark.slow
def test_excluded_images_are_in_no_fold_and_no_training_batch(demo_dir, tmp_path):
    import torch

    import train
    from test_train import tiny_args
    names = [img["file_name"] for img in json.loads((Path(demo_dir) / "train_all.json").read_text())["images"]]
    listed = tmp_path / "doubtful.txt"
    listed.write_text(f"# looked at the overlays\n{names[0]}\n{names[3]}  # two objects, one label\n\nnot/there.jpg\n")
    out = subprocess.run([sys.executable, "folds.py", "--data-dir", str(demo_dir), "--output-dir", str(tmp_path),
                          "--k", "3", "--exclude", str(listed)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "excluded 2 of" in out.stdout and "(3 listed in" in out.stdout
    for f in range(3):
        for part in ("train", "val"):
            fold = json.loads((tmp_path / f"{part}_fold{f}.json").read_text())
            assert not {names[0], names[3]} & {i["file_name"] for i in fold["images"]}
    run = tmp_path / "run"
    train.main(tiny_args(demo_dir, run, "--epochs", "1", "--val-json", "none", "--exclude", str(listed)))
    log = (run / "log.jsonl").read_text()
    config = json.loads((run / "config.json").read_text())
    assert config["excluded"]["count"] == 3 and len(config["excluded"]["sha1"]) == 40
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["args"]["excluded"]["dropped"] == 2
    # 10 of the 12 demo images remain: 2 steps of 4 (the last partial batch is dropped)
    assert ckpt["scheduler"]["last_epoch"] == len(names[2:]) // 4 and '"step": 2' in log
