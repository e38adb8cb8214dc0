"""train.py --minutes (a time budget that plans the epochs and the schedule) and --ema (an average of the weights that
validates and is saved)."""
import json
import time

import pytest
import torch

import predict
import train
from budget import TimeBudget
from optim import WeightAverage, lr_factor
from outputs import read_log


def test_the_plan_fits_the_budget_with_its_validations():
    budget = TimeBudget(1, steps_per_epoch=10, val_every=2, start=0)
    budget.record(5, 2)  # the first epoch: 5 s of steps, 2 s of validation, done at 7 s
    epochs = budget.plan(7)
    # epochs 1..8: 8 x 5 s + 5 validations (after epochs 1, 3, 5, 7 and the last) x 2 s = 50 s of the 53 left
    assert epochs == 9 and budget.cost(1, 9, 5, 2) == 50 and budget.cost(1, 10, 5, 2) > 53


def test_a_budget_shorter_than_one_epoch_still_plans_that_epoch():
    budget = TimeBudget(0.05, steps_per_epoch=10, val_every=1, start=0)  # 3 s
    budget.record(5, 1)
    assert budget.plan(6) == 1


def test_slower_epochs_end_the_run_earlier_but_leave_one_to_run():
    budget = TimeBudget(1, steps_per_epoch=10, val_every=1, start=0)
    budget.record(5, 1)
    assert budget.plan(6) == 10
    budget.record(10, 1)  # the second epoch took twice as long: 8 epochs of 11 s do not fit the 43 s left
    assert budget.replan(2, 10, 17) == 5  # epochs 2, 3, 4: 33 s
    assert budget.replan(2, 10, 17) < 10
    assert TimeBudget(1, 10, 1, 0).replan(2, 10, 17) is None  # nothing measured after the first: keep the plan
    budget.record(10, 1)
    assert budget.replan(8, 9, 200) is None  # one epoch left: it runs, so the schedule ends at its final rate


def test_the_weight_average_follows_its_formula():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = WeightAverage(net, decay=0.9)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update()
        decay = min(0.9, (1 + n) / (10 + n))  # a low decay at first, rising to 0.9
        expected = decay * expected + (1 - decay) * value
        assert ema.model.weight.item() == pytest.approx(expected)
    assert not ema.model.weight.requires_grad
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightAverage(net, decay=1.0)


def tiny(demo_dir, out, *extra):
    return ["--data-dir", str(demo_dir), "--train-json", "train_all.json", "--val-json", "train_all.json",
            "--arch", "unet", "--backbone", "resnet18", "--no-pretrained", "--img-size", "32", "-b", "4",
            "--no-channels-last", "--workers", "0", "--lr", "1e-3", "--output-dir", str(out), "--mask-cache", "none",
            "--print-freq", "1", "--device", "cpu", *extra]


@pytest.mark.slow
def test_minutes_plans_the_epochs_and_the_schedule_over_exactly_them(demo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    started = time.time()
    train.main(tiny(demo_dir, out, "--minutes", "0.25"))
    wall = time.time() - started
    config = json.loads((out / "config.json").read_text())
    planned, steps = config["epochs"], config["budget"]["steps_per_epoch"]
    records = read_log(out / "log.jsonl")
    plans = [(r["epoch"], r["budget"]["epochs"]) for r in records if "budget" in r]  # the plan, then any replan
    assert plans[0][0] == 0 and plans[-1][1] == planned >= 2  # a few seconds an epoch: several fit
    assert f"--minutes 0.25: {plans[0][1]} epochs of {steps} steps" in capsys.readouterr().out
    epochs = [r for r in records if "epoch_seconds" in r]
    assert len(epochs) == planned
    longest = max(r["epoch_seconds"] for r in epochs)
    assert wall < 15 + 2 * longest + 10  # the budget, one epoch and its validation, and the set-up before training
    # every step's learning rate is the schedule's over exactly the planned epochs x steps (the plan in force
    # then: made after epoch e, it rules from e + 1); epoch 0 is the warm-up, the same for any plan
    for r in (r for r in records if "step" in r):
        total = steps * [n for e, n in plans if e < max(r["epoch"], 1)][-1]
        assert r["lr"] == pytest.approx(1e-3 * lr_factor(r["epoch"] * steps + r["step"], total, steps, "poly"))
    last = [r for r in records if "step" in r][-1]
    assert (last["epoch"], last["step"]) == (planned - 1, steps) and last["lr"] == pytest.approx(0.0)
    assert torch.load(out / "last.pt", weights_only=True)["args"]["epochs"] == planned


@pytest.mark.slow
def test_a_resumed_budget_run_keeps_its_plan(demo_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny(demo_dir, out, "--minutes", "0.2", "--stop-after", "1", "--val-every", "100"))
    planned = json.loads((out / "config.json").read_text())["epochs"]
    train.main(tiny(demo_dir, out, "--minutes", "0.2", "--resume"))  # as cv.py resumes: the same flags again
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] + 1 == planned
    assert len([r for r in read_log(out / "log.jsonl") if "budget" in r]) == 1  # planned once


def test_minutes_and_epochs_together_are_refused(demo_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(tiny(demo_dir, tmp_path / "run", "--minutes", "1", "--epochs", "3"))
    assert "give --minutes or --epochs, not both" in capsys.readouterr().out


@pytest.mark.slow
def test_the_average_is_what_validates_and_what_predicts(demo_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny(demo_dir, out, "--epochs", "2", "--ema", "0.9", "--print-freq", "100"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["ema_updates"] == ckpt["scheduler"]["last_epoch"]  # one update per optimizer step
    differs = [k for k in ckpt["model"] if ckpt["model"][k].is_floating_point()
               and not torch.equal(ckpt["model"][k], ckpt["train_model"][k])]
    assert differs  # the average is not the trained weights
    logged = [r["val"]["mIoU"] for r in read_log(out / "log.jsonl") if "val" in r][-1]
    predict.main(["--ckpt", str(out / "last.pt"), "--data-dir", str(demo_dir), "--json", "train_all.json", "--eval",
                  "--output-dir", str(tmp_path / "preds"), "--workers", "0", "--device", "cpu", "--no-probs"])
    scored = json.loads((tmp_path / "preds" / "metrics.json").read_text())["mIoU"]
    assert scored == pytest.approx(logged, abs=1e-6)  # predict.py (which builds from "model") scores what validated
    tested = train.main(["--test-only", "--resume", str(out / "last.pt"), "--val-json", "train_all.json",
                         "--device", "cpu", "--workers", "0"])
    assert tested["mIoU"] == pytest.approx(logged, abs=1e-6)  # and so does --test-only
    # tools/trained_weights.py: the same run's trained weights as a checkpoint of their own, to score EMA against none
    import subprocess
    import sys
    from pathlib import Path
    tool = Path(__file__).resolve().parent.parent / "tools" / "trained_weights.py"
    done = subprocess.run([sys.executable, str(tool), str(out / "last.pt"), str(tmp_path / "trained.pt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    trained = torch.load(tmp_path / "trained.pt", weights_only=True)
    assert all(torch.equal(trained["model"][k], ckpt["train_model"][k]) for k in ckpt["train_model"])
    assert "train_model" not in trained and trained["args"]["ema"] is None
