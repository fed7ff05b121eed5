"""Phantom drawing: coordinate grids, shapes, blur, limb and chest attenuation maps."""

from __future__ import annotations

import numpy as np


def grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates: about -1..1 across the longer side, y pointing down."""
    half = max(rows, cols) / 2.0
    y = ((np.arange(rows, dtype=np.float32) - (rows - 1) / 2.0) / half)[:, None]
    x = ((np.arange(cols, dtype=np.float32) - (cols - 1) / 2.0) / half)[None, :]
    return np.broadcast_to(x, (rows, cols)), np.broadcast_to(y, (rows, cols))


def ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _segment_distance(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> np.ndarray:
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    length2 = dx * dx + dy * dy or 1e-12
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / length2, 0.0, 1.0)
    return np.hypot(x - (p0[0] + t * dx), y - (p0[1] + t * dy))


def box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur via cumulative sums (edge-padded)."""
    if radius <= 0:
        return a
    k = 2 * radius + 1
    out = a
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis, dtype=np.float64)
        hi = np.take(c, np.arange(k, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)
        out = ((hi - lo) / k).astype(np.float32)
    return out


class Limb:
    """Soft-tissue and bone masks of a limb phantom, built from capsules and ellipses."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y
        self.soft = np.zeros(x.shape, dtype=bool)
        self.bone = np.zeros(x.shape, dtype=bool)
        self.marrow = np.zeros(x.shape, dtype=bool)

    def tissue(self, p0: tuple[float, float], p1: tuple[float, float], r: float) -> None:
        self.soft |= _segment_distance(self.x, self.y, p0, p1) <= r

    def tissue_ellipse(self, cx: float, cy: float, ax: float, ay: float) -> None:
        self.soft |= ellipse(self.x, self.y, cx, cy, ax, ay)

    def long_bone(self, p0: tuple[float, float], p1: tuple[float, float], r: float) -> None:
        d = _segment_distance(self.x, self.y, p0, p1)
        self.bone |= d <= r
        self.marrow |= d <= 0.55 * r

    def round_bone(self, cx: float, cy: float, ax: float, ay: float) -> None:
        self.bone |= ellipse(self.x, self.y, cx, cy, ax, ay)
        self.marrow |= ellipse(self.x, self.y, cx, cy, 0.7 * ax, 0.7 * ay)

    @property
    def cortex(self) -> np.ndarray:
        return self.bone & ~self.marrow


def _draw_hand(limb: Limb) -> None:
    # Forearm, palm and carpus; thumb on image left.
    limb.tissue((0.0, 0.7), (0.0, 1.4), 0.27)
    limb.tissue_ellipse(0.0, 0.3, 0.28, 0.3)
    limb.long_bone((-0.1, 0.8), (-0.12, 1.4), 0.075)  # radius
    limb.long_bone((0.13, 0.82), (0.14, 1.4), 0.05)  # ulna
    for cx, cy in (
        (-0.12, 0.68),
        (0.0, 0.66),
        (0.1, 0.68),
        (-0.16, 0.58),
        (-0.06, 0.57),
        (0.04, 0.57),
        (0.13, 0.59),
        (0.16, 0.73),
    ):
        limb.round_bone(cx, cy, 0.055, 0.045)
    fingers = (  # base x, angle (degrees from vertical), length scale
        (-0.2, -10.0, 1.0),
        (-0.065, -3.0, 1.08),
        (0.07, 4.0, 1.02),
        (0.2, 11.0, 0.85),
    )
    for base_x, angle, scale in fingers:
        ux, uy = np.sin(np.radians(angle)), -np.cos(np.radians(angle))
        start = (base_x * 0.6, 0.52)
        head = (base_x + ux * 0.02, 0.08)
        limb.long_bone(start, head, 0.034)  # metacarpal
        pos = (head[0] + ux * 0.045, head[1] + uy * 0.045)
        tip = pos
        for length, radius in ((0.27, 0.031), (0.16, 0.027), (0.11, 0.023)):
            end = (pos[0] + ux * length * scale, pos[1] + uy * length * scale)
            limb.long_bone(pos, end, radius)
            tip = end
            pos = (end[0] + ux * 0.04, end[1] + uy * 0.04)
        limb.tissue(head, tip, 0.07)
    # Thumb.
    limb.long_bone((-0.2, 0.56), (-0.38, 0.3), 0.036)
    limb.long_bone((-0.41, 0.26), (-0.53, 0.08), 0.032)
    limb.long_bone((-0.55, 0.04), (-0.61, -0.08), 0.027)
    limb.tissue((-0.2, 0.56), (-0.62, -0.1), 0.08)


def _draw_knee(limb: Limb, lateral: bool) -> None:
    limb.tissue((0.0, -1.4), (0.0, 1.4), 0.48)
    limb.long_bone((0.0, -1.4), (0.0, -0.25), 0.17)  # femoral shaft
    limb.long_bone((0.0, 0.12), (0.0, 1.4), 0.15)  # tibial shaft
    if lateral:
        limb.round_bone(0.03, -0.1, 0.2, 0.17)  # condyles seen side-on
        limb.long_bone((-0.18, 0.08), (0.2, 0.08), 0.06)  # plateau
        limb.round_bone(-0.33, -0.18, 0.06, 0.13)  # patella, anterior
        limb.long_bone((0.14, 0.3), (0.08, 1.4), 0.045)  # fibula behind the tibia
    else:
        limb.round_bone(-0.14, -0.12, 0.15, 0.14)
        limb.round_bone(0.14, -0.12, 0.15, 0.14)
        limb.long_bone((-0.23, 0.08), (0.23, 0.08), 0.06)
        limb.round_bone(0.0, -0.22, 0.11, 0.12)
        limb.long_bone((0.29, 0.26), (0.31, 1.4), 0.05)


def _draw_ankle(limb: Limb) -> None:
    limb.tissue((0.0, -1.4), (0.0, 0.75), 0.38)
    limb.tissue_ellipse(0.0, 0.85, 0.42, 0.3)
    limb.long_bone((0.0, -1.4), (0.0, 0.3), 0.17)  # tibia
    limb.round_bone(-0.15, 0.36, 0.06, 0.1)  # medial malleolus
    limb.long_bone((0.27, -1.4), (0.29, 0.48), 0.06)  # fibula
    limb.round_bone(0.0, 0.58, 0.2, 0.14)  # talus
    limb.round_bone(0.0, 0.9, 0.26, 0.13)  # calcaneus overlapping


def _draw_elbow(limb: Limb) -> None:
    limb.tissue((0.0, -1.4), (0.0, 1.4), 0.4)
    limb.long_bone((0.0, -1.4), (0.0, -0.25), 0.13)  # humerus
    limb.round_bone(0.0, -0.12, 0.28, 0.12)  # condyles
    limb.long_bone((-0.14, 0.1), (-0.12, 1.4), 0.07)  # radius
    limb.long_bone((0.1, 0.04), (0.12, 1.4), 0.08)  # ulna


def draw_limb(kind: str, x: np.ndarray, y: np.ndarray, lateral: bool) -> Limb:
    if kind == "wrist":  # a close-up of the hand phantom around the carpus
        x, y = x / 1.9, y / 1.9 + 0.68
    limb = Limb(x, y)
    if kind in {"hand", "wrist"}:
        _draw_hand(limb)
    elif kind == "knee":
        _draw_knee(limb, lateral)
    elif kind == "ankle":
        _draw_ankle(limb)
    elif kind == "elbow":
        _draw_elbow(limb)
    else:  # pragma: no cover - guarded by make_xray
        raise ValueError(kind)
    return limb


def chest_attenuation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """PA chest: darker lungs, brighter mediastinum, heart, spine, ribs, clavicles."""
    att = np.zeros(x.shape, dtype=np.float32)
    body = ellipse(x, y, 0.0, 0.15, 0.88, 1.15)
    att[body] = 0.42
    ax = np.abs(x)
    for side in (-1.0, 1.0):
        cx = 0.37 * side
        dome = 0.4 + 0.18 * ((x - cx) / 0.3) ** 2 - (0.04 if side < 0 else 0.0)
        lung = ellipse(x, y, cx, -0.02, 0.27, 0.58) & (y < dome)
        att[lung] = 0.14
    heart = ellipse(x, y, 0.1, 0.22, 0.27, 0.2)
    mediastinum = (ax < 0.11) & (y > -0.75) & (y < 0.45)
    att[heart | mediastinum] = 0.5
    spine = (ax < 0.065) & body
    vertebra = 0.5 + 0.5 * np.cos((y + 1.0) * np.pi / 0.085)
    att[spine] += np.float32(0.12) + 0.06 * vertebra[spine]
    for k in range(10):
        centre = -0.62 + k * 0.105 + 0.45 * (ax - 0.05) ** 2
        rib = (np.abs(y - centre) < 0.018) & (ax > 0.07) & (ax < 0.72) & body
        att[rib] += 0.1
    clavicle = (np.abs(y - (-0.66 + 0.12 * (ax - 0.15))) < 0.025) & (ax > 0.08) & (ax < 0.55)
    att[clavicle] += 0.2
    shoulder = (y < -0.55) & (ax > 0.55) & body
    att[shoulder] += 0.1
    return att


def window_of(stored: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(stored, [1.0, 99.0])
    return round((lo + hi) / 2.0), max(round(hi - lo), 2)
