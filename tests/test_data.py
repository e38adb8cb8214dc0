import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

import coco as coco_module
import data
import demo
import dataset
import outputs
from conftest import square, write_set
from coco import DataError, MaskCache, load_coco, paint_mask, pixel_counts
from dataset import SegmentationDataset

REPO = Path(__file__).resolve().parent.parent


def test_class_list_is_background_plus_categories_in_id_order(tmp_path):
    cats = [{"id": 7, "name": "Metal"}, {"id": 2, "name": "Paper"}]
    write_set(tmp_path, [("a.jpg", 8, 8)], [], categories=cats)
    assert load_coco(tmp_path, "train_all.json").class_names == ["Background", "Paper", "Metal"]


def test_competition_classes_keep_their_colours_and_every_class_gets_its_own():
    colors = coco_module.palette(["Background", "Clothing", "Sky"])
    assert colors[1] == coco_module.COMPETITION_COLORS[10]
    assert colors[0] == (0, 0, 0)
    assert len(set(colors)) == 3
    # the 11 competition colours lie far apart (RGB distance), so an overlay's classes can be told apart
    comp = coco_module.palette(coco_module.COMPETITION_CLASSES)
    assert min(math.dist(a, b) for i, a in enumerate(comp) for b in comp[i + 1:]) > 90
    many = coco_module.palette([f"class {i}" for i in range(40)])  # past the fixed list: still all distinct
    assert len(set(many)) == 40


def test_small_objects_lie_on_top_whatever_the_json_order(tmp_path):
    anns = [{"image_id": 1, "category_id": 3, "segmentation": square(4, 4, 8, 8), "area": 16},   # small first
            {"image_id": 1, "category_id": 1, "segmentation": square(0, 0, 16, 16), "area": 256}]
    write_set(tmp_path, [("a.jpg", 16, 16)], anns)
    coco = load_coco(tmp_path, "train_all.json")
    mask = paint_mask(coco.images[0], coco.annotations(coco.images[0]), coco.cat_to_class)
    assert mask.dtype == np.uint8 and mask.shape == (16, 16)
    assert (mask[4:8, 4:8] == 3).all()
    assert (mask[0:4, :] == 1).all() and (mask[8:, :] == 1).all()


def test_rle_compressed_and_uncompressed_iscrowd(tmp_path):
    bitmap = np.zeros((10, 12), np.uint8)
    bitmap[2:5, 3:9] = 1
    compressed = mask_utils.encode(np.asfortranarray(bitmap))
    other = np.zeros((10, 12), np.uint8)
    other[6:9, 0:4] = 1
    anns = [{"image_id": 1, "category_id": 2, "area": 18,
             "segmentation": {"size": [10, 12], "counts": compressed["counts"].decode()}},
            {"image_id": 1, "category_id": 1, "area": 12, "iscrowd": 1,
             "segmentation": demo.uncompressed_rle(other.astype(bool))}]
    write_set(tmp_path, [("a.jpg", 12, 10)], anns)
    coco = load_coco(tmp_path, "train_all.json")
    mask = paint_mask(coco.images[0], coco.annotations(coco.images[0]), coco.cat_to_class)
    expected = bitmap * 2 + other * 1
    assert np.array_equal(mask, expected)


def test_other_jsons_map_categories_by_name(tmp_path):
    write_set(tmp_path, [("a.jpg", 8, 8)], [])
    train = load_coco(tmp_path, "train_all.json")
    renumbered = [{"id": 30, "name": "Battery"}, {"id": 10, "name": "Paper"}]
    write_set(tmp_path, [("a.jpg", 8, 8)], [{"image_id": 1, "category_id": 30, "segmentation": square(0, 0, 4, 4),
                                             "area": 16}], categories=renumbered, name="val.json")
    val = load_coco(tmp_path, "val.json", class_names=train.class_names)
    assert val.cat_to_class == {30: 3, 10: 1}


