"""Connected components of boolean masks, by run-length union-find (numpy only).

Used where a mask must lose its stray islands: the heatmap's body mask and lung contour
(screener.reports.heatmap) and the crop-square rules measured for issue 14
(screener.imaging.lung_box). The Python loop is over runs, not pixels.
"""

from __future__ import annotations

import numpy as np


def union_find_runs(
    mask: np.ndarray, diagonal: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs of True along rows (row, start, end exclusive) and each run's component root,
    8-connected (``diagonal``) or 4-connected. Run-length labelling: the Python loop is over
    runs, not pixels."""
    touch = 0 if diagonal else 1
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # row-major order: pairs with the starts
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(h + 1))  # runs of row r: first[r]:first[r+1]
    for r in range(h - 1):
        a, a_end = int(first[r]), int(first[r + 1])
        b, b_end = a_end, int(first[r + 2])
        while a < a_end and b < b_end:
            # runs overlap (4-connected) or also touch diagonally (8-connected)
            if starts[b] + touch <= ends[a] and starts[a] + touch <= ends[b]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if ends[a] < ends[b]:
                a += 1
            else:
                b += 1
    roots = np.array([find(i) for i in range(len(rows))], dtype=np.int64)
    return rows, starts, ends, roots


def paint_runs(
    shape: tuple[int, int], rows: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> np.ndarray:
    """Boolean image of the given runs (vectorised: +1/-1 at run ends, cumulative sum).

    The runs are those of one mask: in a row they do not overlap and never touch (a run
    ends, exclusive, on a False pixel), so no two marks share a position and plain
    assignment does what ``np.add.at`` did at a tenth of its cost."""
    h, w = shape
    marks = np.zeros((h, w + 1), dtype=np.int8)
    marks[rows, starts] = 1
    marks[rows, ends] = -1
    return np.cumsum(marks, axis=1, dtype=np.int8)[:, :w] > 0


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
