"""Write a checkpoint of an --ema run's trained weights in place of their average, so that predict.py (and cv.py's
comparisons) can score both from one run: EMA against none on the very same trajectory.

    python tools/trained_weights.py runs/x/last.pt runs/x/last_trained.pt
    python predict.py --ckpt runs/x/last_trained.pt --json folds/val_fold0.json --eval --output-dir oof_trained/fold0
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import read_checkpoint, save_checkpoint  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a train.py --ema checkpoint")
    p.add_argument("output", help="the checkpoint to write, with the trained weights as 'model'")
    args = p.parse_args()
    ckpt = read_checkpoint(args.ckpt)
    if "train_model" not in ckpt:
        sys.exit(f"error: {args.ckpt} was not trained with --ema: its 'model' already holds the trained weights")
    ckpt["model"] = ckpt.pop("train_model")
    ckpt.pop("ema_updates", None)
    ckpt["args"] = dict(ckpt["args"], ema=None)
    save_checkpoint(ckpt, Path(args.output))
    print(f"wrote {args.output}: the trained weights of {args.ckpt} (epoch {ckpt['epoch']})")


if __name__ == "__main__":
    main()