def test_unknown_category_name_lists_known_names(tmp_path):
    write_set(tmp_path, [("a.jpg", 8, 8)], [])
    train = load_coco(tmp_path, "train_all.json")
    write_set(tmp_path, [("a.jpg", 8, 8)], [], categories=[{"id": 1, "name": "Cardboard"}], name="val.json")
    with pytest.raises(DataError, match=r"val\.json.*'Cardboard'.*Background, Paper, Metal, Battery"):
        load_coco(tmp_path, "val.json", class_names=train.class_names)


def _bad_case(tmp_path, case):
    images = [("a.jpg", 8, 8), ("b.jpg", 8, 8)]
    anns = [{"image_id": 1, "category_id": 1, "segmentation": square(0, 0, 4, 4), "area": 16}]
    path = write_set(tmp_path, images, anns)
    raw = json.loads(path.read_text())
    if case == "missing image":
        (tmp_path / "b.jpg").unlink()
    elif case == "undecodable image":
        (tmp_path / "b.jpg").write_bytes(b"this is not a jpeg")
    elif case == "size mismatch":
        raw["images"][1]["width"] = 9
    elif case == "short polygon":
        raw["annotations"].append({"id": 9, "image_id": 2, "category_id": 1, "segmentation": [[0, 0, 3, 3]]})
    elif case == "unknown image id":
        raw["annotations"].append({"id": 9, "image_id": 42, "category_id": 1, "segmentation": square(0, 0, 2, 2)})
    elif case == "duplicate image id":
        raw["images"].append({"id": 2, "file_name": "a.jpg", "width": 8, "height": 8})
    elif case == "unknown category":
        raw["annotations"].append({"id": 9, "image_id": 2, "category_id": 7, "segmentation": square(0, 0, 2, 2)})
    path.write_text(json.dumps(raw))
    return path


BAD_CASES = {"missing image": r"b\.jpg.*not found", "undecodable image": r"b\.jpg.*cannot be read",
             "size mismatch": r"b\.jpg.*8x8 but the JSON says 9x8", "short polygon": r"annotation 9.*fewer than 3",
             "unknown image id": r"annotation 9.*unknown image id 42", "duplicate image id": r"duplicate image id 2",
             "unknown category": r"annotation 9 \(image id 2\) has unknown category id 7"}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_a_clear_error_or_skipped(tmp_path, case):
    path = _bad_case(tmp_path, case)
    with pytest.raises(DataError, match=BAD_CASES[case]) as info:
        load_coco(tmp_path, "train_all.json")
    assert str(path) in str(info.value)
    with pytest.warns(UserWarning, match="skipping 1 bad entries"):
        coco = load_coco(tmp_path, "train_all.json", skip_bad=True)
    assert len(coco.images) == (1 if case in ("missing image", "undecodable image", "size mismatch") else 2)


def test_missing_and_broken_json_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.json: file not found"):
        load_coco(tmp_path, "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        load_coco(tmp_path, "broken.json")


def test_image_broken_after_loading_names_the_file_mid_epoch(tmp_path):
    write_set(tmp_path, [("a.jpg", 8, 8)], [])
    coco = load_coco(tmp_path, "train_all.json")
    (tmp_path / "a.jpg").write_bytes(b"truncated")
    with pytest.raises(DataError, match=r"a\.jpg cannot be decoded"):
        SegmentationDataset(coco, img_size=8)[0]


def test_unexpected_failure_in_a_sample_names_it(tmp_path, monkeypatch):
    write_set(tmp_path, [("a.jpg", 8, 8)], [{"image_id": 1, "category_id": 1, "segmentation": square(0, 0, 4, 4),
                                             "area": 16}])
    ds = SegmentationDataset(load_coco(tmp_path, "train_all.json"), img_size=8)
    monkeypatch.setattr(coco_module, "paint_mask", lambda *a: 1 / 0)
    with pytest.raises(DataError, match=r"a\.jpg \(id 1\) of .*train_all.json: ZeroDivisionError"):
        ds[0]
    ds.skip_bad = True
    with pytest.raises(DataError, match="every sample failed"), pytest.warns(UserWarning):
        ds[0]  # a set where every sample is bad cannot be skipped forever


def test_dataset_items_and_non_square_images_batch(demo_dir):
    coco = load_coco(demo_dir, "train_all.json")
    assert len({(i["width"], i["height"]) for i in coco.images}) > 1
    ds = SegmentationDataset(coco, img_size=64, aug="basic")
    image, mask, meta = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert mask.dtype == torch.int64 and mask.shape == (64, 64)
    assert set(meta) == {"file_name", "image_id", "height", "width"}
    images, masks, metas = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 64, 64) and masks.shape == (4, 64, 64)
    assert len(set(zip(metas["width"].tolist(), metas["height"].tolist()))) > 1

    test = SegmentationDataset(load_coco(demo_dir, "test.json", class_names=coco.class_names), img_size=64)
    image, meta = test[0]
    assert image.shape == (3, 64, 64) and meta["file_name"].startswith("test_images/")


