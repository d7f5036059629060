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

from screener.imaging.components import largest_components


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
    empty mask.

    Extents without quantiles need only where the mask has a pixel per row and column: two
    ``any`` reductions of the mask as it is (0.03 ms at 512 px, against 0.17 for a boolean
    copy and two integer sums, which only the quantile rules need)."""
    mask = np.asarray(mask, dtype=bool)
    if rule.keep and mask.any():
        mask = largest_components(mask, rule.keep, rule.min_share)
    profile = np.any if rule.quantile <= 0.0 else np.sum
    rows = profile(mask, axis=1)
    if not rows.any():
        return None
    top, bottom = _extent(rows, rule.quantile)
    left, right = _extent(profile(mask, axis=0), rule.quantile)
    side = int(max(bottom - top + 1, right - left + 1))
    cy = (top + bottom + 1) / 2.0
    cx = (left + right + 1) / 2.0
    if rule.grid:
        half = rule.grid / 2.0
        side = int(np.ceil(side / rule.grid)) * rule.grid
        cy, cx = round(cy / half) * half, round(cx / half) * half
    return Box(top=int(round(cy - side / 2.0)), left=int(round(cx - side / 2.0)), size=side)
