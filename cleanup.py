"""Mask cleanup after prediction (predict.py and ensemble.py --min-region N): connected regions smaller than N
pixels, specks and holes alike, take the class that surrounds them most.

    clean = remove_small_regions(mask, 64)     # uint8 HxW class ids, at the image's own size
"""
import numpy as np


def region_labels(mask):
    """Connected regions (4-neighbours of the same class) as an int array: each pixel holds the smallest flat
    index of its region. Works on runs (row stretches of one class), which are few: runs that touch vertically
    are joined by min-label propagation with pointer jumping."""
    h, w = mask.shape
    flat = mask.ravel()
    starts = np.ones(h * w, bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::w] = True  # every row starts a run
    run_of = np.cumsum(starts) - 1  # each pixel's run
    run_start = np.flatnonzero(starts)  # a run's first flat index: runs are numbered in flat order
    # two runs overlap in one stretch of columns: take each touching pair once, where either run begins
    touch = (mask[1:] == mask[:-1]).ravel() & (starts[:-w] | starts[w:])
    pairs = np.stack([run_of[:-w][touch], run_of[w:][touch]])
    root = np.arange(len(run_start))  # root[r] <= r, always a run of r's region
    while True:
        joined = np.minimum(root[pairs[0]], root[pairs[1]])
        new = root.copy()
        np.minimum.at(new, pairs[0], joined)
        np.minimum.at(new, pairs[1], joined)
        new = new[new]  # pointer jumping
        if np.array_equal(new, root):
            return run_start[root][run_of].reshape(h, w)
        root = new


def remove_small_regions(mask, min_region):
    """Regions of fewer than min_region pixels get the class most common among the pixels bordering them
    (4-neighbours outside the region); a region with no border (the whole image) stays. Two passes, so that a
    speck inside a removed speck settles too."""
    if not min_region or min_region <= 1:
        return mask
    for _ in range(2):
        labels = region_labels(mask)
        sizes = np.bincount(labels.ravel(), minlength=labels.size)
        small = sizes[labels] < min_region
        if not small.any():
            break
        regions = np.unique(labels[small])  # the small regions' labels, sorted: votes has a row for each
        votes = np.zeros((len(regions), int(mask.max()) + 1), np.int64)
        for a, b in (((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
                     ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                     ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                     ((slice(None), slice(None, -1)), (slice(None), slice(1, None)))):
            border = small[a] & (labels[a] != labels[b])  # a pixel of a small region beside another region
            np.add.at(votes, (np.searchsorted(regions, labels[a][border]), mask[b][border].astype(np.int64)), 1)
        row = np.searchsorted(regions, labels[small])  # each small-region pixel's row of votes
        mask = mask.copy()
        mask[small] = np.where(votes.sum(1)[row] > 0, votes.argmax(1)[row], mask[small])
    return mask
