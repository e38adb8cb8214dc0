"""Benchmarks that print figures (never run as tests): data loader throughput, with and without the mask cache.

    python bench.py --data-dir ../shared/data/camvid --img-size 512 --workers 2 --presets none strong
"""
import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data import SegmentationDataset, load_coco, make_demo


def loader_samples_per_s(dataset, batch_size, workers, batches, repeats):
    """Median samples/s over `repeats` timed passes of `batches` batches, each after one warm-up batch (worker
    start-up is not counted)."""
    rates = []
    for _ in range(repeats):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                             persistent_workers=False, drop_last=True)
        it = iter(loader)
        next(it)
        t, n = time.perf_counter(), 0
        for _ in range(batches):
            try:
                images = next(it)[0]
            except StopIteration:
                break
            n += images.shape[0]
        rates.append(n / (time.perf_counter() - t))
        del it, loader
    return statistics.median(rates)


def bench_loader(args):
    coco = load_coco(args.data_dir, args.json)
    rows = []
    cache_dir = Path(tempfile.mkdtemp(prefix="bench_mask_cache_"))
    try:
        warm = SegmentationDataset(coco, args.img_size, "none", mask_cache=cache_dir)
        t = time.perf_counter()
        for i in range(len(warm)):  # fill the cache once, as the first epoch of a run does
            warm.load(i)
        fill_s = time.perf_counter() - t
        for preset in args.presets:
            for cached in (False, True):
                ds = SegmentationDataset(coco, args.img_size, preset, mask_cache=cache_dir if cached else None)
                rate = loader_samples_per_s(ds, args.batch_size, args.workers, args.batches, args.repeats)
                rows.append({"preset": preset, "mask_cache": cached, "samples_per_s": rate})
                print(f"| {preset} | {'yes' if cached else 'no'} | {rate:.1f} |", flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return rows, fill_s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parent.parent / "shared" / "data" / "camvid"
    p.add_argument("--data-dir", default=str(default_data) if default_data.is_dir() else None,
                   help="default: ../shared/data/camvid when present, else a fresh demo set")
    p.add_argument("--json", default="train_all.json")
    p.add_argument("--img-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20, help="timed batches per pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--presets", nargs="+", default=["none", "strong"])
    p.add_argument("--json-out", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()
    if args.data_dir is None:
        args.data_dir = str(make_demo(tempfile.mkdtemp(prefix="bench_demo_")))
    torch.manual_seed(0)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; data {args.data_dir}, {args.img_size}px, batch {args.batch_size}, "
          f"{args.workers} workers; median of {args.repeats} x {args.batches} batches")
    print("\n| preset | mask cache | loader samples/s |\n|---|---|---|")
    rows, fill_s = bench_loader(args)
    print(f"\nfilling the mask cache once took {fill_s:.1f} s for {len(load_coco(args.data_dir, args.json))} images")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"loader": rows, "cache_fill_s": fill_s}, indent=1))


if __name__ == "__main__":
    main()
