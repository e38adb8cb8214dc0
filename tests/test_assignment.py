"""The hand-written assignment solver of Mask2Former's matcher against brute force and, where installed, scipy."""
import importlib.util
import itertools

import numpy as np
import pytest
import torch

from assignment import linear_sum_assignment


def brute_force(cost):
    """The least total cost over every way of pairing min(n, m) rows and columns."""
    n, m = cost.shape
    if n <= m:
        return min(sum(cost[i, j] for i, j in enumerate(cols)) for cols in itertools.permutations(range(m), n))
    return brute_force(cost.T)


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 6), (6, 4), (5, 5), (2, 7), (7, 2)])
def test_small_random_costs_match_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for trial in range(20):
        # ties too: small integer costs have many optimal assignments
        cost = rng.normal(size=shape) if trial % 2 else rng.integers(0, 3, shape).astype(float)
        rows, cols = linear_sum_assignment(cost)
        assert len(rows) == min(shape) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        assert list(rows) == sorted(rows)
        assert cost[rows, cols].sum() == pytest.approx(brute_force(cost))


def test_a_known_matrix_and_the_edge_cases():
    cost = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = linear_sum_assignment(cost)  # 1 + 2 + 2 = 5 by hand: row 0 -> 1, row 1 -> 0, row 2 -> 2
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]
    rows, cols = linear_sum_assignment(torch.tensor(cost).T)  # a tensor, transposed
    assert cost.T[rows, cols].sum() == 5
    assert [len(a) for a in linear_sum_assignment(np.zeros((0, 4)))] == [0, 0]
    with pytest.raises(ValueError, match="NaN or infinite"):
        linear_sum_assignment(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="matrix"):
        linear_sum_assignment(np.zeros(3))


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy is not installed")
@pytest.mark.parametrize("shape", [(11, 100), (100, 11), (60, 60), (1, 200)])
def test_large_costs_match_scipy(shape):
    from scipy.optimize import linear_sum_assignment as scipy_assignment
    rng = np.random.default_rng(shape[0])
    for _ in range(5):
        cost = rng.normal(size=shape)
        rows, cols = linear_sum_assignment(cost)
        expected = scipy_assignment(cost)
        assert cost[rows, cols].sum() == pytest.approx(cost[expected].sum())
        assert rows.tolist() == expected[0].tolist()  # the same rows, in the same order
