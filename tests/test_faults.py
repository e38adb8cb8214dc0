"""Faults a long run meets: a full disk at any write, an unwritable mask cache, and stop signals."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import faults
import outputs
import train
from coco import MaskCache, open_mask_cache, paint_mask
from outputs import WriteError
from test_train import tiny_args as train_args

REPO = Path(__file__).resolve().parent.parent
FULL = OSError(errno.ENOSPC, "No space left on device")


def tiny_args(demo_dir, out, *extra):
    return train_args(demo_dir, out, "--val-json", "none", *extra)  # no validation: each epoch writes best, last


def leftovers(folder):
    return [p.name for p in Path(folder).rglob("*") if ".tmp" in p.name]


class FillingFile:
    """A real file that takes `room` bytes and then fails as a full disk does."""

    def __init__(self, path, mode, room):
        self.f, self.room = open(path, mode), room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_checkpoint_that_meets_a_full_disk_is_a_clear_error_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint({"w": torch.ones(10)}, path)
    before = path.read_bytes()
    # torch itself reports the failed write as a RuntimeError about zip positions; the reason must survive
    monkeypatch.setattr(checkpoint, "open", lambda p, mode: FillingFile(p, mode, room=4096), raising=False)
    with pytest.raises(WriteError) as error:
        checkpoint.save_checkpoint({"w": torch.zeros(100_000)}, path)
    text = str(error.value)
    assert text.startswith(f"cannot write {path}: No space left on device (it needed about 0.4 MiB")
    assert "free on its disk" in text
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_every_output_writer_names_its_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise FULL
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteError, match=re.escape(f"cannot write {tmp_path / 'm.json'}: No space left")):
        outputs.write_json(tmp_path / "m.json", {"a": 1})
    monkeypatch.setattr(Image.Image, "save", lambda self, path, *a, **k: (Path(path).write_bytes(b"half"), full()))
    with pytest.raises(WriteError, match=re.escape(f"cannot write {tmp_path / 'masks' / 'a.png'}")):
        outputs.save_mask(np.zeros((4, 4), np.uint8), tmp_path / "masks" / "a.png", ["Background", "A"])
    assert not (tmp_path / "masks" / "a.png").exists() and leftovers(tmp_path) == []


def test_the_disk_check_warns_when_the_first_epoch_cannot_fit(tmp_path, monkeypatch):
    model = torch.nn.Linear(1000, 1000)  # 4.0 MB of fp32 weights: AdamW keeps two more copies
    monkeypatch.setattr(faults, "free_bytes", lambda path: 30 * 2**20)
    line, warning = faults.checkpoint_size_check(model, "adamw", tmp_path)
    assert "one checkpoint takes about 11.5 MiB (weights 3.8 MiB, optimizer state 7.6 MiB)" in line
    assert warning is None
    monkeypatch.setattr(faults, "free_bytes", lambda path: 10 * 2**20)
    line, warning = faults.checkpoint_size_check(model, "adamw", tmp_path)
    assert warning.startswith(f"{tmp_path} has 10.0 MiB free, less than the 22.9 MiB the first epoch writes")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytest.warns re-emits pycocotools' own
def test_an_unwritable_mask_cache_is_skipped_with_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="mask cache .*a_file/masks cannot be written.*going on without it"):
        assert open_mask_cache(blocker / "masks") is None
    # a cache that fills up later: the mask still comes back, the cache stops writing, nothing partial stays
    cache = open_mask_cache(tmp_path / "cache")
    image = {"id": 1, "file_name": "x.jpg", "height": 8, "width": 8}
    anns = [{"category_id": 1, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]], "iscrowd": 0, "area": 25}]

    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise FULL
    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.warns(UserWarning, match="masks are no longer cached"):
        mask = cache.get(image, anns, {1: 1})
    assert np.array_equal(mask, paint_mask(image, anns, {1: 1})) and not cache.writable
    assert leftovers(tmp_path / "cache") == [] and isinstance(cache, MaskCache)


@pytest.mark.slow
def test_a_full_disk_mid_run_says_what_is_safe_and_resume_ends_as_an_uninterrupted_run(demo_dir, tmp_path,
                                                                                         monkeypatch, capsys):
    common = ["--epochs", "2", "--seed", "5"]
    train.main(tiny_args(demo_dir, tmp_path / "straight", *common))
    real_save, calls = torch.save, []

    def save_until_full(obj, f):  # the 3rd write (epoch 1's best.pt; each epoch writes best.pt, then last.pt) fails
        calls.append(1)
        if len(calls) == 3:
            f.write(b"\0" * 100)
            raise FULL
        return real_save(obj, f)
    monkeypatch.setattr(torch, "save", save_until_full)
    out = tmp_path / "full"
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(demo_dir, out, *common))
    assert stop.value.code != 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert said.startswith(f"error: cannot write {out / 'best.pt'}: No space left on device")
    assert f"The last complete checkpoint is {out / 'last.pt'} (epoch 0)" in said
    assert leftovers(out) == []
    monkeypatch.setattr(torch, "save", real_save)
    train.main(["--resume", str(out / "last.pt"), "--device", "cpu"])
    a, b = (torch.load(p / "last.pt", weights_only=True) for p in (tmp_path / "straight", out))
    assert a["epoch"] == b["epoch"] == 1
    for key in a["model"]:
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), atol=1e-6), key


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_training_with_an_unwritable_mask_cache_still_trains(demo_dir, tmp_path):
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    args = tiny_args(demo_dir, tmp_path / "run", "--epochs", "1")
    args[args.index("--mask-cache") + 1] = str(tmp_path / "blocker" / "masks")
    with pytest.warns(UserWarning, match="cannot be written"):
        train.main(args)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 0


def test_a_picture_that_cannot_be_drawn_is_reported_and_training_goes_on(demo_dir, tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise TypeError("a drawing bug")
    monkeypatch.setattr(checkpoint, "curves_picture", broken)  # save_epoch draws it after each checkpoint
    train.main(tiny_args(demo_dir, tmp_path / "run", "--epochs", "2"))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert "curves.png not drawn (TypeError: a drawing bug)" in capsys.readouterr().out
    assert not (tmp_path / "run" / "curves.png").exists()


def test_a_picture_that_cannot_be_written_still_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "free_bytes", lambda path: 0)
    def full(*args, **kwargs):
        raise FULL
    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(WriteError, match="curves.png"):
        outputs.save_drawing(lambda: Image.new("RGB", (4, 4)), tmp_path / "curves.png")
    assert leftovers(tmp_path) == []


def wait_for_step(log, epoch, timeout=120):
    """Until log.jsonl shows a training step of `epoch`."""
    end = time.time() + timeout
    while time.time() < end:
        if log.is_file():
            for line in log.read_text().splitlines():
                record = json.loads(line) if line.strip().endswith("}") else {}
                if record.get("epoch") == epoch and "step" in record:
                    return
        time.sleep(0.02)
    raise AssertionError(f"no step of epoch {epoch} in {log} after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("signum, whole_group, workers", [(signal.SIGTERM, False, "0"), (signal.SIGINT, True, "2")])
def test_a_stop_signal_ends_training_with_one_line_and_a_resumable_checkpoint(demo_dir, tmp_path, signum,
                                                                               whole_group, workers):
    out = tmp_path / "run"
    args = tiny_args(demo_dir, out, "--epochs", "3", "-b", "1", "--img-size", "64", "--print-freq", "1",
                     "--workers", workers)
    # Ctrl-C reaches the whole process group (loader workers too); a scheduler may signal the main process only
    job = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_step(out / "log.jsonl", epoch=1)
        os.killpg(job.pid, signum) if whole_group else job.send_signal(signum)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 128 + signum, stderr[-2000:]
    name = signal.Signals(signum).name
    assert re.search(rf"stopped by {name} at (epoch 1 step \d+/12|the end of epoch 1)\. ", stdout), stdout[-500:]
    saved = torch.load(out / "last.pt", weights_only=True)
    assert f"The last complete checkpoint is {out / 'last.pt'} (epoch {saved['epoch']})" in stdout
    assert "Traceback" not in stderr and leftovers(out) == []
    resumed = subprocess.run([sys.executable, "train.py", "--resume", str(out / "last.pt")], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


def test_a_second_signal_stops_at_once_and_says_so():
    import faults
    with faults.StopSignals(rank=1) as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # the first only asks
        with pytest.raises(faults.Stopped) as stopped:
            signal.raise_signal(signal.SIGTERM)
    stopped.value.epoch = 3
    assert stopped.value.at_once and stopped.value.exit_code == 143
    assert stopped.value.where() == "epoch 3, at once (a second signal; that epoch is not saved)"
    assert faults.Stopped(signal.SIGINT, 2).where() == "the end of epoch 2"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
