"""Every command in README.md's and docs/training.md's bash blocks runs, in order, on a tiny data root, shrunk by
overrides appended to it (argparse keeps the last value). Commands that cannot run on a CPU-only machine without a
network are listed in SKIPPED with the reason, and printed."""
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "docs" / "training.md"]
# train.py's overrides (also cv.py's, which passes them on); a narrow head and no memory-format timing: what each
# run costs beyond importing torch (22 s -> 7 s a run)
TINY_TRAINING = ["--epochs", "1", "--img-size", "64", "-b", "4", "--workers", "0", "--print-freq", "100",
                 "--head-channels", "32", "--no-channels-last"]
SHRINK = {  # script -> overrides appended to each of its commands
    "train.py": TINY_TRAINING,
    "predict.py": ["--workers", "0"],
    "folds.py": ["--k", "2"],
    "data.py": ["--num-images", "12"],
    "cv.py": TINY_TRAINING,
    # a 1-epoch demo model doubts nearly every photo (review.py says so): a list of them all would leave
    # train.py --exclude nothing; its doubt-based score at 0.95 lists few
    "review.py": ["--image-score", "max", "--exclude-above", "0.95"],
}
OFFLINE_WEIGHTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2")
DEFAULT_BACKBONE = "mobilenet_v2"  # train.py's default
SKIPPED = {  # how a command starts -> why it is not run here
    "python3 -m venv": "sets up the environment this test already runs in",
    ".venv/bin/pip install": "installs the packages this test already runs with",
    ".venv/bin/python -m pytest": "the test suite itself, which is running this test",
    "torchrun": "several processes on GPUs (NCCL); tests/test_train.py runs two CPU processes with gloo instead",
    "bash tools/gpu_check.sh": "needs a CUDA GPU (and its 'prepare' a network); tests/test_cuda.py holds its tests",
}


def weights_offline(backbone):
    """Whether a backbone's ImageNet weights are installed as a package (the others would need a download)."""
    import backbones
    return backbone in OFFLINE_WEIGHTS and backbones.packaged_weights_file(backbone, required=False) is not None


def commands(path):
    """The commands of a file's bash blocks, in order: comments dropped, '&&' chains split."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("&&\n", "&& ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                found.append(tokens[:cut])
                tokens = tokens[cut + 1:]
    return found


def why_skipped(tokens):
    text = " ".join(tokens)
    for start, why in SKIPPED.items():
        if text.startswith(start):
            return why
    if "--format" in tokens and "onnx" in tokens and importlib.util.find_spec("onnx") is None:
        return "ONNX export needs onnx, onnxscript and onnxruntime, not installed"
    return None


def placeholders(work):
    """README's placeholders -> the folders this test's commands made (resolved when each command runs)."""
    newest_cv = sorted(work.glob("runs/cv_*/oof/fold0"))
    return {"D": "data", "F": "data/folds", "runs/x/": f"runs/upernet_{DEFAULT_BACKBONE}_fold0/",
            "oof/a": "oof/x_fold0", "oof/b": str(newest_cv[-1].relative_to(work)) if newest_cv else "oof/b",
            "preds/a": "preds/demo_fold0", "preds/b": "preds/demo_fold1", "preds/c": "preds/pseudo"}


def shrunk(tokens, work):
    """The command as this test runs it: our python, the repository's scripts, placeholders mapped, overrides."""
    mapping = placeholders(work)
    out = []
    for token in tokens:
        for name, real in mapping.items():
            if token == name or (name.endswith("/") and token.startswith(name)) or token.startswith(name + "/"):
                token = real + token[len(name):]
        if "*" in token:
            out += sorted(str(p.relative_to(work)) for p in work.glob(token))
        else:
            out.append(token)
    if out[0] in ("python", ".venv/bin/python"):
        out[0] = sys.executable
    script = Path(out[1]).name if len(out) > 1 else ""
    if (REPO / script).is_file():
        out[1] = str(REPO / script)
    extra = list(SHRINK.get(script, []))
    if script == "cv.py" and "--" not in out:
        extra = ["--"] + extra
    if "--minutes" in out:  # a time budget instead of epochs: a few seconds of it
        at = extra.index("--epochs")
        extra = extra[:at] + extra[at + 2:] + ["--minutes", "0.02"]
    if "mask2former" in out:
        extra += ["--queries", "8", "--dec-layers", "2"]
    backbone = out[out.index("--backbone") + 1] if "--backbone" in out else DEFAULT_BACKBONE
    if script in ("train.py", "cv.py") and not weights_offline(backbone):
        extra.append("--no-pretrained")  # torchvision's download cannot be reached here
    return out + extra


def write_mit_weights(cmd, work):
    """SegFormer's MiT ImageNet files are NVIDIA's (non-commercial licence, not packaged): a command that loads one
    gets a random file of the same encoder's tensors in its place (tests/test_mit.py checks the official names)."""
    weights = cmd[cmd.index("--weights") + 1] if "--weights" in cmd else ""
    if Path(weights).name.startswith("mit_b") and not (work / weights).exists():
        from model import build_model
        backbone = Path(weights).stem
        torch.save(build_model("segformer", backbone, 3, pretrained=False).encoder.net.state_dict(), work / weights)


def make_extras(work):
    """What README's commands expect of a competition data root beyond the demo set: train.json / val.json, a
    folder of the user's own photos, a list of doubtful images."""
    data = work / "data"
    data.symlink_to(work / "demo", target_is_directory=True)
    shutil.copy(data / "folds" / "train_fold0.json", data / "train.json")
    shutil.copy(data / "folds" / "val_fold0.json", data / "val.json")
    (data / "my_photos").mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(data / "my_photos" / f"photo{i}.jpg")
    first = sorted((data / "images").iterdir())[0]
    (work / "doubtful.txt").write_text(f"# a doubtful photo\nimages/{first.name}\n")


@pytest.mark.slow
def test_every_readme_command_runs_in_order(tmp_path, capsys):
    work = tmp_path
    env_cache = ["--mask-cache", str(tmp_path / "cache")]
    ran, skipped, seconds = [], [], []
    for doc in DOCS:
        for tokens in commands(doc):
            why = why_skipped(tokens)
            if why:
                skipped.append(f"{doc.name}: {shlex.join(tokens)[:90]}  -- {why}")
                continue
            cmd = shrunk(tokens, work)
            write_mit_weights(cmd, work)
            if Path(cmd[1]).name in ("train.py", "predict.py", "cv.py"):
                cmd += env_cache
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
            seconds.append((time.perf_counter() - start, shlex.join(tokens)[:100]))
            assert done.returncode == 0, (f"{doc.name}: {shlex.join(tokens)}\nran as: {shlex.join(cmd)}\n"
                                          f"{done.stdout[-2500:]}\n{done.stderr[-2500:]}")
            ran.append(shlex.join(tokens))
            if "ensembles/demo" in tokens:
                make_extras(work)  # the quick start has made demo/: it now stands in for a data root
    with capsys.disabled():
        print(f"\nREADME commands: {len(ran)} ran, {len(skipped)} skipped:")
        for line in skipped:
            print("  skipped " + line)
        print(f"the slowest of {sum(s for s, _ in seconds):.0f} s:")
        for took, text in sorted(seconds, reverse=True)[:8]:
            print(f"  {took:5.1f} s  {text}")
    assert len(ran) >= 30
    assert all(any(w in s for w in ("gpu_check.sh", "torchrun", ".venv", "onnx")) for s in skipped), skipped
