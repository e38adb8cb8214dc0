"""Stratified group k-fold split of a COCO JSON into train_fold{i}.json / val_fold{i}.json.

    python folds.py                                     # data/train_all.json -> data/folds/, k=5, by pixels
    python folds.py --data-dir D --output-dir F --k 5 --by objects --group-pattern 'vid_[0-9]+'

Each group (an image, or the images whose file_name share what --group-pattern matches) lands in exactly one
validation fold. Groups are placed greedily, those holding the rarest classes first, each into the fold where it
brings every class's share of validation pixels (or objects) closest to 1/k, so a class held by at least k groups
reaches every validation fold.
"""
import argparse
import re
import sys
from pathlib import Path

import numpy as np

from coco import DataError, load_coco, pixel_counts, read_exclude_list
from outputs import WriteError, write_json


def image_groups(file_names, pattern=None):
    """Group id per image: the part of file_name the regex matches, or the whole name (each image its own group)."""
    if not pattern:
        return list(file_names)
    regex = re.compile(pattern)
    groups = []
    for name in file_names:
        m = regex.search(name)
        groups.append(m.group(0) if m else name)  # an image the pattern misses stays a group of its own
    return groups


def stratified_group_kfold(counts, groups, k=5, seed=42):
    """Fold index (0..k-1) per image. counts: (num_images, num_classes) pixel or object counts."""
    counts = np.asarray(counts, np.float64)
    group_names = sorted(set(groups))
    if len(group_names) < k:
        raise ValueError(f"{len(group_names)} groups cannot fill {k} folds")
    index = {g: i for i, g in enumerate(group_names)}
    member = np.array([index[g] for g in groups])
    group_counts = np.zeros((len(group_names), counts.shape[1]))
    np.add.at(group_counts, member, counts)
    group_sizes = np.bincount(member, minlength=len(group_names)).astype(np.float64)

    totals = group_counts.sum(0)
    present = totals > 0
    share = group_counts[:, present] / totals[present]       # each class weighs the same, however rare
    holders = (group_counts[:, present] > 0).sum(0)          # groups holding each class
    rarity = np.where(group_counts[:, present] > 0, holders, np.inf).min(1)  # rarest class a group holds
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(group_names))                # seeded tie-break, then rarest classes, then larger
    order = order[np.lexsort((-group_sizes[order], -share[order].max(1), rarity[order]))]

    fold_share = np.zeros((k, share.shape[1]))
    fold_size = np.zeros(k)
    size_share = group_sizes / group_sizes.sum()
    fold_of_group = np.empty(len(group_names), int)
    target = 1.0 / k
    for g in order:
        # squared distance to the ideal 1/k of every class's share and of the image count, before and after
        after = ((fold_share + share[g] - target) ** 2).sum(1) + (fold_size + size_share[g] - target) ** 2
        before = ((fold_share - target) ** 2).sum(1) + (fold_size - target) ** 2
        cost = after - before
        best = np.flatnonzero(cost <= cost.min() + 1e-12)
        f = best[np.argmin(fold_size[best])]
        fold_of_group[g] = f
        fold_share[f] += share[g]
        fold_size[f] += size_share[g]
    return fold_of_group[member]


def random_folds(groups, k=5, seed=42):
    """A seeded random split of the groups, the baseline that folds should beat."""
    names = sorted(set(groups))
    perm = np.random.default_rng(seed).permutation(len(names))
    fold_of = {names[i]: j % k for j, i in enumerate(perm)}
    return np.array([fold_of[g] for g in groups])


def class_holders(counts, groups):
    """Number of groups holding each class."""
    counts = np.asarray(counts)
    return np.array([len({g for g, n in zip(groups, counts[:, c]) if n > 0}) for c in range(counts.shape[1])])


