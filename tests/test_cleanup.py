"""--min-region: small regions (specks and holes) take the class around them; regions of N pixels stay."""
import numpy as np

from cleanup import region_labels, remove_small_regions


def test_a_three_pixel_island_and_hole_go_and_a_region_of_n_stays():
    mask = np.zeros((12, 12), np.uint8)
    mask[2:9, 2:9] = 1            # a Paper region
    mask[4, 4:7] = 0              # a 3-pixel hole in it
    mask[10, 0:3] = 2             # a 3-pixel island of class 2 on background
    mask[0:2, 9:12] = 3           # a 6-pixel region of class 3
    clean = remove_small_regions(mask, 4)
    assert (clean[4, 4:7] == 1).all() and (clean[10, 0:3] == 0).all()
    assert (clean[0:2, 9:12] == 3).all()
    clean6 = remove_small_regions(mask, 6)  # exactly N pixels: left alone
    assert (clean6[0:2, 9:12] == 3).all()
    assert (remove_small_regions(mask, 7)[0:2, 9:12] == 0).all()
    assert np.array_equal(remove_small_regions(mask, 0), mask)


def test_regions_are_four_connected_and_per_class():
    mask = np.array([[1, 0, 1],
                     [0, 1, 0],
                     [1, 1, 1]], np.uint8)
    labels = region_labels(mask)
    assert len(np.unique(labels)) == 6  # the diagonal 1s are separate; the bottom row joins the centre
    assert labels[1, 1] == labels[2, 0] == labels[2, 2] and labels[0, 0] != labels[1, 1]


def flood_fill_labels(mask):
    """Reference: a breadth-first fill from each pixel in flat order; a region's label is its first pixel."""
    h, w = mask.shape
    labels = np.full((h, w), -1)
    for start in range(h * w):
        if labels.flat[start] >= 0:
            continue
        labels.flat[start], queue = start, [divmod(start, w)]
        while queue:
            y, x = queue.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and labels[ny, nx] < 0 and mask[ny, nx] == mask[y, x]:
                    labels[ny, nx] = start
                    queue.append((ny, nx))
    return labels


def test_region_labels_match_a_flood_fill_on_random_masks():
    rng = np.random.default_rng(0)
    for shape, classes in (((17, 23), 2), ((9, 31), 3), ((30, 7), 2), ((1, 12), 2), ((12, 1), 3)):
        mask = rng.integers(0, classes, shape).astype(np.uint8)
        assert np.array_equal(region_labels(mask), flood_fill_labels(mask))
    spiral = np.zeros((9, 9), np.uint8)  # one long snaking region: many propagation steps
    spiral[1, 1:8] = spiral[1:8, 7] = spiral[7, 1:8] = spiral[3:8, 1] = spiral[3, 1:6] = spiral[3:6, 5] = 1
    assert np.array_equal(region_labels(spiral), flood_fill_labels(spiral))
