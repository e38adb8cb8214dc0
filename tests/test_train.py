import copy
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import losses
import predict
import train
from checkpoint import model_from_checkpoint, read_checkpoint
from metrics import confusion_matrix, metrics_table, segmentation_metrics
from model import build_model
from optim import build_optimizer, lr_factor

REPO = Path(__file__).resolve().parent.parent
NAMES = ["Background", "A", "B", "C"]


def tiny_args(demo_dir, out, *extra):
    return ["--data-dir", str(demo_dir), "--train-json", "train_all.json", "--val-json", "train_all.json",
            "--arch", "unet", "--backbone", "resnet18", "--no-pretrained", "--img-size", "48", "-b", "4",
            "--no-channels-last", "--workers", "0", "--lr", "3e-3", "--warmup-epochs", "0", "--output-dir", str(out),
            "--mask-cache", str(out.parent / "cache"), "--print-freq", "100", "--device", "cpu", *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- metrics

def test_confusion_matrix_skips_ignored_pixels():
    target = torch.tensor([[0, 1, 1], [2, 255, 3]])
    pred = torch.tensor([[0, 1, 2], [2, 0, 0]])
    cm = confusion_matrix(pred, target, 4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in [(0, 0), (1, 1), (1, 2), (2, 2), (3, 0)]:
        expected[t, p] += 1
    assert torch.equal(cm, expected)


def test_metrics_on_a_hand_computed_matrix_with_absent_classes():
    # rows = ground truth, columns = prediction; class 2 absent from both, class 3 predicted but absent from GT
    cm = torch.tensor([[8, 1, 0, 1],
                       [2, 4, 0, 0],
                       [0, 0, 0, 0],
                       [0, 0, 0, 0]])
    m = segmentation_metrics(cm, NAMES)
    iou_bg, iou_a, iou_c = 8 / (10 + 10 - 8), 4 / (6 + 5 - 4), 0.0
    assert math.isclose(m["per_class"]["Background"]["IoU"], iou_bg)
    assert math.isclose(m["per_class"]["A"]["IoU"], iou_a)
    assert math.isnan(m["per_class"]["B"]["IoU"])              # absent from both: left out of the mean
    assert m["per_class"]["C"]["IoU"] == 0.0                    # predicted, absent from GT: counts as 0
    assert math.isclose(m["mIoU"], (iou_bg + iou_a + iou_c) / 3)
    assert math.isclose(m["mAcc"], (8 / 10 + 4 / 6) / 2)       # accuracy needs GT pixels
    assert math.isclose(m["aAcc"], 12 / 16)
    lines = {line.split()[0]: line for line in metrics_table(m).splitlines()[1:-1]}
    assert "absent from ground truth and prediction" in lines["B"]
    assert "absent from ground truth but predicted: IoU 0" in lines["C"]
    assert "absent" not in lines["A"]
    # most mistaken for: A loses 2 of 6 pixels to Background; Background loses 1 to A and 1 to C (tie: first)
    assert m["per_class"]["A"]["mistaken_for"] == {"class": "Background", "share": 2 / 6}
    assert m["per_class"]["Background"]["mistaken_for"] == {"class": "A", "share": 1 / 10}
    assert m["per_class"]["B"]["mistaken_for"] is None
    assert "Background 33%" in lines["A"]


def test_perfect_prediction_gives_miou_one():
    target = torch.randint(0, 4, (5, 7))
    assert segmentation_metrics(confusion_matrix(target, target, 4), NAMES)["mIoU"] == 1.0


def test_lr_schedules_warm_up_and_decay():
    for kind in ("poly", "cosine", "step", "onecycle"):
        factors = [lr_factor(s, 100, 10, kind) for s in range(100)]
        assert all(0 <= f <= 1.0 + 1e-9 for f in factors)
        assert factors[-1] < 0.2 and max(factors) > 0.9, kind
    assert lr_factor(0, 100, 10, "poly") == 0.1


# ----------------------------------------------------------------------------- training runs

def test_optimizer_is_fused_and_steps_like_the_reference_implementation():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 2, 1))
    twin, start = copy.deepcopy(net), net[0].weight.detach().clone()
    fused = build_optimizer(net, "adamw", lr=1e-2, weight_decay=0.1)
    reference = build_optimizer(twin, "adamw", lr=1e-2, weight_decay=0.1)
    assert all(g["fused"] for g in fused.param_groups)
    for g in reference.param_groups:  # torch's per-tensor loop, the implementation the fused kernel must match
        g["fused"], g["foreach"] = False, False
    for _ in range(3):  # the same gradients into both (through a network, Adam would amplify float noise)
        for a, b in zip(net.parameters(), twin.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        reference.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert (net[0].weight - start).abs().mean() > 5e-3  # and the weights did move
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]  # no decay on norms and biases


