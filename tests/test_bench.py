"""bench.py is not a timed test: these only check that it runs end to end and writes every figure it promises."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # each runs bench.py in a subprocess
REPO = Path(__file__).resolve().parent.parent
# the training variants bench.py times: on a GPU CUDA fp16 AMP and fp32, on the CPU fp32 and bf16
VARIANTS = {"fp16 (cuda)", "fp32", "fp32+cl"} if torch.cuda.is_available() else {"fp32", "fp32+cl", "bf16", "bf16+cl"}
TINY = ["--archs", "unet", "--img-size", "32", "-b", "2", "--steps", "1", "--repeats", "1", "--batches", "2",
        "--workers", "0", "--no-memory"]


def run_bench(tmp_path, *args, env=None):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench.py"), *TINY, *args, "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_writes_loader_train_and_inference_figures(demo_dir, tmp_path):
    result, stdout = run_bench(tmp_path, "--data-dir", str(demo_dir))
    assert "machine:" in stdout and result["machine"]
    assert {(r["preset"], r["mask_cache"]) for r in result["loader"]} == {
        ("none", False), ("none", True), ("strong", False), ("strong", True)}
    assert {r["variant"] for r in result["train"]} == VARIANTS
    assert {r["tta"] for r in result["infer"]} == {"plain", "flip TTA", "flips + 3 scales"}
    rates = [r["samples_per_s"] for r in result["loader"]] + [r["train_images_per_s"] for r in result["train"]]
    assert all(rate > 0 for rate in rates)
    assert all(r["vs_fastest_train_step"] > 0 for r in result["loader"])
    assert "the loader is" in stdout and "--amp here: " in stdout  # the verdicts a reader looks for


@pytest.mark.skipif(importlib.util.find_spec("segmentation_models_pytorch") is None,
                    reason="the peer is a benchmark-only dependency (requirements-bench.txt)")
def test_bench_peer_rows_include_the_usual_setting(tmp_path):
    result, stdout = run_bench(tmp_path, "--sections", "train", "--peer", "smp")
    peer = {r["variant"] for r in result["train"] if r["impl"] == "smp"}
    assert peer == VARIANTS | {"usual: fp32, plain AdamW"}
    assert "ratio ours (train.py defaults" in stdout


def test_bench_times_the_exported_program_beside_eager(tmp_path):
    result, _ = run_bench(tmp_path, "--sections", "infer", "--exported", "--img-size", "96")  # scale 0.75: 72 px
    impls = {(r["impl"], r["tta"]) for r in result["infer"]}
    assert ("ours exported", "plain") in impls and ("ours", "plain") in impls
    assert all(r["infer_images_per_s"] > 0 for r in result["infer"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's rule: on CUDA --amp is fp16 whatever the env says")
def test_bench_inference_rows_follow_predicts_amp_rule(tmp_path):
    env = {**os.environ, "TRASHSEG_CPU_BF16": "1"}  # a CPU judged bf16-native: predict.py --amp runs bf16 there
    result, stdout = run_bench(tmp_path, "--sections", "infer", env=env)
    assert {r["precision"] for r in result["infer"]} == {"bf16"}
    assert "predict.py --amp's precision here, bf16" in stdout