@pytest.mark.parametrize("preset", ["basic", "strong"])
def test_augmentation_keeps_image_and_mask_aligned(preset):
    # the image encodes the class of each pixel in its red channel: any misalignment shows as disagreement
    torch.manual_seed(0)
    mask = torch.zeros(96, 128, dtype=torch.uint8)
    mask[10:50, 20:70] = 1
    mask[40:90, 60:120] = 2
    mask[0:30, 90:128] = 3
    image = torch.zeros(3, 96, 128, dtype=torch.uint8)
    image[0] = mask * 80
    transform = dataset.build_transform(preset, 64)
    for _ in range(20):
        out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert out_mask.shape == (64, 64) and out_mask.dtype == torch.uint8
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3}
        if preset == "basic":  # photometric changes in 'strong' blur the code, geometry is what is checked
            decoded = (out_image[0].float() / 80).round()
            assert (decoded == out_mask.float()).float().mean() > 0.9


def test_explicit_flip_and_crop_move_image_and_mask_together():
    from torchvision.transforms import v2
    mask = torch.zeros(8, 8, dtype=torch.uint8)
    mask[0, 0] = 1  # a marked corner pixel
    image = (mask * 200).expand(3, 8, 8).clone()
    ops = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.RandomVerticalFlip(p=1.0), dataset.RandomRot90()])
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out_mask = ops(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert torch.equal(out_image[0] == 200, out_mask == 1)
    torch.manual_seed(0)
    out_image, out_mask = v2.RandomCrop(4)(tv_tensors.Image(image), tv_tensors.Mask(mask))
    assert torch.equal(out_image[0] == 200, out_mask == 1)


def test_random_erasing_touches_the_image_only(demo_dir):
    from torchvision.transforms import v2
    ds = SegmentationDataset(load_coco(demo_dir, "train_all.json"), img_size=64, aug="strong")
    assert ds.erase is not None
    ds.erase = v2.RandomErasing(p=1.0, scale=(0.3, 0.3), value=0)
    torch.manual_seed(3)
    erased_image, erased_mask, _ = ds[0]
    ds.erase = None
    torch.manual_seed(3)
    image, mask, _ = ds[0]
    assert torch.equal(erased_mask, mask)
    assert (erased_image != image).any(dim=0).float().mean() > 0.2


def test_mask_cache_decodes_once_and_follows_changes(tmp_path, monkeypatch):
    anns = [{"image_id": 1, "category_id": 2, "segmentation": square(1, 1, 5, 5), "area": 16}]
    write_set(tmp_path, [("a.jpg", 8, 8)], anns)
    coco = load_coco(tmp_path, "train_all.json")
    img = coco.images[0]
    cache = MaskCache(tmp_path / "cache")
    first = cache.get(img, coco.annotations(img), coco.cat_to_class)
    monkeypatch.setattr(coco_module, "paint_mask", lambda *a: pytest.fail("painted again despite the cache"))
    assert np.array_equal(cache.get(img, coco.annotations(img), coco.cat_to_class), first)
    changed = [dict(anns[0], segmentation=square(2, 2, 6, 6))]
    assert cache.key(img, changed, coco.cat_to_class) != cache.key(img, coco.annotations(img), coco.cat_to_class)
    assert cache.key(img, coco.annotations(img), {2: 1}) != cache.key(img, coco.annotations(img), coco.cat_to_class)


def test_dataset_with_cache_equals_without(demo_dir, tmp_path):
    coco = load_coco(demo_dir, "train_all.json")
    plain = SegmentationDataset(coco, img_size=64)
    cached = SegmentationDataset(coco, img_size=64, mask_cache=tmp_path / "c")
    for i in range(3):
        cached[i]
        assert torch.equal(plain[i][1], cached[i][1])
    assert len(list((tmp_path / "c").rglob("*.png"))) == 3


def test_copy_paste_adds_rare_class_pixels(tmp_path):
    # image 1 holds a Battery (the rarest class); image 2 has none
    anns = [{"image_id": 1, "category_id": 3, "segmentation": square(2, 2, 8, 8), "area": 36},
            {"image_id": 1, "category_id": 1, "segmentation": square(10, 10, 30, 30), "area": 400},
            {"image_id": 2, "category_id": 2, "segmentation": square(0, 0, 20, 20), "area": 400},
            {"image_id": 2, "category_id": 1, "segmentation": square(20, 20, 32, 32), "area": 144}]
    write_set(tmp_path, [("a.jpg", 32, 32), ("b.jpg", 32, 32)], anns)
    coco = load_coco(tmp_path, "train_all.json")
    assert [coco.class_names[c] for c in dataset.CopyPaste(coco).classes] == ["Battery", "Metal"]  # 2 rarest
    paste = dataset.CopyPaste(coco, classes=["Battery"], prob=1.0, max_objects=1)
    ds = SegmentationDataset(coco, img_size=32, copy_paste=paste)
    image, mask = ds.load(1)
    source_pixels = int((ds.load(0)[1] == 3).sum())
    random.seed(0)
    pasted_image, pasted_mask = paste(image, mask, ds.load)
    assert (mask == 3).sum() == 0
    # the piece is rescaled by 0.7-1.3 per side: 0.49-1.69x its pixels, give or take rounding
    assert 0.4 * source_pixels <= (pasted_mask == 3).sum() <= 1.8 * source_pixels
    assert set(pasted_mask.unique().tolist()) <= {0, 1, 2, 3}
    image_out, mask_out, _ = ds[1]
    assert (mask_out == 3).any()


def test_demo_set_has_every_class_and_both_jsons(demo_dir):
    coco = load_coco(demo_dir, "train_all.json")
    assert coco.class_names == coco_module.COMPETITION_CLASSES
    present = set(np.flatnonzero(pixel_counts(coco).sum(0)))
    assert present == set(range(11))
    kinds = {type(a["segmentation"]).__name__ for anns in coco.anns_by_image.values() for a in anns}
    assert kinds == {"list", "dict"}
    test = load_coco(demo_dir, "test.json", class_names=coco.class_names)
    assert not test.labeled and len(test) == 4


def run_data_py(*args):
    return subprocess.run([sys.executable, "data.py", *map(str, args)], capture_output=True, text=True, cwd=REPO)


@pytest.mark.slow
def test_summary_and_overlays_from_the_command_line(demo_dir, tmp_path):
    out = run_data_py("--data-dir", demo_dir, "--vis", "2", "--output-dir", tmp_path / "vis", "--mask-cache", "none")
    assert out.returncode == 0, out.stderr
    assert "Clothing" in out.stdout and "log" in out.stdout and "decoded in full" in out.stdout
    pngs = sorted((tmp_path / "vis").glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size[1] > 200
    bad = run_data_py("--data-dir", tmp_path, "--json", "missing.json")
    assert bad.returncode != 0 and "missing.json: file not found" in bad.stderr and "Traceback" not in bad.stderr


def test_summary_decodes_every_image_and_finds_a_truncated_one(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "b.jpg", quality=95)  # pixel data far longer than the header
    write_set(tmp_path, [("a.jpg", 64, 48), ("b.jpg", 320, 240)], [])
    whole = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(whole[: len(whole) // 2])  # the header is intact, the pixels are not
    assert load_coco(tmp_path, "train_all.json")  # a header-only check passes it ...
    with pytest.raises(DataError, match=r"b\.jpg \(id 2\) cannot be decoded"):
        load_coco(tmp_path, "train_all.json", decode=True)  # ... a full decode does not
    out = run_data_py("--data-dir", tmp_path)
    assert out.returncode != 0 and "b.jpg (id 2) cannot be decoded" in out.stderr and "Traceback" not in out.stderr


def test_a_json_without_categories_says_so(tmp_path):
    path = write_set(tmp_path, [("a.jpg", 8, 8)], [{"image_id": 1, "category_id": 1, "segmentation": square(0, 0, 4, 4),
                                                    "area": 16}])
    raw = json.loads(path.read_text())
    del raw["categories"]
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="train_all.json: no 'categories' list"):
        load_coco(tmp_path, "train_all.json")
    unlabeled = {"images": raw["images"]}  # a test JSON without categories is fine once the run's classes are known
    (tmp_path / "test.json").write_text(json.dumps(unlabeled))
    assert len(load_coco(tmp_path, "test.json", class_names=["Background", "Paper"])) == 1


def test_summary_weights_follow_the_published_formulas(demo_dir):
    coco = load_coco(demo_dir, "train_all.json")
    rows = [line.split() for line in data.summarize(coco).splitlines() if line[:2].strip().isdigit()]
    assert len(rows) == len(coco.class_names)
    shown = {m: np.array([float(row[len(row) - 3 + k]) for row in rows]) for k, m in
             enumerate(("inverse", "log", "median"))}
    # expected weights computed here from the JSON itself by the documented formulas (1/f, 1/ln(1.02 + f), and
    # median frequency over the images holding each class), with pixels = annotation areas, Background the rest
    raw = json.loads((Path(demo_dir) / "train_all.json").read_text())
    row_of = {img["id"]: i for i, img in enumerate(raw["images"])}
    per_image = np.zeros((len(raw["images"]), 11))
    for ann in raw["annotations"]:
        per_image[row_of[ann["image_id"]], ann["category_id"]] += round(ann["area"])
    for img in raw["images"]:
        per_image[row_of[img["id"]], 0] = max(0, img["width"] * img["height"] - per_image[row_of[img["id"]]].sum())
    f = per_image.sum(0) / per_image.sum()
    median_f = per_image.sum(0) / ((per_image > 0) * per_image.sum(1, keepdims=True)).sum(0)
    for method, weights in (("inverse", 1 / f), ("log", 1 / np.log(1.02 + f)), ("median", np.median(median_f) / median_f)):
        assert shown[method] == pytest.approx(weights / weights.mean(), abs=1e-3), method


def test_json_outputs_are_strict_json_with_null_for_nan(tmp_path):
    metrics = {"mIoU": 0.5, "per_class": {"Glass": {"IoU": float("nan")}}, "x": [float("inf"), 1.0]}
    outputs.write_json(tmp_path / "m.json", metrics)

    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")
    back = json.loads((tmp_path / "m.json").read_text(), parse_constant=reject)
    assert back == {"mIoU": 0.5, "per_class": {"Glass": {"IoU": None}}, "x": [None, 1.0]}


def test_a_folder_of_unlabeled_photos_becomes_a_json_predict_can_take(tmp_path, monkeypatch, capsys):
    write_set(tmp_path, [("images/x.jpg", 16, 16)], [])
    (tmp_path / "mine" / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "mine" / "a.jpg")
    Image.new("RGB", (20, 10)).save(tmp_path / "mine" / "sub" / "B.PNG")
    (tmp_path / "mine" / "notes.txt").write_text("not a photo, not listed")
    (tmp_path / "mine" / "broken.jpg").write_bytes(b"not a jpeg")
    argv = ["data.py", "--data-dir", str(tmp_path), "--list-images", "mine"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"(?s)1 unreadable file.*broken\.jpg: cannot be read as an image.*--skip-bad"):
        data.main()
    assert not (tmp_path / "mine.json").exists()
    monkeypatch.setattr(sys, "argv", argv + ["--skip-bad"])
    data.main()
    assert "skipped" in capsys.readouterr().out
    listed = load_coco(tmp_path, "mine.json", class_names=load_coco(tmp_path, "train_all.json").class_names)
    assert not listed.labeled
    assert [(i["file_name"], i["width"], i["height"]) for i in listed.images] == [("mine/a.jpg", 40, 30),
                                                                                  ("mine/sub/B.PNG", 20, 10)]