def fold_table(counts, folds, class_names, k, holders, unit="pixels"):
    """Per fold: val images and each class's share of the val pixels (%), against the whole set, and the largest
    relative deviation |fold share - whole share| / whole share over the classes held by at least k groups (a
    class in fewer groups cannot reach every fold, so its deviation says nothing about the split)."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(0)
    whole = totals / max(totals.sum(), 1)
    present = totals > 0
    judged = present & (holders >= k)
    width = max(8, max(len(n) for n in class_names) + 1)

    def row(label, n_images, shares, dev=None):
        cells = "".join(f"{100 * s:>{width}.3f}" if p else f"{'-':>{width}}" for s, p in zip(shares, present))
        return f"{label:<8}{n_images:>7}{cells}" + (f"{100 * dev:>8.1f}%" if dev is not None else "")

    lines = [f"val share of {unit} per class (%), whole set first; '-' = class absent from the set",
             f"{'':<8}{'images':>7}" + "".join(f"{n[:width - 1]:>{width}}" for n in class_names) + f"{'max dev':>9}",
             row("all", len(folds), whole)]
    worst = 0.0
    for f in range(k):
        val = counts[folds == f].sum(0)
        fold_share = val / max(val.sum(), 1)
        dev = (np.abs(fold_share[judged] - whole[judged]) / whole[judged]).max(initial=0.0)
        worst = max(worst, dev)
        lines.append(row(f"fold {f}", int((folds == f).sum()), fold_share, dev))
    unjudged = [class_names[c] for c in np.flatnonzero(present & ~judged)]
    if unjudged:
        lines.append(f"max dev leaves out classes held by fewer than {k} groups: {', '.join(unjudged)}")
    missing = [(class_names[c], f) for c in np.flatnonzero(present) for f in range(k)
               if counts[folds == f, c].sum() == 0]
    return "\n".join(lines), worst, missing


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--json", default="train_all.json")
    p.add_argument("--output-dir", help="where fold JSONs go (default: <data-dir>/folds)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--by", choices=("pixels", "objects"), default="pixels", help="what the folds balance")
    p.add_argument("--group-pattern", help="regex; images whose file_name match the same text form one group")
    p.add_argument("--compare-random", action="store_true", help="also print a seeded random split's table")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--exclude", metavar="FILE", help="file_names to leave out, one per line ('#' comments)")
    args = p.parse_args()
    try:
        coco = load_coco(args.data_dir, args.json, skip_bad=args.skip_bad, check_files=False)
        if args.exclude:  # before anything else: excluded images are in no fold
            names, record = read_exclude_list(args.exclude)
            print(f"excluded {coco.excluding(names)} of {coco.json_path}'s images ({record['count']} listed in "
                  f"{args.exclude}, sha1 {record['sha1'][:12]})")
    except DataError as e:
        sys.exit(f"error: {e}")
    counts = pixel_counts(coco, by=args.by)
    groups = image_groups([img["file_name"] for img in coco.images], args.group_pattern)
    try:
        folds = stratified_group_kfold(counts, groups, args.k, args.seed)
    except ValueError as e:
        sys.exit(f"error: {coco.json_path}: {e}")

    out_dir = Path(args.output_dir) if args.output_dir else Path(args.data_dir) / "folds"
    ids = np.array([img["id"] for img in coco.images])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in range(args.k):
            # only what the loader accepted: with --skip-bad, dropped images and annotations stay out of the folds
            write_json(out_dir / f"train_fold{f}.json", coco.to_dict(ids[folds != f].tolist()))
            write_json(out_dir / f"val_fold{f}.json", coco.to_dict(ids[folds == f].tolist()))
        # fold files of an earlier, larger k would be taken for folds of this split (cv.py runs every val_fold<i>)
        stale = [p for p in out_dir.glob("*_fold*.json") if p.stem.split("_fold")[0] in ("train", "val")
                 and p.stem.split("_fold")[1].isdigit() and int(p.stem.split("_fold")[1]) >= args.k]
        for path in stale:
            path.unlink()
        if stale:
            print(f"removed {len(stale)} fold files of an earlier split with more folds from {out_dir}")
    except (WriteError, OSError) as e:
        sys.exit(f"error: {e} (the data root may be read-only: --output-dir elsewhere)")
    print(f"{coco.json_path}: {len(ids)} images in {len(set(groups))} groups -> {args.k} folds in {out_dir}")
    holders = class_holders(counts, groups)
    table, worst, missing = fold_table(counts, folds, coco.class_names, args.k, holders, args.by)
    print(table)
    print(f"largest relative deviation: {100 * worst:.1f}%")
    for name, f in missing:
        c = coco.class_names.index(name)
        note = f" (held by {holders[c]} group(s), fewer than {args.k} folds)" if holders[c] < args.k else ""
        print(f"note: {name} has no {args.by} in val fold {f}{note}")
    if args.compare_random:
        rand = random_folds(groups, args.k, args.seed)
        table, rworst, rmissing = fold_table(counts, rand, coco.class_names, args.k, holders, args.by)
        print("\nseeded random split of the same groups:\n" + table)
        print(f"largest relative deviation: {100 * rworst:.1f}% (ours {100 * worst:.1f}%); "
              f"class-fold pairs with no {args.by}: {len(rmissing)} (ours {len(missing)})")


if __name__ == "__main__":
    main()
