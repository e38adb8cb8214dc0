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
