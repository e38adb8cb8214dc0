"""The GPU paths: fp16 autocast with GradScaler, channels_last, torch.compile, resume under fp16, predict --amp,
NCCL DDP. Skipped without CUDA (CI and the CPU suite); tools/gpu_check.sh runs them with `pytest -m cuda`."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train
from model import ARCHS, build_model
from optim import build_optimizer
from test_train import tiny_args

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REPO = Path(__file__).resolve().parent.parent


def gpu_args(demo_dir, out, *extra):
    return tiny_args(demo_dir, out, "--device", "cuda", "--img-size", "64", *extra)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_channels_last_steps_change_the_weights(arch):
    device = torch.device("cuda")
    model = build_model(arch, "resnet18", 5).to(device).to(memory_format=torch.channels_last).train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    optimizer = build_optimizer(model, "adamw", lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    convs = []  # the convolutions must run in fp16; the final bilinear upsampling autocasts to fp32 on CUDA
    model.encoder.register_forward_hook(lambda module, inputs, output: convs.append(output[-1].dtype))
    x = torch.randn(4, 3, 96, 128, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (4, 96, 128), device=device)
    for _ in range(3):  # GradScaler skips a step whose scaled gradients overflow: the first one may be skipped
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        assert torch.isfinite(loss) and logits.shape == (4, 5, 96, 128)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert convs == [torch.float16] * 3
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2


def test_compile_trains_one_tiny_epoch(demo_dir, tmp_path):
    out = tmp_path / "compiled"
    train.main(gpu_args(demo_dir, out, "--epochs", "1", "--amp", "--compile"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                      if v.is_floating_point())
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])  # saved without the compile wrapper


def largest_weight_gap(a, b):
    return max((a["model"][k].float() - b["model"][k].float()).abs().max().item()
               for k in a["model"] if a["model"][k].is_floating_point())


def test_a_resumed_fp16_run_ends_as_an_uninterrupted_one(demo_dir, tmp_path):
    # CUDA's bilinear-upsampling backward adds with atomics, so two uninterrupted runs already end a little apart:
    # the resumed run must end as close to an uninterrupted one as a second uninterrupted run does; a resume that
    # lost the optimizer's, the scaler's or the RNG's state lands far outside that noise
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    common = ["--epochs", "3", "--amp", "--seed", "3", "--aug", "none"]
    train.main(gpu_args(demo_dir, tmp_path / "straight", *common))
    train.main(gpu_args(demo_dir, tmp_path / "again", *common))
    train.main(gpu_args(demo_dir, tmp_path / "stopped", *common, "--stop-after", "1"))
    train.main(["--resume", str(tmp_path / "stopped" / "last.pt")])
    a, again, b = (torch.load(tmp_path / n / "last.pt", weights_only=True) for n in ("straight", "again", "stopped"))
    assert a["epoch"] == b["epoch"] == 2 and a["scaler"]["scale"] == b["scaler"]["scale"]
    resumed_gap, noise = largest_weight_gap(a, b), largest_weight_gap(a, again)
    assert resumed_gap <= 3 * noise + 1e-4, (resumed_gap, noise)


def test_predict_amp_masks_agree_with_fp32(demo_dir, tmp_path):
    train.main(gpu_args(demo_dir, tmp_path / "run", "--epochs", "2", "--amp"))
    common = ["--ckpt", str(tmp_path / "run" / "best.pt"), "--data-dir", str(demo_dir), "--json", "test.json",
              "--device", "cuda", "--workers", "0", "--no-probs", "--mask-cache", "none"]
    predict.main([*common, "--output-dir", str(tmp_path / "fp32")])
    predict.main([*common, "--amp", "--output-dir", str(tmp_path / "fp16")])
    same = total = 0
    for mask in (tmp_path / "fp32" / "masks").rglob("*.png"):
        a = np.array(Image.open(mask))
        b = np.array(Image.open(tmp_path / "fp16" / mask.relative_to(tmp_path / "fp32")))
        same, total = same + (a == b).sum(), total + a.size
    assert total and same / total >= 0.99


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs two GPUs")
def test_two_gpu_nccl_ddp_trains_and_validates(demo_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train.py", *gpu_args(demo_dir, out, "--epochs", "1", "--amp", "--sync-bn", "-b", "2")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("val" in r and r["val"]["mIoU"] > 0 for r in records)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0
