"""Heat-map post-processing, numpy only: the CAM's share inside the lungs, the maps at the
networks' grid brought to the display image for the reports, and the geometry of the
occlusion-sensitivity alternative (the engine calls themselves are in :mod:`.models`)."""

from __future__ import annotations

import numpy as np

from screener.imaging.preprocess import Box, paste_back, resize, to_uint8
from screener.results import ImageResult

OCCLUSION_PATCH = 56
OCCLUSION_STRIDE = 28

# uint8 level -> [0, 1]; float16 holds k / 255 closely enough that rint(x * 255) == k
_UNIT_FLOATS = (np.arange(256, dtype=np.float32) / np.float32(255.0)).astype(np.float16)


def heatmap_lung_fraction(cam: np.ndarray, lung_mask: np.ndarray) -> float | None:
    """Share of the positive CAM mass that lies inside the lung mask (None: no mass)."""
    positive = np.clip(cam, 0.0, None)
    total = float(positive.sum())
    if total <= 0.0:
        return None
    return float(positive[lung_mask].sum() / total)


def expand_to_display(result: ImageResult, display: np.ndarray | None) -> None:
    """Fill the display-size arrays the reports draw (display image, lung mask, CAM in
    [0, 1], crop box) from the result's maps at the networks' grid."""
    grid = result.grid
    if grid is None or display is None:
        return
    result.display_image = display
    result.lung_mask = resize(grid.lung, *display.shape) >= 128
    if grid.cam is None:
        return
    box = None if grid.box is None else Box(*grid.box)
    cam = paste_back(grid.cam.astype(np.float32), box, grid.work_shape)
    peak = float(cam.max())
    cam8 = to_uint8(cam / peak) if peak > 0 else np.zeros(grid.work_shape, np.uint8)
    result.cam = _UNIT_FLOATS[resize(cam8, *display.shape)]
    if box is not None:  # the crop square on the display grid, for the heatmap
        sy, sx = display.shape[0] / grid.work_shape[0], display.shape[1] / grid.work_shape[1]
        result.cam_box = (
            round(box.top * sy),
            round(box.left * sx),
            round((box.top + box.size) * sy),
            round((box.left + box.size) * sx),
        )


def occlusion_starts(size: int) -> list[int]:
    """Top (= left) offsets of the occluding patch along one side of a ``size`` input."""
    return list(range(0, size - OCCLUSION_PATCH + 1, OCCLUSION_STRIDE))


def occlusion_copies(image: np.ndarray) -> np.ndarray:
    """Every occluded copy of one (C, S, S) input, a grey patch per position: one batch."""
    starts = occlusion_starts(image.shape[-1])
    copies = []
    for top in starts:
        for left in starts:
            copy = image.copy()
            copy[:, top : top + OCCLUSION_PATCH, left : left + OCCLUSION_PATCH] = 0.5
            copies.append(copy)
    return np.stack(copies)


def occlusion_heat(base_score: float, scores: np.ndarray, size: int) -> np.ndarray:
    """Occlusion sensitivity (Zeiler & Fergus): the drop of the COVID score per patch
    position (``scores`` in :func:`occlusion_copies` order), averaged where patches overlap."""
    starts = occlusion_starts(size)
    drop = np.clip(base_score - scores, 0.0, None).reshape(len(starts), len(starts))
    heat = np.zeros((size, size), dtype=np.float32)
    count = np.zeros((size, size), dtype=np.float32)
    for a, top in enumerate(starts):
        for b, left in enumerate(starts):
            heat[top : top + OCCLUSION_PATCH, left : left + OCCLUSION_PATCH] += drop[a, b]
            count[top : top + OCCLUSION_PATCH, left : left + OCCLUSION_PATCH] += 1
    return heat / np.maximum(count, 1)
