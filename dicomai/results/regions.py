"""Where the model found each finding: the high-activation region of every image on which a
present label reaches its threshold, inside the body, on the source image's pixel grid.

The SR draws each region's bounding box (TID 1410 SCOORD) and the Segmentation carries its
mask; both are computed here once per run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from dicomai.errors import UnsupportedInput
from dicomai.inference.findings import Findings
from dicomai.results.display import display_rgb, resize_rgb
from dicomai.results.heatmap import DEFAULT_CUTOFF, activation_on_grid, body_mask, hot_region

__all__ = ["MAX_REGIONS", "SourceRegion", "analysed_frame", "image_hits", "locate"]

#: Longest side of the grid on which regions are found (then scaled to the source).
_GRID_SIDE = 512
#: Regions computed per run at most (highest scores first); a CT with bleeding on every slice
#: still builds in bounded time.
MAX_REGIONS = 400


@dataclass(frozen=True, slots=True)
class SourceRegion:
    """The high-activation region of one label on one source image.

    Attributes
    ----------
    label
        Model label.
    sop_uid
        SOP Instance UID of the source image.
    score
        The label's score on that image.
    mask
        Region on a grid of the source's aspect ratio (longest side at most 512 pixels).
    box
        ``(col0, row0, col1, row1)`` in source image coordinates (PS3.3 C.18.6.1.2: (0, 0)
        is the top left corner of the first pixel; the box ends after its last pixel).
    """

    label: str
    sop_uid: str
    score: float
    mask: np.ndarray
    box: tuple[float, float, float, float]

    def on_source_grid(self, rows: int, columns: int) -> np.ndarray:
        """The mask resized to ``(rows, columns)`` (smooth edges: bilinear, then ≥ 0.5)."""
        if self.mask.shape == (rows, columns):
            return self.mask.copy()
        image = Image.fromarray(self.mask.astype(np.float32), mode="F")
        resized = np.asarray(image.resize((columns, rows), Image.Resampling.BILINEAR))
        return resized >= 0.5


def analysed_frame(ds: Dataset) -> int:
    """1-based number of the frame the model analysed (the middle one of a multi-frame
    image, as :mod:`dicomai.inference.processing` picks it); 1 for a single-frame image."""
    return int(ds.get("NumberOfFrames") or 1) // 2 + 1


def image_hits(findings: Findings) -> list[tuple[float, str, str]]:
    """``(score, sop_uid, label)`` of every image and label that reaches its threshold, highest
    first. On an image where a specific label (e.g. a haemorrhage subtype) present in the
    study reaches its threshold, the catch-all ``"any"`` is left out, so that each place is
    named once."""
    hits: list[tuple[float, str, str]] = []
    for uid, scores in findings.image_scores.items():
        above = [
            label
            for label in findings.labels
            if label in scores and scores[label] >= findings.thresholds[label]
        ]
        # Only a label present in the study hides "any": one absent from the study (possible
        # with top-3-mean aggregation) has no heat map, and "any" would lose its place.
        specific = [label for label in above if label != "any" and findings.is_present(label)]
        hits.extend((float(scores[label]), uid, label) for label in specific or above)
    hits.sort(key=lambda hit: (-hit[0], hit[1], hit[2]))
    return hits


def locate(
    sources: Sequence[Dataset], findings: Findings, *, cutoff: float = DEFAULT_CUTOFF
) -> dict[tuple[str, str], SourceRegion]:
    """Regions keyed by ``(sop_uid, label)`` for :func:`image_hits` that have a heat map.

    An image that cannot be decoded, or whose map has nothing above ``cutoff`` inside the
    body, has no region (its finding is still reported, without a location).
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    grids: dict[str, tuple[np.ndarray, tuple[int, int]] | None] = {}
    out: dict[tuple[str, str], SourceRegion] = {}
    for score, uid, label in image_hits(findings)[:MAX_REGIONS]:
        cam = findings.label_heatmaps.get(label, {}).get(uid)
        src = by_uid.get(uid)
        if cam is None or src is None:
            continue
        if uid not in grids:
            grids[uid] = _body_on_grid(src)
        grid = grids[uid]
        if grid is None:
            continue
        body, (rows, columns) = grid
        region = hot_region(activation_on_grid(cam, body.shape), body, cutoff)
        if region is None:
            continue
        scale_r, scale_c = rows / body.shape[0], columns / body.shape[1]
        c0, r0, c1, r1 = region.box
        box = (c0 * scale_c, r0 * scale_r, (c1 + 1) * scale_c, (r1 + 1) * scale_r)
        out[(uid, label)] = SourceRegion(label, uid, score, region.mask, box)
    return out


def _body_on_grid(src: Dataset) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Body mask of ``src`` on the region grid, and the source's ``(rows, columns)``."""
    try:
        rows, columns = int(src.Rows), int(src.Columns)
        rgb = display_rgb(src, frame=analysed_frame(src) - 1, max_side=_GRID_SIDE)
    except (UnsupportedInput, AttributeError, TypeError, ValueError):
        return None
    scale = min(1.0, _GRID_SIDE / max(rows, columns))
    size = (max(1, round(rows * scale)), max(1, round(columns * scale)))
    return body_mask(resize_rgb(rgb, size)), (rows, columns)


def regions_by_label(
    regions: Mapping[tuple[str, str], SourceRegion],
) -> dict[str, list[SourceRegion]]:
    """The regions grouped by label, in the order :func:`locate` found them."""
    out: dict[str, list[SourceRegion]] = {}
    for region in regions.values():
        out.setdefault(region.label, []).append(region)
    return out
