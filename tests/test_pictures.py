"""Pictures from what runs write: curves, confusion matrices, run comparisons (pillow only)."""
import json

import numpy as np
import pytest
from PIL import Image

import plots
from coco import palette
from pictures import confusion_picture, curves_picture, last_of_each, line_chart

NAMES = ["Background", "Paper", "Metal", "Glass"]


def fake_log(epochs=3, classes=NAMES):
    """log.jsonl records as train.py writes them: steps, then a validation per epoch."""
    records = []
    for epoch in range(epochs):
        for step in (1, 2):
            records.append({"epoch": epoch, "step": step, "steps": 2, "loss": 2.0 / (1 + epoch + step / 2),
                            "lr": 1e-3 * 0.5 ** epoch})
        per_class = {n: {"IoU": 0.2 * (epoch + 1) if n != "Glass" else None} for n in classes}
        records.append({"epoch": epoch, "val": {"mIoU": 0.1 * (epoch + 1), "mAcc": 0.5, "aAcc": 0.9,
                                                "per_class": per_class}})
    return records


def colors_in(image):
    return {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)}


def test_curves_draw_every_present_class_in_its_palette_colour():
    image = curves_picture(fake_log(), NAMES, "run")
    colors = colors_in(image)
    paper, metal = palette(NAMES)[1], palette(NAMES)[2]
    assert paper in colors and metal in colors  # their IoU lines
    assert (31, 119, 180) in colors and (214, 39, 40) in colors  # the loss and lr lines
    # Glass has no IoU in any epoch: not in the legend, so its colour appears nowhere
    assert palette(NAMES)[3] not in colors
    assert image.width == 720 and image.height == 300 + 300 + 360


def test_a_class_with_an_iou_in_some_epochs_only_is_drawn_with_a_gap():
    # a class absent from the val labels has IoU 0 in an epoch that predicts it and none in one that does not
    records = fake_log()
    records[2]["val"]["per_class"]["Glass"]["IoU"] = 0.0
    colors = colors_in(curves_picture(records, NAMES, "run"))
    assert palette(NAMES)[3] in colors


def test_a_resumed_epoch_logged_twice_counts_once():
    records = [{"epoch": 0, "step": 1, "loss": 9.0}, {"epoch": 0, "step": 1, "loss": 1.0}, {"epoch": 1}]
    kept = last_of_each(records, lambda r: (r["epoch"], r["step"]) if "step" in r else None)
    assert kept == [{"epoch": 0, "step": 1, "loss": 1.0}]


def test_an_empty_log_draws_a_note_instead_of_failing():
    assert line_chart([("x", (0, 0, 0), [], [])], "empty", "x", "y").size == (720, 300)


def test_confusion_cells_are_shaded_by_the_row_share_and_absent_rows_stay_empty():
    names = [f"class {i}" for i in range(12)]
    confusion = np.zeros((12, 12), np.int64)
    confusion[0, 0], confusion[1, 1], confusion[1, 2] = 50, 30, 10  # class 1: 75% right, 25% as class 2
    image = np.asarray(confusion_picture(confusion, names, title="t"))
    white = (255, 255, 255)
    # find the grid: the 100% cell of class 0 is the darkest blue
    dark = np.argwhere((image == (8, 69, 148)).all(-1))
    top, left = dark.min(0)
    cell = 44
    pixel = lambda row, col: tuple(image[top + row * cell + 3, left + col * cell + 3])
    assert pixel(0, 0) == (8, 69, 148)
    assert pixel(1, 1) == tuple(int(255 - 0.75 * (255 - c)) for c in (8, 69, 148))
    assert pixel(1, 2) == tuple(int(255 - 0.25 * (255 - c)) for c in (8, 69, 148))
    assert pixel(1, 0) == white and pixel(5, 5) == white  # nothing there; class 5 absent from ground truth


