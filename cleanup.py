"""Mask cleanup after prediction (predict.py and ensemble.py --min-region N): connected regions smaller than N
pixels, specks and holes alike, take the class that surrounds them most.

    clean = remove_small_regions(mask, 64)     # uint8 HxW class ids, at the image's own size
"""
import numpy as np


def region_labels(mask):
    """Connected regions (4-neighbours of the same class) as an int array: each pixel holds the smallest flat
    index of its region. Min-label propagation with pointer jumping: a few dozen vectorised passes."""
    h, w = mask.shape
    labels = np.arange(h * w).reshape(h, w)
    same_down, same_right = mask[1:] == mask[:-1], mask[:, 1:] == mask[:, :-1]
    while True:
        new = labels.copy()
        np.minimum(new[1:], np.where(same_down, labels[:-1], new[1:]), out=new[1:])
        np.minimum(new[:-1], np.where(same_down, labels[1:], new[:-1]), out=new[:-1])
        np.minimum(new[:, 1:], np.where(same_right, labels[:, :-1], new[:, 1:]), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_right, labels[:, 1:], new[:, :-1]), out=new[:, :-1])
        flat = new.ravel()
        flat = flat[flat]  # pointer jumping: a label's own label is in the same region and no larger
        new = flat.reshape(h, w)
        if np.array_equal(new, labels):
            return labels
        labels = new


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
