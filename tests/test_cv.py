"""cv.py: folds trained and predicted out of fold, skipped when finished, resumed when stopped; paired comparison."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cv

REPO = Path(__file__).resolve().parent.parent
TINY = ["--arch", "unet", "--backbone", "resnet18", "--no-pretrained", "--img-size", "48", "-b", "4",
        "--no-channels-last", "--workers", "0", "--print-freq", "100", "--device", "cpu", "--val-every", "100"]


def cv_command(demo_dir, folds_dir, out, *extra, epochs=1):
    return [sys.executable, str(REPO / "cv.py"), "--folds-dir", str(folds_dir), "--output-dir", str(out), *extra,
            "--", "--data-dir", str(demo_dir), "--mask-cache", str(out.parent / "cache"), *TINY,
            "--epochs", str(epochs)]


def run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def two_folds(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv")
    run([sys.executable, str(REPO / "folds.py"), "--data-dir", str(demo_dir), "--k", "2", "--output-dir",
         str(out / "folds")])
    return out / "folds"


def predicted_images(oof_dir):
    return [image["file_name"] for image in json.loads((oof_dir / "predictions.json").read_text())["images"]]


@pytest.mark.slow
def test_cv_predicts_every_labelled_image_once_and_skips_finished_folds(demo_dir, two_folds, tmp_path):
    out = tmp_path / "a"
    run(cv_command(demo_dir, two_folds, out))
    fold0, fold1 = predicted_images(out / "oof" / "fold0"), predicted_images(out / "oof" / "fold1")
    labelled = [image["file_name"] for image in json.loads((demo_dir / "train_all.json").read_text())["images"]
                if image["file_name"].startswith("images/")]
    assert not set(fold0) & set(fold1)
    assert sorted(fold0 + fold1) == sorted(labelled)
    result = json.loads((out / "cv.json").read_text())
    for record in result["folds"]:  # the fold's own predict.py --eval figures
        own = json.loads((out / "oof" / f"fold{record['fold']}" / "metrics.json").read_text())
        assert record["mIoU"] == own["mIoU"] and record["epochs"] == 1
    mean = sum(r["mIoU"] for r in result["folds"]) / 2
    assert result["summary"]["mean"]["mIoU"][0] == pytest.approx(mean)
    # a second run trains nothing and predicts nothing
    again = run(cv_command(demo_dir, two_folds, out))  # (no time limit: a loaded machine is not a failure)
    assert again.count("skipped") == 4 and "train.py" not in again
    # another recipe's fold-0 predictions and these cover the same photos: ensemble.py chooses weights on them
    other = tmp_path / "b"
    run(cv_command(demo_dir, two_folds, other, "--folds", "0"))
    run([sys.executable, str(REPO / "ensemble.py"), str(out / "oof" / "fold0"), str(other / "oof" / "fold0"),
         "--search-weights", "--eval", "--data-dir", str(demo_dir), "--json", str(two_folds / "val_fold0.json"),
         "--output-dir", str(tmp_path / "ens")])
    assert (tmp_path / "ens" / "weights.json").is_file()
    compared = run([sys.executable, str(REPO / "cv.py"), "--compare", str(out), str(other)])
    assert "over 1 fold(s)" in compared


@pytest.mark.slow
def test_cv_stopped_in_fold_1_resumes_there(demo_dir, two_folds, tmp_path):
    out = tmp_path / "a"
    cmd = cv_command(demo_dir, two_folds, out, epochs=10)  # fold 1 is stopped in its second epoch
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "fold1" / "last.pt").exists():  # fold 1 has saved an epoch
        assert child.poll() is None and time.time() < deadline, child.stdout.read()[-3000:]
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    text = child.communicate(timeout=120)[0]
    assert child.returncode != 0
    assert "training fold 1 ended" in text and "run the same cv.py command again" in text
    assert "Traceback" not in text
    again = run(cmd + ["--stop-after", "3"])  # resume, but stop early to keep the test short
    assert "fold 0: trained" in again and "resuming" in again and "done: epochs 0-" not in again
    assert torch.load(out / "fold1" / "last.pt", weights_only=True)["epoch"] == 2


def test_cv_refuses_the_flags_it_sets_and_a_missing_fold(tmp_path, capsys):
    (tmp_path / "val_fold0.json").write_text("{}")
    (tmp_path / "train_fold0.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        cv.main(["--folds-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--", "--fold", "1"])
    assert "--fold" in str(e.value) and "sets these itself" in str(e.value)
    with pytest.raises(SystemExit) as e:
        cv.main(["--folds-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--folds", "0,3"])
    assert "no val_fold3.json" in str(e.value)
    with pytest.raises(SystemExit) as e:
        cv.main(["--folds-dir", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")])
    assert "no val_fold<i>.json" in str(e.value)


def test_fold_in_a_flag_becomes_each_folds_number(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(cv, "run_child", lambda cmd, what: commands.append([str(c) for c in cmd]))
    for i in (0, 1):
        cv.train_fold(i, tmp_path, tmp_path / "folds", ["--pseudo", "pl/fold{fold}", "--weights=t/fold{fold}/last.pt",
                                                        "--amp"], force=False)
    for i, cmd in enumerate(commands):
        assert cmd[cmd.index("--pseudo") + 1] == f"pl/fold{i}"
        assert f"--weights=t/fold{i}/last.pt" in cmd and cmd[cmd.index("--fold") + 1] == str(i)
        assert not any("{fold}" in c for c in cmd)


def fake_cv(path, mious, digest="x", minutes=1.0):
    path.mkdir(parents=True)
    folds = [{"fold": i, "mIoU": m, "train_minutes": minutes, "val_photos_sha1": digest, "IoU": {}}
             for i, m in enumerate(mious)]
    (path / "cv.json").write_text(json.dumps({"folds": folds, "summary": {"oof": {"mIoU": sum(mious) / 3}}}))


def test_compare_pairs_by_fold(tmp_path, capsys):
    fake_cv(tmp_path / "a", [0.50, 0.60, 0.40])
    fake_cv(tmp_path / "b", [0.55, 0.58, 0.49])
    result = cv.compare(tmp_path / "a", tmp_path / "b")
    assert result["diffs"] == pytest.approx([0.05, -0.02, 0.09])
    assert result["mean"] == pytest.approx(0.04) and result["a_wins"] == 1
    assert result["sd"] == pytest.approx(0.0557, abs=1e-4)
    assert "within the spread" in capsys.readouterr().out  # mean 4.0 < sd 5.6
    fake_cv(tmp_path / "c", [0.5, 0.6, 0.4], digest="y")
    with pytest.raises(cv.CVError, match="different photos"):
        cv.compare(tmp_path / "a", tmp_path / "c")


def test_pairs_on_two_sets_are_pooled_by_the_developers_rule(tmp_path, capsys):
    fake_cv(tmp_path / "ga_a", [0.50, 0.60, 0.40])
    fake_cv(tmp_path / "ga_b", [0.53, 0.62, 0.43])  # +3, +2, +3
    fake_cv(tmp_path / "cv_a", [0.50, 0.50, 0.50])
    fake_cv(tmp_path / "cv_b", [0.52, 0.54, 0.49])  # +2, +4, -1
    cv.compare_pairs([str(tmp_path / n) for n in ("ga_a", "ga_b", "cv_a", "cv_b")])
    out = capsys.readouterr().out
    # 5 of 6 won, mean +2.17, sd 1.72, standard error 0.70: beyond twice it
    assert "B won 5, A won 1" in out and "mean +2.17" in out and "verdict: B wins" in out
    fake_cv(tmp_path / "cv_c", [0.40, 0.42, 0.41])  # camvid against it beyond its spread: -10, -8, -9
    cv.compare_pairs([str(tmp_path / n) for n in ("ga_a", "ga_b", "cv_a", "cv_c")])
    assert "verdict: no winner (noise)" in capsys.readouterr().out
    fake_cv(tmp_path / "cv_d", [0.52, 0.47, 0.50])  # +2, -3, 0: camvid inside its spread, pooled gain too small
    cv.compare_pairs([str(tmp_path / n) for n in ("ga_a", "ga_b", "cv_a", "cv_d")])
    assert "verdict: no winner (noise)" in capsys.readouterr().out
    with pytest.raises(cv.CVError, match="pairs of cv.py output dirs"):
        cv.compare_pairs([str(tmp_path / "ga_a")])


def test_out_of_fold_miou_comes_from_the_summed_confusion():
    names = ["Background", "A"]
    # fold 0: A perfect on a small area; fold 1: A all wrong on a large area
    f0 = {"fold": 0, "mIoU": 1.0, "train_minutes": 1, "IoU": {"Background": 1.0, "A": 1.0}, "confusion": [[90, 0], [0, 10]]}
    f1 = {"fold": 1, "mIoU": 0.45, "train_minutes": 3, "IoU": {"Background": 0.9, "A": 0.0}, "confusion": [[60, 0], [40, 0]]}
    absent = {"fold": 2, "mIoU": 0.8, "train_minutes": 2, "IoU": {"Background": 0.8, "A": None}, "confusion": [[10, 0], [0, 0]]}
    assert cv.summary([f0, absent])["mean"]["IoU"]["A"] == (1.0, 0.0)  # metrics.json writes an absent class as null
    cv.print_table([f0, absent], cv.summary([f0, absent]))
    total = cv.summary([f0, f1])
    assert total["mean"]["mIoU"][0] == pytest.approx(0.725)
    assert total["oof"]["IoU"]["A"] == pytest.approx(10 / 50)  # tp 10, gt 50, pred 10
    assert total["oof"]["mIoU"] == pytest.approx((150 / 190 + 0.2) / 2)
    assert names == list(total["oof"]["IoU"])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killing_cv_stops_its_training_child(demo_dir, two_folds, tmp_path):
    out = tmp_path / "killed"
    child = subprocess.Popen(cv_command(demo_dir, two_folds, out, epochs=200), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "fold0" / "last.pt").exists():
        assert child.poll() is None and time.time() < deadline
        time.sleep(0.2)
    child.kill()  # SIGKILL: cv.py cannot pass anything on
    child.wait()
    deadline = time.time() + 120
    while subprocess.run(["pgrep", "-f", str(out / "fold0")], capture_output=True).returncode == 0:
        assert time.time() < deadline, "train.py went on after cv.py was killed"
        time.sleep(0.5)
    epochs = torch.load(out / "fold0" / "last.pt", weights_only=True)["epoch"] + 1
    assert epochs < 200
