"""Where the crop square around the lungs goes, given the segmenter's lung mask.

The ``crop`` and ``segment`` schemes cut the classifier's input from a square around the
predicted lungs. With the plain min/max extents of every mask pixel, one stray island (a
shoulder or apex blob that appears in one copy of a film and not in another) moves the whole
square, and the score with it. A :class:`BoxRule` says how the extents are taken:

- ``keep``: only the ``keep`` largest 8-connected components count (0: all of them), and of
  those only the ones at least ``min_share`` of the largest;
- ``quantile``: the extents are the ``quantile`` and ``1 - quantile`` points of the mask's
  row and column mass instead of its first and last pixel (0: min/max);
- ``grid``: the square's centre is snapped to multiples of ``grid / 2`` pixels and its side
  rounded up to a multiple of ``grid`` (0: not snapped), so a move of a pixel or two mostly
  leaves the square where it was.

``BoxRule()`` is the min/max rule every model up to 1.3.0 was trained and run with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    """A square crop in image pixel coordinates; may extend past the image (zero padded)."""

    top: int
    left: int
    size: int


@dataclass(frozen=True)
class BoxRule:
    """How the lung extents are measured (see the module docstring)."""

    keep: int = 0
    min_share: float = 0.0
    quantile: float = 0.0
    grid: int = 0

    @property
    def name(self) -> str:
        if self == BoxRule():
            return "minmax"
        parts = []
        if self.keep:
            parts.append(f"largest{self.keep}")
            if self.min_share:
                parts.append(f"share{self.min_share:g}")
        if self.quantile:
            parts.append(f"q{self.quantile:g}")
        if self.grid:
            parts.append(f"grid{self.grid}")
        return "+".join(parts)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs of True along rows (row, start, end exclusive) and each run's 8-connected
    component root. Run-length union-find: the Python loop is over runs, not pixels."""
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
            if starts[b] <= ends[a] and starts[a] <= ends[b]:  # overlap or diagonal touch
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if ends[a] < ends[b]:
                a += 1
            else:
                b += 1
    roots = np.array([find(i) for i in range(len(rows))], dtype=np.int64)
    return rows, starts, ends, roots


def largest_components(mask: np.ndarray, keep: int, min_share: float = 0.0) -> np.ndarray:
    """``mask`` reduced to its ``keep`` largest 8-connected components (of those, only the
    ones with at least ``min_share`` of the largest one's pixels)."""
    mask = mask.astype(bool)
    rows, starts, ends, roots = _runs(mask)
    if roots.size == 0:
        return mask
    sizes = np.bincount(roots, weights=(ends - starts).astype(np.float64))
    order = np.argsort(sizes, kind="stable")[::-1][:keep]
    chosen = [int(c) for c in order if sizes[c] > 0 and sizes[c] >= min_share * sizes[order[0]]]
    take = np.isin(roots, chosen)
    h, w = mask.shape
    marks = np.zeros((h, w + 1), dtype=np.int32)
    np.add.at(marks, (rows[take], starts[take]), 1)
    np.add.at(marks, (rows[take], ends[take]), -1)
    return np.cumsum(marks, axis=1)[:, :w] > 0


def _extent(mass: np.ndarray, quantile: float) -> tuple[int, int]:
    """First and last index of a 1-d mass profile, or its ``quantile`` points."""
    nonzero = np.flatnonzero(mass)
    if quantile <= 0.0:
        return int(nonzero[0]), int(nonzero[-1])
    cumulative = np.cumsum(mass, dtype=np.float64)
    total = cumulative[-1]
    low = int(np.searchsorted(cumulative, quantile * total, side="right"))
    high = int(np.searchsorted(cumulative, (1.0 - quantile) * total, side="left"))
    return low, max(low, high)


def lung_box(mask: np.ndarray, rule: BoxRule = BoxRule()) -> Box | None:
    """Square centred on the lung extents (``rule``), side = the longer extent; None for an
    empty mask."""
    mask = mask.astype(bool)
    if not mask.any():
        return None
    if rule.keep:
        mask = largest_components(mask, rule.keep, rule.min_share)
    top, bottom = _extent(mask.sum(axis=1), rule.quantile)
    left, right = _extent(mask.sum(axis=0), rule.quantile)
    side = int(max(bottom - top + 1, right - left + 1))
    cy = (top + bottom + 1) / 2.0
    cx = (left + right + 1) / 2.0
    if rule.grid:
        half = rule.grid / 2.0
        side = int(np.ceil(side / rule.grid)) * rule.grid
        cy, cx = round(cy / half) * half, round(cx / half) * half
    return Box(top=int(round(cy - side / 2.0)), left=int(round(cx - side / 2.0)), size=side)
