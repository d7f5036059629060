"""Connected components of boolean masks, by run-length union-find (numpy only).

Used where a mask must lose its stray islands: the heatmap's body mask and lung contour
(screener.reports.heatmap) and the crop-square rules measured for issue 14
(screener.imaging.lung_box). Vectorised over runs: no Python loop over runs or pixels.
"""

from __future__ import annotations

import numpy as np


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of True along rows: row, start, end (exclusive), in row-major order.

    Each row is padded with False on both sides and the whole image read as one flat
    array: a run starts after and ends at a change between neighbours, and no change
    crosses from one padded row to the next (1-D flatnonzero: a quarter of the cost of a
    2-D nonzero of the row differences)."""
    h, w = mask.shape
    width = w + 2
    padded = np.zeros((h, width), dtype=bool)
    padded[:, 1:-1] = mask
    flat = padded.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1])  # the last pixel before each change
    rows, cols = np.divmod(change, width)
    # after padded column c comes a run's first True (a start) or the first False after it
    # (its exclusive end): padded column c + 1, image column c; starts and ends alternate
    return rows[0::2], cols[0::2], cols[1::2]


def union_find_runs(
    mask: np.ndarray, diagonal: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs of True along rows (row, start, end exclusive) and each run's component root,
    8-connected (``diagonal``) or 4-connected; the root is the component's first run (in
    row-major order), so callers that break ties by root get the same order as before.

    Vectorised: the runs of adjacent rows that touch are paired with two searchsorted
    calls (a row's runs are sorted and disjoint, so the runs below one run that touch it
    are a contiguous range), then labels are propagated by hooking the larger label onto
    the smaller and pointer jumping, a handful of numpy passes instead of a Python loop
    over runs (a 256-px random mask: 10-15 -> 1-2 ms)."""
    touch = 0 if diagonal else 1
    rows, starts, ends = _runs(mask)
    labels = np.arange(rows.size, dtype=np.int64)
    if rows.size < 2:
        return rows, starts, ends, labels
    # one sorted key per run start and end; rows are width apart, so no key of one row
    # reaches into the next (ends <= w, and a touching start is at most w)
    width = mask.shape[1] + 2
    base = rows * width
    below = base + width  # where the next row's keys begin
    first = np.searchsorted(base + ends, below + starts + touch, side="left")
    stop = np.searchsorted(base + starts, below + ends - touch, side="right")
    count = np.maximum(stop - first, 0)
    total = int(count.sum())
    if total == 0:
        return rows, starts, ends, labels
    upper = np.repeat(np.arange(rows.size), count)
    lower = np.repeat(first - (np.cumsum(count) - count), count) + np.arange(total)
    while True:
        a, b = labels[upper], labels[lower]
        differ = a != b
        if not differ.any():
            break
        # every label is a run of the same component, and only decreases: at the fixed
        # point each component carries its smallest run index
        np.minimum.at(labels, np.maximum(a, b)[differ], np.minimum(a, b)[differ])
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
    return rows, starts, ends, labels


def paint_runs(
    shape: tuple[int, int], rows: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> np.ndarray:
    """Boolean image of the given runs, in row-major order (vectorised: the flat image is
    alternately False and True between the runs' bounds, one ``np.repeat``).

    The runs are those of one mask, in its order: they do not overlap and never touch in a
    row (a run ends, exclusive, on a False pixel), so the bounds are non-decreasing (a run
    ending at a row's end may meet one starting the next row: a False stretch of length 0)."""
    h, w = shape
    bounds = np.empty(2 * rows.size + 2, dtype=np.int64)
    bounds[0] = 0
    base = rows * w
    bounds[1:-1:2] = base + starts
    bounds[2:-1:2] = base + ends
    bounds[-1] = h * w
    alternate = np.zeros(bounds.size - 1, dtype=bool)
    alternate[1::2] = True
    return np.repeat(alternate, np.diff(bounds)).reshape(h, w)


def component_sizes(mask: np.ndarray) -> list[int]:
    """Pixel counts of the 8-connected components of ``mask``, largest first."""
    _, starts, ends, roots = union_find_runs(mask.astype(bool))
    if roots.size == 0:
        return []
    sizes = np.bincount(roots, weights=(ends - starts).astype(np.float64))
    return sorted((int(s) for s in sizes if s > 0), reverse=True)


def largest_components(mask: np.ndarray, keep: int = 2, min_share: float = 0.0) -> np.ndarray:
    """``mask`` reduced to its ``keep`` largest 8-connected components (and of those, only
    the ones at least ``min_share`` of the largest)."""
    rows, starts, ends, roots = union_find_runs(mask.astype(bool))
    if roots.size == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(roots, weights=(ends - starts).astype(np.float64))
    order = np.argsort(sizes, kind="stable")[::-1][:keep]
    chosen = [int(c) for c in order if sizes[c] > 0 and sizes[c] >= min_share * sizes[order[0]]]
    take = np.isin(roots, chosen)
    return paint_runs(mask.shape, rows[take], starts[take], ends[take])


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus every background region that does not reach the image border (the
    background 4-connected, the dual of an 8-connected mask: a diagonal gap in the mask's
    outline does not make a hole reach the border)."""
    background = ~mask.astype(bool)
    rows, starts, ends, roots = union_find_runs(background, diagonal=False)
    if roots.size == 0:
        return mask.astype(bool)
    h, w = mask.shape
    border = (rows == 0) | (rows == h - 1) | (starts == 0) | (ends == w)
    outside = np.isin(roots, np.unique(roots[border]))
    return ~paint_runs(mask.shape, rows[outside], starts[outside], ends[outside])
