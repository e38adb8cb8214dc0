"""A damaged test photo does not kill predict.py (--skip-bad), the error without it is one plain line in every
stage, with and without loader workers; a file that is not a checkpoint is named as such."""
import contextlib
import csv
import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_run(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    train.main(["--data-dir", str(demo_dir), "--train-json", "train_all.json", "--val-json", "none",
                "--arch", "unet", "--backbone", "resnet18", "--no-pretrained", "--img-size", "48", "-b", "4",
                "--no-channels-last", "--workers", "0", "--epochs", "1", "--output-dir", str(root / "run"),
                "--mask-cache", "none", "--print-freq", "100"])
    return root / "run" / "last.pt"


@pytest.fixture()
def damaged_root(demo_dir, tmp_path):
    """A copy of the demo set whose second test photo and second labelled photo are cut to half their bytes
    (the header is intact: only decoding finds it)."""
    root = tmp_path / "data"
    shutil.copytree(demo_dir, root)
    for name in ("test.json", "train_all.json"):
        image = json.loads((root / name).read_text())["images"][1]
        path = root / image["file_name"]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return root


class Ran:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def stage(script, *args):
    """Run a stage's main() in this process (a subprocess costs seconds of imports): exit code and its output."""
    import export
    import predict
    main = {"predict.py": predict.main, "train.py": train.main, "export.py": export.main}[Path(script).name]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=err)
    return Ran(code, out.getvalue(), err.getvalue())


def rows(path):
    csv.field_size_limit(1 << 30)
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_truncated_test_photo_is_one_line_or_a_placeholder_row(tiny_run, damaged_root, tmp_path, workers):
    test = json.loads((damaged_root / "test.json").read_text())["images"]
    common = ["--ckpt", tiny_run, "--data-dir", damaged_root, "--json", "test.json", "--workers", workers,
              "-b", "2", "--mask-cache", "none"]
    failed = stage(REPO / "predict.py", *common, "--output-dir", tmp_path / "p")
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr + failed.stdout
    assert test[1]["file_name"] in failed.stderr and "--skip-bad" in failed.stderr
    assert "Caught DataError" not in failed.stderr
    assert not (tmp_path / "p" / "submission.csv").exists() and not (tmp_path / "p" / "probs").exists()

    done = stage(REPO / "predict.py", *common, "--output-dir", tmp_path / "q", "--skip-bad")
    assert done.returncode == 0, done.stderr[-2000:]
    written = rows(tmp_path / "q" / "submission.csv")
    assert [r[0] for r in written] == [image["file_name"] for image in test]  # every row, in the JSON's order
    assert set(written[1][1].split()) == {"0"} and len(written[1][1].split()) == 256 * 256
    assert "1 of " in done.stderr and "placeholders" in done.stderr
    manifest = json.loads((tmp_path / "q" / "predictions.json").read_text())["images"]
    assert "skipped" in manifest[1] and "probs" not in manifest[1]
    assert all("skipped" not in entry for i, entry in enumerate(manifest) if i != 1)


@pytest.mark.slow
def test_a_missing_test_photo_gets_a_placeholder_and_eval_scores_the_rest(tiny_run, demo_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_dir, root)
    images = json.loads((root / "train_all.json").read_text())["images"]
    (root / images[0]["file_name"]).unlink()
    common = ["--ckpt", tiny_run, "--data-dir", root, "--json", "train_all.json", "--workers", "0",
              "--mask-cache", "none", "--eval"]
    failed = stage(REPO / "predict.py", *common, "--output-dir", tmp_path / "p")
    assert failed.returncode != 0 and "not found" in failed.stderr and "--skip-bad" in failed.stderr
    done = stage(REPO / "predict.py", *common, "--output-dir", tmp_path / "q", "--skip-bad", "--vis", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(rows(tmp_path / "q" / "submission.csv")) == len(images)
    scored = rows(tmp_path / "q" / "per_image.csv")
    assert len(scored) == len(images) - 1 and images[0]["file_name"] not in {r[0] for r in scored}
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert metrics["placeholders"] == [images[0]["file_name"]]
    assert f"--eval scored the other {len(images) - 1}" in done.stderr


@pytest.mark.slow
def test_training_on_a_truncated_photo_in_a_worker_is_one_line(damaged_root, tmp_path):
    done = stage(REPO / "train.py", "--data-dir", damaged_root, "--train-json", "train_all.json", "--val-json",
                 "none", "--arch", "unet", "--backbone", "resnet18", "--no-pretrained", "--img-size", "48", "-b", "4",
                 "--no-channels-last", "--workers", "2", "--epochs", "1", "--output-dir", tmp_path / "r",
                 "--mask-cache", "none")
    text = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in text and "Caught DataError" not in text
    image = json.loads((damaged_root / "train_all.json").read_text())["images"][1]
    assert image["file_name"] in text


def not_checkpoints(tmp_path):
    files = {"is a JPEG image": tmp_path / "photo.jpg", "is an empty file": tmp_path / "empty.pt",
             "is a JSON or other text file": tmp_path / "notes.json", "is a text file": tmp_path / "readme.pt"}
    files["is a JPEG image"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(300))
    files["is an empty file"].write_bytes(b"")
    files["is a JSON or other text file"].write_text('{"images": []}')
    files["is a text file"].write_text("these are not weights\n" * 20)
    return files


@pytest.mark.parametrize("script", ["predict.py", "export.py", "train.py"])
def test_a_file_that_is_not_a_checkpoint_is_named_as_such(script, demo_dir, tmp_path):
    for kind, path in not_checkpoints(tmp_path).items():
        if script == "train.py":
            args = ["--resume", path, "--data-dir", demo_dir, "--train-json", "train_all.json", "--val-json", "none",
                    "--output-dir", tmp_path / "r"]
        elif script == "export.py":
            args = ["--ckpt", path, "-o", tmp_path / "m.pt2"]
        else:
            args = ["--ckpt", path, "--data-dir", demo_dir, "--output-dir", tmp_path / "p"]
        done = stage(REPO / script, *args)
        text = done.stdout + done.stderr
        assert done.returncode != 0 and f"{path}: {kind}, not a checkpoint" in text, text[-1500:]
        assert "weights_only=False" not in text and "Traceback" not in text


def test_a_cut_checkpoint_is_called_damaged_and_real_pickles_stay_unsafe(tiny_run, tmp_path):
    from checkpoint import load_state_file
    from model import ModelError
    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_run.read_bytes()[:100_000])
    with pytest.raises(ModelError, match="cut short or damaged"):
        load_state_file(cut, "checkpoint")
    torch.save({"model": {}, "args": Path("x")}, tmp_path / "objects.pt")
    with pytest.raises(ModelError, match="refused as unsafe"):
        load_state_file(tmp_path / "objects.pt", "checkpoint")
