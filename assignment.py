"""The linear assignment problem (Hungarian matching): Mask2Former's set loss pairs each target mask with the query
whose prediction costs least, every target with a different query. Hand-written, as the runtime packages have no
solver (scipy's linear_sum_assignment gives the same answer; tests/test_assignment.py checks both).

    rows, cols = linear_sum_assignment(cost)     # cost: (n, m) array; min(n, m) pairs of least total cost

Shortest augmenting paths with row and column potentials (Kuhn-Munkres in the Jonker-Volgenant form), O(n^2 m) for
n <= m, each row's search vectorised over the columns with numpy: a 100-query x 11-class matching is a few dozen
array operations.
"""
import numpy as np


def linear_sum_assignment(cost):
    """(row indices, column indices) of a minimum-cost assignment of min(n, m) pairs, rows in ascending order, as
    scipy.optimize.linear_sum_assignment returns them. cost: a finite (n, m) array (a torch tensor is converted)."""
    cost = np.asarray(cost.detach().cpu() if hasattr(cost, "detach") else cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"the cost must be a matrix, not of shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("the cost matrix holds NaN or infinite entries")
    if cost.shape[0] > cost.shape[1]:  # the search adds rows one by one: fewer rows than columns
        cols, rows = linear_sum_assignment(cost.T)
        order = np.argsort(rows)
        return rows[order], cols[order]
    n, m = cost.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # potentials; index 0 is the virtual start of each search
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: the row (1-based) holding column j, 0 for none
    for row in range(1, n + 1):
        owner[0], col = row, 0
        reach = np.full(m + 1, np.inf)  # the least reduced cost to reach each column in this search
        came_from = np.zeros(m + 1, dtype=np.int64)
        done = np.zeros(m + 1, dtype=bool)
        while owner[col] != 0:  # grow the tree of tight edges until it reaches a free column
            done[col] = True
            r = owner[col]
            reduced = cost[r - 1] - u[r] - v[1:]
            free = ~done[1:]
            better = free & (reduced < reach[1:])
            reach[1:][better] = reduced[better]
            came_from[1:][better] = col
            masked = np.where(free, reach[1:], np.inf)
            nxt = int(np.argmin(masked)) + 1
            delta = masked[nxt - 1]
            u[owner[done]] += delta
            v[done] -= delta
            reach[~done] -= delta
            col = nxt
        while col:  # flip the path: each column on it passes to the row that reached it
            prev = came_from[col]
            owner[col] = owner[prev]
            col = prev
    cols = np.flatnonzero(owner[1:])
    rows = owner[1:][cols] - 1
    order = np.argsort(rows)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)