def write_run(folder, mious):
    folder.mkdir()
    records = [{"epoch": e, "val": {"mIoU": m, "mAcc": m, "aAcc": m, "per_class": {"Paper": {"IoU": m}}}}
               for e, m in enumerate(mious)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"epoch": 9, "cut')
    return folder


def test_plots_compares_runs_and_names_unknown_metrics(tmp_path, capsys):
    a, b = write_run(tmp_path / "a", [0.1, 0.3]), write_run(tmp_path / "b", [0.2, 0.25])
    plots.main([str(a), str(b), "--metric", "Paper", "-o", str(tmp_path / "compare.png")])
    colors = colors_in(Image.open(tmp_path / "compare.png"))
    assert (31, 119, 180) in colors and (255, 127, 14) in colors  # one line per run
    assert plots.validation_series(plots.run_records(a), "mIoU") == ([1, 2], [10.0, 30.0])
    with pytest.raises(SystemExit, match="no metric 'Pape' in the log: mIoU, mAcc, aAcc or a class name .Paper."):
        plots.main([str(a), "--metric", "Pape"])
    with pytest.raises(SystemExit, match="no log.jsonl"):
        plots.main([str(tmp_path)])


def test_plots_redraws_one_runs_pictures_from_its_files(tmp_path):
    run = write_run(tmp_path / "run", [0.1, 0.3])
    best = {"epoch": 1, "mIoU": 0.3, "per_class": {n: {"IoU": 0.3} for n in NAMES}, "confusion": np.eye(4).tolist()}
    (run / "best_metrics.json").write_text(json.dumps(best))
    plots.main([str(run)])
    assert Image.open(run / "curves.png").size == (720, 960)
    assert (8, 69, 148) in colors_in(Image.open(run / "confusion.png"))  # the 100% diagonal


def test_time_to_quality_draws_one_line_per_label_from_cv_json(tmp_path):
    for name, minutes, miou in (("ga15", 14.0, 0.60), ("ga60", 55.0, 0.66), ("cv15", 14.5, 0.50)):
        (tmp_path / name).mkdir()
        summary = {"mean": {"mIoU": [miou, 0.02], "train_minutes": [minutes, 0.3]}}
        (tmp_path / name / "cv.json").write_text(json.dumps({"summary": summary}))
    specs = [f"garbage={tmp_path / 'ga60'}", f"garbage={tmp_path / 'ga15'}", f"camvid={tmp_path / 'cv15'}"]
    series = plots.cv_points(specs)
    assert [(s[0], s[2], s[3]) for s in series] == [("garbage", [14.0, 55.0], [60.0, 66.0]),
                                                    ("camvid", [14.5], [50.0])]
    plots.main(["--cv", *specs, "-o", str(tmp_path / "t.png")])
    colors = colors_in(Image.open(tmp_path / "t.png"))
    assert (31, 119, 180) in colors and (255, 127, 14) in colors
    with pytest.raises(SystemExit, match="LABEL=DIR"):
        plots.main(["--cv", str(tmp_path / "ga15")])
    with pytest.raises(SystemExit, match="no cv.json"):
        plots.main(["--cv", f"x={tmp_path}"])


def test_time_to_quality_counts_a_votes_members_minutes_summed(tmp_path):
    members = []
    for seed, minutes in ((0, (18.0, 19.0)), (1, (17.0, 21.0))):
        run = tmp_path / f"s{seed}"
        rows = [{"fold": f, "mIoU": 0.6, "train_minutes": m} for f, m in enumerate(minutes)]
        (run / "oof").mkdir(parents=True)
        (run / "cv.json").write_text(json.dumps({"folds": rows}))
        members.append(run)
    for fold, miou in ((0, 0.70), (1, 0.74)):
        (tmp_path / "vote" / f"fold{fold}").mkdir(parents=True)
        inputs = [str(m / "oof" / f"fold{fold}") for m in members]
        (tmp_path / "vote" / f"fold{fold}" / "metrics.json").write_text(json.dumps({"mIoU": miou, "inputs": inputs}))
    series = plots.cv_points([f"vote={tmp_path / 'vote'}"])
    assert series[0][0] == "vote" and series[0][2] == [37.5] and series[0][3] == pytest.approx([72.0])
    (members[1] / "cv.json").write_text(json.dumps({"folds": [{"fold": 0, "train_minutes": 17.0}]}))
    with pytest.raises(SystemExit, match=r"vote.fold1.metrics.json: its member .*s1.oof.fold1"):
        plots.main(["--cv", f"vote={tmp_path / 'vote'}"])