@pytest.mark.slow
def test_tiny_model_overfits_the_tiny_set(demo_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(demo_dir, out, "--epochs", "12", "--aug", "none", "--val-every", "12"))
    strict = {"parse_constant": lambda name: pytest.fail(f"{name} in a JSON output")}  # NaN must be null
    metrics = json.loads((out / "best_metrics.json").read_text(), **strict)
    chance = 1 / 11
    assert metrics["mIoU"] > 4 * chance, metrics["mIoU"]
    records = [json.loads(line, **strict) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    assert json.loads((out / "config.json").read_text())["arch"] == "unet"
    ckpt = load(out / "best.pt")  # only tensors and plain data
    assert ckpt["class_names"][0] == "Background" and ckpt["epoch"] == 11


@pytest.mark.slow
@pytest.mark.parametrize("ema", [[], ["--ema", "0.9"]], ids=["plain", "ema"])
def test_resume_continues_exactly(demo_dir, tmp_path, ema):
    common = ["--epochs", "4", "--aug", "basic", "--val-every", "2", "--seed", "3", *ema]
    train.main(tiny_args(demo_dir, tmp_path / "straight", *common))
    train.main(tiny_args(demo_dir, tmp_path / "stopped", *common, "--stop-after", "2"))
    assert load(tmp_path / "stopped" / "last.pt")["epoch"] == 1
    # a bare --resume: every other flag comes back from the checkpoint
    train.main(["--resume", str(tmp_path / "stopped" / "last.pt"), "--device", "cpu"])
    a, b = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "stopped" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for part in ("model", "train_model") if ema else ("model",):  # with --ema: the average and the trained weights
        for key in a[part]:
            assert torch.allclose(a[part][key].float(), b[part][key].float(), atol=1e-6), (part, key)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert a.get("ema_updates") == b.get("ema_updates") == (a["scheduler"]["last_epoch"] if ema else None)


@pytest.mark.slow
def test_bf16_autocast_and_copy_paste_and_class_weights_run(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRASHSEG_CPU_BF16", "1")  # --amp takes bf16 only where the CPU has it: force the check
    out = tmp_path / "amp"
    train.main(tiny_args(demo_dir, out, "--epochs", "1", "--amp", "--loss", "focal+dice", "--class-weights", "log",
                         "--copy-paste", "--aug", "strong", "--arch", "deeplabv3plus", "--decoder-convs", "2"))
    ckpt = load(out / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert ckpt["args"]["amp"] and ckpt["args"]["precision"] == "bf16" and ckpt["args"]["loss"] == "focal+dice"
    # the checkpoint rebuilds with its own decoder, not the default one
    assert len(model_from_checkpoint(read_checkpoint(out / "last.pt")).refine) == 2
    # a checkpoint from before --separable and --decoder-convs: a full head with the paper's two decoder convs
    del ckpt["args"]["separable"], ckpt["args"]["decoder_convs"]
    ckpt["model"] = build_model("deeplabv3plus", "resnet18", len(ckpt["class_names"]), separable=False,
                                decoder_convs=2).state_dict()
    torch.save(ckpt, tmp_path / "old.pt")
    old = model_from_checkpoint(read_checkpoint(tmp_path / "old.pt"))
    assert len(old.refine) == 2 and old.refine[0][0].groups == 1
    train.main(["--test-only", "--resume", str(tmp_path / "old.pt")])  # train.py rebuilds it the same way


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytest.warns re-emits pycocotools' own
def test_persistent_nan_loss_stops_with_a_checkpoint(demo_dir, tmp_path, monkeypatch):
    class NanLoss(torch.nn.Module):
        parts = {}

        def forward(self, logits, target):
            return logits.sum() * float("nan")
    monkeypatch.setattr(losses, "build_loss", lambda *a, **k: NanLoss())
    monkeypatch.setattr(train, "NAN_PATIENCE", 2)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit), pytest.warns(UserWarning, match="non-finite loss"):
        train.main(tiny_args(demo_dir, out, "--epochs", "1"))
    assert (out / "nan_stop.pt").is_file()


@pytest.mark.slow
def test_an_existing_run_is_not_overwritten_without_force(demo_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(demo_dir, out, "--epochs", "1", "--val-json", "none"))
    before = (out / "last.pt").read_bytes()
    with pytest.raises(SystemExit):
        train.main(tiny_args(demo_dir, out, "--epochs", "1", "--val-json", "none"))
    assert (out / "last.pt").read_bytes() == before
    train.main(tiny_args(demo_dir, out, "--epochs", "1", "--val-json", "none", "--force"))


@pytest.mark.slow
def test_bad_data_is_a_clear_error_not_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--data-dir", str(tmp_path), "--fold", "0",
                          "--no-pretrained", "--workers", "0"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "train_fold0.json: file not found" in out.stdout + out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "train.py", "--test-only"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "--test-only validates a checkpoint" in out.stdout and "Traceback" not in out.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_metrics(demo_dir, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train.py", *tiny_args(demo_dir, out, "--epochs", "1", "--aug", "none", "-b", "2")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ddp = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"val"' in line][-1]
    single = subprocess.run([sys.executable, "train.py", *tiny_args(demo_dir, tmp_path / "single", "--test-only",
                                                                    "--resume", str(out / "last.pt"))],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    result = json.loads(single.stdout.strip().splitlines()[-1])
    assert result["mIoU"] == pytest.approx(ddp["val"]["mIoU"], abs=1e-9)
    assert result["aAcc"] == pytest.approx(ddp["val"]["aAcc"], abs=1e-9)


@pytest.mark.slow
def test_resume_keeps_a_flag_given_at_its_default_value(demo_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(demo_dir, out, "--epochs", "2", "--stop-after", "1", "--val-json", "none",
                         "--lr", "1e-3", "--print-freq", "100"))
    assert load(out / "last.pt")["args"]["lr"] == 1e-3
    # 2e-4 is --lr's default: given on the command line it must still win over the checkpoint's 1e-3
    train.main(["--resume", str(out / "last.pt"), "--lr", "2e-4"])
    resumed = load(out / "last.pt")
    assert resumed["epoch"] == 1 and resumed["args"]["lr"] == 2e-4
    assert resumed["args"]["img_size"] == 48  # not given: the checkpoint's
    with pytest.raises(SystemExit):  # the network cannot change under a resumed run
        train.main(["--resume", str(out / "last.pt"), "--backbone", "resnet34", "--epochs", "3"])


class TinyNet(torch.nn.Module):
    """No batch norm: a batch of 4 and two accumulated batches of 2 give the same gradients."""

    def __init__(self, num_classes):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, num_classes, 1))
        self.encoder = type("Encoder", (), {"output_stride": 1})()

    def forward(self, x):
        return self.body(x)


def test_accumulated_batches_equal_one_larger_batch(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_model", lambda arch, backbone, n, **kw: TinyNet(n))
    common = ["--epochs", "1", "--aug", "none", "--val-json", "none", "--no-channels-last", "--seed", "5",
              "--optimizer", "sgd", "--weight-decay", "0"]
    train.main(tiny_args(demo_dir, tmp_path / "big", *common, "-b", "4"))
    train.main(tiny_args(demo_dir, tmp_path / "accum", *common, "-b", "2", "--accum-steps", "2"))
    big, accum = load(tmp_path / "big" / "last.pt"), load(tmp_path / "accum" / "last.pt")
    assert big["scheduler"]["last_epoch"] == accum["scheduler"]["last_epoch"] == 3  # 12 images / 4 per step
    torch.manual_seed(5)
    start = TinyNet(11).state_dict()  # the weights both runs started from (train.py seeds, then builds)
    for key in big["model"]:
        assert not torch.allclose(big["model"][key], start[key])  # training moved them ...
        assert torch.allclose(big["model"][key], accum["model"][key], atol=1e-5), key  # ... the same way


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytest.warns re-emits pycocotools' own
def test_a_non_finite_batch_keeps_the_rest_of_its_accumulation_window(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_model", lambda arch, backbone, n, **kw: TinyNet(n))
    calls = []

    class SecondBatchNan(torch.nn.Module):
        parts = {}

        def forward(self, logits, target):
            calls.append(len(calls))
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
            return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(losses, "build_loss", lambda *a, **k: SecondBatchNan())
    stepped = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: stepped.append(
        [p.grad is not None for g in self.param_groups for p in g["params"]]) or real_step(self, *a, **k))
    with pytest.warns(UserWarning, match="non-finite loss"):
        train.main(tiny_args(demo_dir, tmp_path / "run", "--epochs", "1", "--aug", "none", "--val-json", "none",
                             "--optimizer", "sgd", "-b", "2", "--accum-steps", "2", "--no-channels-last"))
    # 12 images / 2 per batch = 6 batches = 3 windows; the bad second batch still leaves the first one's gradients,
    # so every window steps
    assert len(calls) == 6 and len(stepped) == 3 and all(all(has) for has in stepped)


@pytest.mark.slow
def test_validation_and_predict_eval_give_the_same_miou(demo_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(demo_dir, out, "--epochs", "2", "--aug", "none"))
    done = subprocess.run([sys.executable, "train.py", "--test-only", "--resume", str(out / "best.pt"), "--workers",
                           "0", "--batch-size", "4"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    test_only = json.loads(done.stdout.strip().splitlines()[-1])
    predict.main(["--ckpt", str(out / "best.pt"), "--data-dir", str(demo_dir), "--json", "train_all.json", "--eval",
                  "--workers", "0", "-b", "4", "--no-probs", "--output-dir", str(tmp_path / "pred"),
                  "--mask-cache", "none"])
    predicted = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert 0.05 < test_only["mIoU"] < 1
    assert predicted["mIoU"] == pytest.approx(test_only["mIoU"], abs=1e-9)
    assert predicted["aAcc"] == pytest.approx(test_only["aAcc"], abs=1e-9)
    best = json.loads((out / "best_metrics.json").read_text())  # and so does the training run's own validation
    assert best["mIoU"] == pytest.approx(test_only["mIoU"], abs=1e-6)
    # pictures beside what they show: the run's curves and best confusion matrix, predict's confusion matrix
    for picture in (out / "curves.png", out / "confusion.png", tmp_path / "pred" / "confusion.png"):
        assert Image.open(picture).size[0] > 300, picture


@pytest.mark.slow
def test_normalisation_and_orientation_travel_in_the_checkpoint(demo_dir, tmp_path, monkeypatch):
    out = tmp_path / "lite"
    train.main(tiny_args(demo_dir, out, "--epochs", "1", "--val-json", "none", "--backbone", "efficientnet_lite0",
                         "--orientation", "any"))
    ckpt = load(out / "last.pt")
    assert ckpt["normalization"] == {"mean": [127 / 255] * 3, "std": [128 / 255] * 3}
    seen = []
    real = predict.SegmentationDataset
    monkeypatch.setattr(predict, "SegmentationDataset", lambda *a, **k: seen.append(k) or real(*a, **k))
    predict.main(["--ckpt", str(out / "last.pt"), "--data-dir", str(demo_dir), "--json", "test.json", "--tta",
                  "--workers", "0", "--no-probs", "--output-dir", str(tmp_path / "p")])
    assert seen[0]["normalization"] == ckpt["normalization"]
    timing = json.loads((tmp_path / "p" / "predictions.json").read_text())["timing"]
    assert timing["tta_flips"] == [[], [-1], [-2]]  # trained with any orientation: vertical flips too
    # a checkpoint from before both existed: ImageNet statistics, and the flips and turns it was trained with
    del ckpt["normalization"], ckpt["args"]["orientation"]
    from checkpoint import trained_with
    assert trained_with(ckpt) == ({"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, "any")


@pytest.mark.slow
def test_the_default_command_starts_from_imagenet_weights_offline(demo_dir, tmp_path, monkeypatch):
    import backbones
    from train import get_args_parser
    default = get_args_parser().parse_args([]).backbone
    if importlib.util.find_spec(backbones.PACKAGED_WEIGHTS[default][1]) is None:
        pytest.skip(f"{backbones.PACKAGED_WEIGHTS[default][0]} is not installed")

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", no_network)
    out = tmp_path / "default"
    # `python train.py --fold 0 --amp`, on the demo set at a tiny size; --lr 0: the weights stay as loaded (the
    # memory-format timing skipped: it costs more than the run here, and tests/test_precision.py covers it)
    train.main(["--data-dir", str(demo_dir), "--train-json", "train_all.json", "--val-json", "none", "--amp",
                "--epochs", "1", "--img-size", "64", "-b", "4", "--workers", "0", "--output-dir", str(out),
                "--mask-cache", "none", "--lr", "0", "--no-channels-last"])
    ckpt = load(out / "last.pt")
    assert ckpt["args"]["pretrained"] and ckpt["args"]["backbone"] == default == "mobilenet_v2"
    assert ckpt["args"]["drop_path"] is None  # mobilenet has no stochastic depth
    imagenet = load(backbones.packaged_weights_file(default))
    convs = [k for k in imagenet if k.endswith("weight") and imagenet[k].ndim == 4]
    assert convs and all(torch.equal(ckpt["model"][f"encoder.net.{k}"], imagenet[k]) for k in convs)
