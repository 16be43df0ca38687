"""Synthetic projection radiographs of the five body parts, as attenuation maps in [0, 1].

Pure numpy, so demos and tests need no imaging stack. A phantom is a sum of smooth primitives
(ellipsoids, tapered cylinders, cortical shells) painted into three layers — soft tissue, air and
bone — in a canonical body frame (x across the short image side in [-1, 1], y pointing down) that a
random pose maps to pixels. Projection is additive, as in a real radiograph: crossing ribs add up,
air replaces tissue. Rendering runs at a modest internal resolution; one pair of matrix products
then blurs and resamples to the requested shape, so size costs little.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from dicom_router import LABELS

FloatArray = NDArray[np.float32]
Kind = Literal["dome", "shell", "plateau"]
Point = tuple[float, float]
Window = tuple[slice, slice]

_RENDER_LONG_SIDE = (128, 384)
"""Internal render size (long side) is the output size clipped to this range: enough detail, bounded cost."""
_SHELL_INNER = 0.68
"""Radius of the marrow cavity relative to the bone: cortical bone shows as a bright rim."""
_ATTENUATION_GAIN = 1.3
"""Curvature of the attenuation-to-brightness map; saturates where bone overlaps thick tissue."""


class _Canvas:
    """Three attenuation layers and the canonical coordinates of every pixel under one random pose."""

    def __init__(self, shape: tuple[int, int], rng: np.random.Generator, scale: tuple[float, float]) -> None:
        rows, cols = shape
        half = 0.5 * min(rows, cols)
        self.unit = half * rng.uniform(*scale)
        """Pixels per canonical unit."""
        angle = math.radians(float(np.clip(rng.normal(0.0, 3.0), -7.0, 7.0)))
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.row0 = (rows - 1) / 2 + rng.uniform(-0.06, 0.06) * half
        self.col0 = (cols - 1) / 2 + rng.uniform(-0.06, 0.06) * half
        py = (np.arange(rows, dtype=np.float32) - self.row0)[:, None]
        px = (np.arange(cols, dtype=np.float32) - self.col0)[None, :]
        self.x = ((self.cos * px + self.sin * py) / self.unit).astype(np.float32)
        self.y = ((-self.sin * px + self.cos * py) / self.unit).astype(np.float32)
        self.shape = shape
        self.tissue = np.zeros(shape, np.float32)
        self.air = np.zeros(shape, np.float32)
        self.bone = np.zeros(shape, np.float32)

    def extent(self) -> tuple[float, float]:
        """Half width and half height of the image in canonical units (for shapes that must fill it)."""
        rows, cols = self.shape
        return cols / (2 * self.unit), rows / (2 * self.unit)

    def window(self, x0: float, x1: float, y0: float, y1: float) -> Window | None:
        """Pixel bounding box of a canonical box, or None when it misses the image."""
        u, c, s = self.unit, self.cos, self.sin
        cols = [u * (c * x - s * y) + self.col0 for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
        rows = [u * (s * x + c * y) + self.row0 for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
        r0, r1 = max(math.floor(min(rows)) - 2, 0), min(math.floor(max(rows)) + 3, self.shape[0])
        c0, c1 = max(math.floor(min(cols)) - 2, 0), min(math.floor(max(cols)) + 3, self.shape[1])
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def _paint(
        self, layer: FloatArray, win: Window, r: FloatArray, amount: float, kind: Kind, edge: float
    ) -> None:
        if kind == "dome":
            value = np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
        elif kind == "shell":
            outer = np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
            inner = np.sqrt(np.clip(_SHELL_INNER**2 - r * r, 0.0, 1.0))
            value = outer - 0.8 * inner
        else:
            value = np.clip((1.0 - r) / edge, 0.0, 1.0)
        layer[win] += amount * value

    def _edge(self, edge: float, size: float) -> float:
        """Plateau edge width in radius units, never sharper than about one pixel."""
        return max(edge, 1.5 / (self.unit * max(size, 1e-3)))

    def ellipse(
        self,
        layer: FloatArray,
        center: Point,
        radii: Point,
        amount: float,
        *,
        angle: float = 0.0,
        kind: Kind = "dome",
        edge: float = 0.0,
    ) -> None:
        """An ellipsoid seen in projection; ``angle`` in degrees, clockwise on screen."""
        cx, cy = center
        rx, ry = radii
        t = math.radians(angle)
        ct, st = math.cos(t), math.sin(t)
        ex, ey = math.hypot(rx * ct, ry * st), math.hypot(rx * st, ry * ct)
        win = self.window(cx - ex, cx + ex, cy - ey, cy + ey)
        if win is None:
            return
        dx, dy = self.x[win] - cx, self.y[win] - cy
        u, v = (ct * dx + st * dy) / rx, (ct * dy - st * dx) / ry
        self._paint(layer, win, np.sqrt(u * u + v * v), amount, kind, self._edge(edge, min(rx, ry)))

    def block(
        self,
        layer: FloatArray,
        center: Point,
        half: Point,
        amount: float,
        *,
        angle: float = 0.0,
        kind: Kind = "shell",
        edge: float = 0.0,
    ) -> None:
        """A rounded box (superellipse of order 4): vertebral bodies, tibial plateau, metacarpal heads."""
        cx, cy = center
        hx, hy = half
        ext = math.hypot(hx, hy)
        win = self.window(cx - ext, cx + ext, cy - ext, cy + ext)
        if win is None:
            return
        t = math.radians(angle)
        ct, st = math.cos(t), math.sin(t)
        dx, dy = self.x[win] - cx, self.y[win] - cy
        u, v = (ct * dx + st * dy) / hx, (ct * dy - st * dx) / hy
        u2, v2 = u * u, v * v
        self._paint(
            layer, win, np.sqrt(np.sqrt(u2 * u2 + v2 * v2)), amount, kind, self._edge(edge, min(hx, hy))
        )

    def stroke(
        self,
        layer: FloatArray,
        points: Sequence[Point],
        radii: Sequence[float] | float,
        amount: float,
        *,
        kind: Kind = "dome",
        edge: float = 0.0,
    ) -> None:
        """A tapered tube along a polyline (long bones, ribs, fingers, bowel loops), painted once."""
        rad = [float(radii)] * len(points) if isinstance(radii, float | int) else [float(r) for r in radii]
        pad = max(rad)
        px, py = [float(p[0]) for p in points], [float(p[1]) for p in points]
        win = self.window(min(px) - pad, max(px) + pad, min(py) - pad, max(py) + pad)
        if win is None:
            return
        xs, ys = self.x[win], self.y[win]
        r = np.full(xs.shape, np.inf, np.float32)
        for ax, ay, bx, by, ra, rb in zip(px[:-1], py[:-1], px[1:], py[1:], rad[:-1], rad[1:], strict=True):
            sx, sy = bx - ax, by - ay
            t = np.clip(((xs - ax) * sx + (ys - ay) * sy) / max(sx * sx + sy * sy, 1e-9), 0.0, 1.0)
            dist = np.hypot(xs - ax - t * sx, ys - ay - t * sy)
            np.minimum(r, dist / (ra + t * (rb - ra)), out=r)
        self._paint(layer, win, r, amount, kind, self._edge(edge, min(rad)))

    def compose(self) -> FloatArray:
        """Projected attenuation: tissue thinned by air, plus bone, mapped to brightness in [0, 1]."""
        total = self.tissue * (1.0 - np.clip(self.air, 0.0, 0.92)) + self.bone
        gain = _ATTENUATION_GAIN
        brightness = (1.0 - np.exp(-gain * np.maximum(total, 0.0))) / (1.0 - math.exp(-gain * 1.25))
        return brightness.astype(np.float32)


def _arc(start: Point, end: Point, bulge: float, n: int = 5) -> list[Point]:
    """Points on a gentle curve from ``start`` to ``end``, bowed sideways by ``bulge``."""
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    nx, ny = (y0 - y1) / length, (x1 - x0) / length
    out = []
    for i in range(n):
        t = i / (n - 1)
        b = bulge * math.sin(math.pi * t)
        out.append((x0 + t * (x1 - x0) + b * nx, y0 + t * (y1 - y0) + b * ny))
    return out


def _vessels(c: _Canvas, rng: np.random.Generator, hilum: Point, side: float, reach: float) -> None:
    """Branching pulmonary vessels fanning out from a hilum: the texture that makes a lung look like one."""
    for _ in range(9):
        ang = rng.uniform(-1.2, 1.4)
        length = reach * rng.uniform(0.45, 0.85)
        hx, hy = hilum[0] + side * rng.uniform(0.0, 0.06), hilum[1] + rng.normal(0.0, 0.05)
        start = (hx, hy)
        mid = (hx + side * 0.5 * length * math.cos(ang), hy + 0.5 * length * math.sin(ang))
        end = (hx + side * length * math.cos(ang + rng.normal(0, 0.15)), hy + length * math.sin(ang))
        c.stroke(c.bone, [start, mid, end], [0.016, 0.01, 0.004], 0.035)


def _rib_cage(
    c: _Canvas,
    rng: np.random.Generator,
    *,
    top: float,
    spacing: float,
    count: int,
    width: float,
    drop: float,
    radius: float,
    amount: float,
) -> None:
    """Posterior ribs (medial, arching out and down) and fainter anterior ribs sloping back medially."""
    for i in range(count):
        y0 = top + i * spacing + rng.normal(0.0, 0.008)
        reach = width * (0.5 + 0.5 * min(1.0, (i + 1) / 4.0))
        for side in (-1.0, 1.0):
            medial = 0.07
            post = []
            for k in range(6):
                phi = 0.5 * math.pi * k / 5
                x = side * (medial + (reach - medial) * math.sin(phi))
                y = y0 + drop * (1.0 - math.cos(phi)) - 0.25 * drop * math.sin(2 * phi)
                post.append((x, y))
            c.stroke(c.bone, post, np.linspace(radius * 0.8, radius * 1.1, 6).tolist(), amount, kind="shell")
            end_x, end_y = post[-1]
            front = _arc((end_x, end_y), (side * 0.32 * width, end_y + 0.3 * spacing * 3), side * 0.05, 4)
            c.stroke(c.bone, front, [radius * 1.1, radius * 0.9, radius * 0.8, radius * 0.7], 0.35 * amount)


def _vertebra_ap(c: _Canvas, center: Point, half: Point, amount: float, tilt: float) -> None:
    """Vertebral body seen front-on: a cortical box, two pedicle rings, spinous and transverse processes."""
    cx, cy = center
    hx, hy = half
    c.block(c.bone, center, half, amount, angle=tilt)
    for side in (-1.0, 1.0):
        c.ellipse(
            c.bone, (cx + side * 0.62 * hx, cy - 0.35 * hy), (0.2 * hx, 0.32 * hy), 0.7 * amount, kind="shell"
        )
        c.stroke(
            c.bone,
            [(cx + side * 0.8 * hx, cy - 0.2 * hy), (cx + side * 1.55 * hx, cy - 0.3 * hy)],
            [0.2 * hy, 0.12 * hy],
            0.45 * amount,
        )
    c.ellipse(c.bone, (cx, cy + 0.45 * hy), (0.12 * hx, 0.45 * hy), 0.45 * amount)


def _column_ap(
    c: _Canvas,
    rng: np.random.Generator,
    *,
    y_top: float,
    y_bottom: float,
    half: Point,
    amount: float,
    sway: float,
) -> None:
    """A stack of AP vertebrae with discs between, following a slight lateral curve."""
    hx, hy = half
    pitch = 2.0 * hy * 1.28
    phase = rng.uniform(0, 2 * math.pi)
    y = y_top
    while y < y_bottom:
        grow = 1.0 + 0.12 * (y - y_top) / max(y_bottom - y_top, 1e-3)
        x = sway * math.sin(1.6 * y + phase)
        slope = sway * 1.6 * math.cos(1.6 * y + phase)
        _vertebra_ap(c, (x, y), (hx * grow, hy * grow), amount, math.degrees(math.atan(slope)))
        y += pitch * grow


def _column_lateral(
    c: _Canvas, *, x0: float, y_top: float, y_bottom: float, half: Point, bend: float, amount: float
) -> None:
    """Vertebrae seen from the side (front to the left): bodies, pedicles and spinous processes behind,
    along ``x = x0 + bend·y²`` (bend > 0: lordosis, < 0: kyphosis)."""
    hx, hy = half
    y = y_top
    while y < y_bottom:
        x = x0 + bend * y * y
        tilt = math.degrees(math.atan(2 * bend * y))
        c.block(c.bone, (x, y), (hx, hy), amount, angle=tilt)
        px = x + hx * 1.05
        c.stroke(
            c.bone,
            [(px, y - 0.4 * hy), (px + 0.8 * hx, y)],
            [0.45 * hy, 0.35 * hy],
            0.56 * amount,
            kind="shell",
        )
        c.stroke(
            c.bone,
            [(px + 0.7 * hx, y - 0.1 * hy), (px + 1.9 * hx, y + 0.7 * hy)],
            [0.3 * hy, 0.15 * hy],
            0.62 * amount,
        )
        y += 2.0 * hy * 1.3


def _trunk(
    c: _Canvas, half_width: float, amount: float, *, center_x: float = 0.0, top: float | None = None
) -> None:
    """A body cylinder down to the image bottom, from ``top`` (rounded shoulders) or the image top."""
    _, height = c.extent()
    cap = 0.3
    start = -2.0 * height if top is None else top
    win = c.window(center_x - half_width, center_x + half_width, start, 2.0 * height)
    if win is None:
        return
    u = (c.x[win] - center_x) / half_width
    v = np.clip((start + cap - c.y[win]) / cap, 0.0, None)
    c.tissue[win] += amount * np.sqrt(np.clip(1.0 - u * u - v * v, 0.0, 1.0))


def _bowel_gas(
    c: _Canvas, rng: np.random.Generator, box: tuple[float, float, float, float], count: int
) -> None:
    """Irregular gas pockets: each a small cluster of overlapping ellipses."""
    x0, x1, y0, y1 = box
    for _ in range(count):
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        for _ in range(int(rng.integers(1, 4))):
            c.ellipse(
                c.air,
                (cx + rng.normal(0, 0.04), cy + rng.normal(0, 0.04)),
                (rng.uniform(0.03, 0.09), rng.uniform(0.025, 0.06)),
                rng.uniform(0.25, 0.55),
                angle=rng.uniform(0, 180),
                kind="plateau",
                edge=0.35,
            )


def _colon(c: _Canvas, rng: np.random.Generator, width: float, top: float, bottom: float) -> None:
    """Gas in the colon frame: ascending, transverse and descending limbs, patchily filled."""
    path = [
        (-width, bottom),
        (-width * 1.02, (top + bottom) / 2),
        (-width * 0.9, top),
        (0.0, top + rng.uniform(0.0, 0.25)),
        (width * 0.9, top - 0.05),
        (width * 1.02, (top + bottom) / 2),
        (width, bottom),
    ]
    for a, b in itertools.pairwise(path):
        if rng.random() < 0.75:
            c.stroke(
                c.air,
                _arc(a, b, rng.normal(0, 0.05), 4),
                rng.uniform(0.05, 0.09),
                rng.uniform(0.3, 0.6),
                kind="plateau",
                edge=0.5,
            )


def _pelvis(c: _Canvas, rng: np.random.Generator, top: float, size: float, amount: float) -> None:
    """Iliac wings, sacrum, obturator rings and femoral heads with necks and proximal shafts."""
    s = size
    c.stroke(c.bone, [(0.0, top + 0.02 * s), (0.0, top + 0.5 * s)], [0.17 * s, 0.05 * s], 0.8 * amount)
    for side in (-1.0, 1.0):
        c.ellipse(
            c.bone,
            (side * 0.42 * s, top + 0.12 * s),
            (0.36 * s, 0.24 * s),
            amount,
            angle=side * -28.0 + rng.normal(0, 3),
            kind="shell",
        )
        c.ellipse(c.bone, (side * 0.28 * s, top + 0.62 * s), (0.13 * s, 0.09 * s), 0.7 * amount, kind="shell")
        head = (side * 0.52 * s, top + 0.5 * s)
        c.ellipse(c.bone, head, (0.12 * s, 0.12 * s), 1.1 * amount, kind="shell")
        neck_end = (side * 0.66 * s, top + 0.72 * s)
        c.stroke(c.bone, [head, neck_end], [0.07 * s, 0.09 * s], 0.9 * amount, kind="shell")
        c.stroke(
            c.bone,
            [neck_end, (side * 0.68 * s, top + 1.6 * s)],
            [0.12 * s, 0.1 * s],
            amount,
            kind="shell",
        )


def _lung(c: _Canvas, apex: Point, half_width: float, bottom: float, *, dome: float, amount: float) -> None:
    """An egg-shaped lung: narrow rounded apex, broad base cut by a diaphragm dome."""
    ax, ay = apex
    height = bottom - ay
    win = c.window(ax - half_width, ax + half_width, ay, bottom)
    if win is None:
        return
    xs, ys = c.x[win], c.y[win]
    t = np.clip((ys - ay) / height, 0.0, 1.0)
    u = (xs - ax) / (half_width * (0.3 + 0.7 * t**0.35))
    v = (ys - (bottom - dome * 0.5)) / (height - dome * 0.5)
    r = np.sqrt(u * u + np.where(v < 0, v * v, 0.0))
    dia = bottom - dome * np.clip(1.0 - u * u, 0.0, 1.0)
    below = np.clip((dia - ys) / 0.04, 0.0, 1.0)
    c.air[win] += amount * np.clip((1.0 - r) / 0.25, 0.0, 1.0) * below * np.clip(t * 8.0, 0.0, 1.0)


def _adult_chest(c: _Canvas, rng: np.random.Generator) -> tuple[str, bool]:
    """PA/AP chest: broad thorax, dark lungs, left-sided heart, arched ribs, clavicles, shoulders."""
    w = rng.uniform(0.76, 0.9)
    dia = rng.uniform(0.4, 0.58)
    apex = rng.uniform(-0.95, -0.82)
    _trunk(c, w + 0.12, 0.55, top=apex - 0.15)
    c.ellipse(c.tissue, (0.0, apex - 0.55), (0.22, 0.5), 0.35)
    for side in (-1.0, 1.0):
        c.ellipse(c.tissue, (side * (w - 0.02), apex + 0.05), (0.34, 0.2), 0.3)
        if rng.random() < 0.5:
            c.stroke(c.tissue, [(side * (w + 0.2), apex), (side * (w + 0.26), 1.6)], [0.14, 0.11], 0.4)
        lx = side * (0.1 + 0.5 * w * rng.uniform(0.78, 0.84))
        rx = 0.5 * w * rng.uniform(0.8, 0.88) + 0.05
        lung_bottom = dia + (0.05 if side > 0 else 0.0)
        _lung(c, (lx, apex), rx, lung_bottom, dome=rng.uniform(0.12, 0.2), amount=0.78)
        _vessels(c, rng, (side * 0.16, rng.uniform(-0.15, 0.0)), side, 0.62 * w)
        c.ellipse(c.bone, (side * (w - 0.16), apex + 0.42), (0.16, 0.3), 0.05, angle=side * 12.0)
        c.ellipse(c.bone, (side * (w + 0.04), apex + 0.04), (0.12, 0.12), 0.32, kind="shell")
        c.stroke(
            c.bone,
            [(side * (w + 0.06), apex + 0.1), (side * (w + 0.13), 1.4)],
            [0.08, 0.065],
            0.3,
            kind="shell",
        )
        clav = _arc((side * 0.07, apex + 0.08), (side * (w - 0.08), apex - 0.06), side * 0.04)
        c.stroke(c.bone, clav, 0.032, 0.28, kind="shell")
        if rng.random() < 0.4:
            c.ellipse(c.tissue, (side * 0.42 * w, dia + 0.02), (0.3, 0.2), 0.08)
    heart_w = w * rng.uniform(0.36, 0.42)
    heart = (0.05 + 0.35 * heart_w, dia - 0.2)
    c.ellipse(c.tissue, heart, (heart_w, 0.27), 0.12, angle=-22.0)
    c.ellipse(c.air, heart, (heart_w, 0.27), -1.0, angle=-22.0, kind="plateau", edge=0.3)
    c.block(c.air, (0.0, apex - 0.1), (0.035, 0.42), 0.3, kind="plateau", edge=0.5)
    c.ellipse(c.tissue, (0.1, apex + 0.45), (0.08, 0.07), 0.12)
    c.ellipse(c.air, (0.32 * w, dia + 0.14), (0.11, 0.06), 0.55, kind="plateau", edge=0.4)
    _column_ap(c, rng, y_top=-1.6, y_bottom=1.6, half=(0.085, 0.05), amount=0.1, sway=0.01)
    _rib_cage(
        c,
        rng,
        top=apex + 0.07,
        spacing=rng.uniform(0.115, 0.13),
        count=10,
        width=w,
        drop=0.34,
        radius=0.03,
        amount=0.14,
    )
    return ("PA" if rng.random() < 0.8 else "AP"), False


def _pediatric_chest(c: _Canvas, rng: np.random.Generator) -> tuple[str, bool]:
    """Child: small round thorax in a wide field, big heart and thymus, flat thin ribs, often arms up."""
    w = rng.uniform(0.55, 0.7)
    dia = rng.uniform(0.22, 0.34)
    apex = rng.uniform(-0.62, -0.52)
    arms_up = rng.random() < 0.55
    _trunk(c, w + 0.1, 0.42, top=apex - 0.08)
    c.ellipse(c.tissue, (0.0, 0.65), (w + 0.05, 0.7), 0.1)
    c.ellipse(c.tissue, (0.0, apex - 0.3), (0.18, 0.3), 0.12)
    if arms_up or rng.random() < 0.5:
        head = (rng.normal(0.0, 0.04), apex - rng.uniform(0.75, 0.95))
        c.ellipse(c.tissue, head, (0.46, 0.5), 0.3)
        c.ellipse(c.bone, head, (0.44, 0.48), 0.22, kind="shell")
        c.stroke(c.bone, _arc((-0.3, head[1] + 0.32), (0.3, head[1] + 0.32), 0.22), 0.03, 0.15, kind="shell")
    for side in (-1.0, 1.0):
        if arms_up:
            shoulder = (side * (w - 0.02), apex + 0.02)
            elbow = (side * (w + rng.uniform(0.0, 0.12)), apex - rng.uniform(0.7, 0.9))
            c.stroke(c.tissue, [shoulder, elbow], [0.14, 0.1], 0.32)
            c.stroke(c.bone, [shoulder, elbow], [0.05, 0.04], 0.18, kind="shell")
        else:
            c.stroke(c.tissue, [(side * (w + 0.1), apex), (side * (w + 0.16), 1.3)], [0.12, 0.1], 0.3)
            c.stroke(
                c.bone,
                [(side * (w + 0.1), apex + 0.05), (side * (w + 0.15), 1.2)],
                [0.045, 0.04],
                0.18,
                kind="shell",
            )
        lx = side * (0.14 + 0.45 * w)
        _lung(c, (lx, apex), 0.48 * w + 0.04, dia, dome=rng.uniform(0.06, 0.12), amount=0.7)
        _vessels(c, rng, (side * 0.17, apex + 0.4), side, 0.4 * w)
        clav = _arc((side * 0.09, apex + 0.05), (side * (w - 0.06), apex - 0.01), side * 0.02)
        c.stroke(c.bone, clav, 0.02, 0.15, kind="shell")
    heart_w = w * rng.uniform(0.5, 0.58)
    heart = (0.04 + 0.25 * heart_w, dia - 0.18)
    c.ellipse(c.tissue, heart, (heart_w, 0.24), 0.12, angle=-12.0)
    c.ellipse(c.air, heart, (heart_w, 0.24), -1.0, angle=-12.0, kind="plateau", edge=0.3)
    thymus = rng.uniform(0.17, 0.26)
    c.ellipse(c.air, (0.0, apex + 0.3), (thymus, 0.2), -1.0, kind="plateau", edge=0.4)
    c.ellipse(c.tissue, (0.0, apex + 0.3), (thymus, 0.2), 0.06)
    c.block(c.air, (0.0, apex - 0.05), (0.025, 0.25), 0.3, kind="plateau", edge=0.5)
    _bowel_gas(c, rng, (-0.45 * w - 0.1, 0.45 * w + 0.1, dia + 0.15, dia + 0.9), int(rng.integers(8, 16)))
    c.ellipse(c.air, (0.35 * w, dia + 0.1), (0.12, 0.07), 0.6, kind="plateau", edge=0.4)
    _column_ap(c, rng, y_top=apex - 0.2, y_bottom=1.6, half=(0.06, 0.035), amount=0.08, sway=0.01)
    _rib_cage(
        c,
        rng,
        top=apex + 0.06,
        spacing=rng.uniform(0.075, 0.085),
        count=9,
        width=w + 0.03,
        drop=0.07,
        radius=0.02,
        amount=0.08,
    )
    if rng.random() < 0.5:
        _pelvis(c, rng, dia + 0.95, 0.5, 0.1)
    return ("AP" if rng.random() < 0.7 else "PA"), False


def _spine(c: _Canvas, rng: np.random.Generator) -> tuple[str, bool]:
    """Close-up column: AP (bodies, pedicles, processes, slight scoliosis) or lateral (lordotic curve)."""
    if rng.random() < 0.5:
        _trunk(c, rng.uniform(0.9, 1.3), 0.6)
        half = (rng.uniform(0.17, 0.22), rng.uniform(0.085, 0.105))
        _column_ap(c, rng, y_top=-1.7, y_bottom=1.7, half=half, amount=0.33, sway=rng.uniform(0.0, 0.08))
        for side in (-1.0, 1.0):
            c.stroke(c.tissue, [(side * 0.25, -1.5), (side * 0.45, 1.5)], [0.12, 0.22], 0.08)
        if rng.random() < 0.5:
            _rib_cage(c, rng, top=-2.2, spacing=0.2, count=8, width=1.2, drop=0.3, radius=0.04, amount=0.1)
        if rng.random() < 0.4:
            _pelvis(c, rng, rng.uniform(0.8, 1.2), 1.4, 0.16)
        return "AP", False
    _trunk(c, rng.uniform(1.1, 1.5), 0.65, center_x=-0.3)
    bend = rng.uniform(-0.12, 0.12)
    x0 = rng.uniform(-0.35, -0.15)
    half = (rng.uniform(0.2, 0.24), rng.uniform(0.09, 0.11))
    _column_lateral(c, x0=x0, y_top=-1.8, y_bottom=1.8, half=half, bend=bend, amount=0.32)
    _bowel_gas(c, rng, (-1.2, -0.6, -0.4, 1.5), int(rng.integers(2, 7)))
    if rng.random() < 0.5:
        c.ellipse(c.bone, (x0 + 0.1, 1.45), (0.6, 0.45), 0.12, kind="shell")
    return "LL", bool(rng.random() < 0.5)


def _abdominal(c: _Canvas, rng: np.random.Generator) -> tuple[str, bool]:
    """Supine abdomen: liver, lumbar spine, bowel and colon gas, pelvis and femoral heads below."""
    w = rng.uniform(0.82, 0.98)
    _trunk(c, w + 0.12, 0.6)
    c.ellipse(c.tissue, (-0.45 * w, -0.85), (0.55 * w, 0.4), 0.12, angle=-10.0)
    for side in (-1.0, 1.0):
        c.stroke(c.tissue, [(side * 0.12, -0.6), (side * 0.34, 0.55)], [0.06, 0.14], 0.07)
        for k in range(3):
            y0 = -1.45 + 0.17 * k
            rib = _arc((side * 0.25, y0), (side * (w + 0.05), y0 + 0.45), -side * 0.08)
            c.stroke(c.bone, rib, 0.035, 0.1, kind="shell")
    _column_ap(
        c, rng, y_top=-1.4, y_bottom=0.35, half=(0.14, 0.075), amount=0.26, sway=rng.uniform(0.0, 0.04)
    )
    _pelvis(c, rng, rng.uniform(0.38, 0.55), rng.uniform(0.9, 1.05), 0.24)
    _colon(c, rng, 0.62 * w, -0.55, 0.45)
    _bowel_gas(c, rng, (-0.45, 0.45, -0.45, 0.45), int(rng.integers(6, 16)))
    c.ellipse(c.air, (0.4 * w, -0.95), (0.16, 0.1), rng.uniform(0.4, 0.8), kind="plateau", edge=0.4)
    return "AP", False


def _knee(c: _Canvas, rng: np.random.Generator) -> str:
    """AP knee: femoral condyles, joint space, tibial plateau, fibula, faint patella."""
    joint = rng.uniform(-0.15, 0.15)
    c.stroke(c.tissue, [(0.0, -2.0), (0.0, joint), (0.0, 2.0)], [0.62, 0.6, 0.45], 0.55)
    c.stroke(
        c.bone, [(0.0, -2.0), (0.0, joint - 0.55), (0.0, joint - 0.3)], [0.2, 0.23, 0.33], 0.45, kind="shell"
    )
    c.block(c.bone, (0.0, joint - 0.17), (0.38, 0.13), 0.4)
    c.ellipse(c.air, (0.0, joint - 0.08), (0.07, 0.06), 0.3, kind="plateau", edge=0.5)
    c.block(c.bone, (0.0, joint + 0.15), (0.38, 0.09), 0.4)
    c.stroke(c.bone, [(0.0, joint + 0.18), (0.0, 2.0)], [0.27, 0.17], 0.45, kind="shell")
    c.stroke(c.bone, [(0.36, joint + 0.25), (0.3, 2.0)], [0.08, 0.05], 0.35, kind="shell")
    c.ellipse(c.bone, (rng.normal(0, 0.03), joint - 0.3), (0.16, 0.2), 0.14)
    return "AP"


def _forearm(c: _Canvas, rng: np.random.Generator) -> str:
    """Forearm: radius and ulna bowing apart, carpal row at the wrist end."""
    bow = rng.uniform(0.03, 0.08)
    c.stroke(c.tissue, [(0.0, -2.0), (0.0, 2.0)], [0.5, 0.38], 0.5)
    c.stroke(c.bone, _arc((-0.2, -2.0), (-0.14, 1.0), bow), [0.11, 0.1, 0.08, 0.09, 0.14], 0.45, kind="shell")
    c.stroke(c.bone, _arc((0.18, -2.0), (0.2, 1.1), -bow), [0.1, 0.08, 0.08, 0.1, 0.16], 0.45, kind="shell")
    for k in range(6):
        c.ellipse(c.bone, (-0.2 + 0.09 * k, 1.3 + 0.1 * (k % 2)), (0.07, 0.06), 0.35, kind="shell")
    return "AP" if rng.random() < 0.5 else "LL"


def _hand(c: _Canvas, rng: np.random.Generator) -> str:
    """PA hand: carpals, fanned metacarpals, jointed phalanges and the thumb."""
    spread = rng.uniform(0.08, 0.16)
    c.ellipse(c.tissue, (0.0, 0.55), (0.62, 0.6), 0.42)
    c.stroke(c.tissue, [(0.0, 0.9), (0.0, 2.0)], [0.42, 0.4], 0.42)
    for k in range(6):
        c.ellipse(c.bone, (-0.22 + 0.09 * k, 0.95 + 0.09 * (k % 2)), (0.07, 0.06), 0.35, kind="shell")
    c.stroke(c.bone, [(-0.22, 1.12), (-0.24, 2.0)], [0.12, 0.1], 0.4, kind="shell")
    c.stroke(c.bone, [(0.2, 1.12), (0.22, 2.0)], [0.08, 0.07], 0.4, kind="shell")
    lengths = [
        (0.62, 0.36, 0.22, 0.17),
        (0.6, 0.4, 0.26, 0.18),
        (0.58, 0.37, 0.24, 0.17),
        (0.52, 0.3, 0.2, 0.15),
    ]
    for finger, (meta, p1, p2, p3) in enumerate(lengths):
        base_x = -0.24 + 0.16 * finger
        ang = (finger - 1.5) * spread
        dx, dy = math.sin(ang), -math.cos(ang)
        y = 0.85
        pts = [(base_x, y)]
        for seg in (meta, p1, p2, p3):
            x0, y0 = pts[-1]
            pts.append((x0 + dx * seg, y0 + dy * seg))
        c.stroke(c.tissue, [pts[1], pts[-1]], [0.1, 0.075], 0.32)
        radii = (0.055, 0.05, 0.042, 0.035)
        for (a, b), rad in zip(itertools.pairwise(pts), radii, strict=True):
            gap = 0.03
            ax, ay = a[0] + dx * gap, a[1] + dy * gap
            bx, by = b[0] - dx * gap, b[1] - dy * gap
            c.stroke(c.bone, [(ax, ay), (bx, by)], [rad * 1.15, rad], 0.38, kind="shell")
    thumb = [(-0.3, 0.85), (-0.55, 0.45), (-0.72, 0.15), (-0.84, -0.08)]
    c.stroke(c.tissue, thumb[1:], [0.12, 0.09, 0.08], 0.3)
    for (a, b), rad in zip(itertools.pairwise(thumb), (0.06, 0.05, 0.042), strict=True):
        c.stroke(c.bone, [a, b], [rad * 1.15, rad], 0.38, kind="shell")
    return "PA"


def _skull(c: _Canvas, rng: np.random.Generator) -> str:
    """Skull PA (orbits, nasal cavity, mandible) or lateral (face, sella, mandible, cervical spine)."""
    lateral = rng.random() < 0.4
    rx, ry = (0.9, 0.72) if lateral else (0.72, 0.88)
    cy = -0.15
    c.ellipse(c.tissue, (0.0, cy), (rx + 0.05, ry + 0.05), 0.5)
    c.ellipse(c.bone, (0.0, cy), (rx, ry), 0.55, kind="shell")
    c.ellipse(c.bone, (0.0, cy), (rx * 0.97, ry * 0.97), -0.2)
    if lateral:
        c.ellipse(c.tissue, (-0.62, cy + 0.55), (0.3, 0.4), 0.25)
        c.ellipse(c.bone, (-0.62, cy + 0.55), (0.3, 0.3), 0.14)
        c.ellipse(c.air, (-0.6, cy + 0.5), (0.14, 0.12), 0.5, kind="plateau", edge=0.4)
        c.ellipse(c.bone, (-0.7, cy + 0.2), (0.13, 0.11), 0.2, kind="shell")
        c.ellipse(c.bone, (0.02, cy + 0.22), (0.09, 0.06), 0.25, kind="shell")
        c.stroke(
            c.bone,
            [(0.15, cy + 0.5), (0.12, cy + 1.0), (-0.65, cy + 1.12)],
            [0.06, 0.08, 0.07],
            0.35,
            kind="shell",
        )
        c.block(c.bone, (-0.55, cy + 0.88), (0.22, 0.04), 0.3)
        for k in range(5):
            c.block(c.bone, (0.3 + 0.03 * k, cy + 1.05 + 0.2 * k), (0.11, 0.07), 0.22)
        return "LL"
    for side in (-1.0, 1.0):
        c.ellipse(c.bone, (side * 0.28, cy + 0.3), (0.17, 0.14), 0.22, kind="shell")
        c.ellipse(c.air, (side * 0.3, cy + 0.68), (0.14, 0.12), 0.4, kind="plateau", edge=0.4)
    c.stroke(c.air, [(0.0, cy + 0.42), (0.0, cy + 0.75)], [0.03, 0.09], 0.45, kind="plateau", edge=0.4)
    c.block(c.bone, (0.0, cy + 0.9), (0.3, 0.05), 0.35)
    c.stroke(c.bone, _arc((-0.55, cy + 0.5), (0.55, cy + 0.5), 0.5, 7), 0.06, 0.35, kind="shell")
    return "PA"


def _one_of(
    c: _Canvas,
    rng: np.random.Generator,
    drawers: Sequence[Callable[[_Canvas, np.random.Generator], str]],
    shares: Sequence[float],
) -> tuple[str, bool]:
    """One of the ``drawers`` (chosen by ``shares``), either side: how ``others`` mixes its kinds."""
    draw = drawers[int(rng.choice(len(drawers), p=shares))]
    return draw(c, rng), bool(rng.random() < 0.5)


def _others(c: _Canvas, rng: np.random.Generator) -> tuple[str, bool]:
    """Everything that is not trunk: a knee, a forearm, a hand or a skull, either side."""
    return _one_of(c, rng, [_knee, _forearm, _hand, _skull], [0.3, 0.2, 0.25, 0.25])


# --- the variety real archives hold (``variety=True``) ----------------------------------------------


def _chest_lateral(c: _Canvas, rng: np.random.Generator, *, child: bool) -> None:
    """Lateral chest (front to the left): one broad lung field, heart in front, spine behind, sternum,
    diaphragm domes, arms raised across the top."""
    depth = rng.uniform(0.75, 0.9) * (0.8 if child else 1.0)
    apex, dia = (-0.6, 0.3) if child else (rng.uniform(-0.95, -0.8), rng.uniform(0.45, 0.6))
    _trunk(c, depth + 0.1, 0.6, top=apex - 0.2)
    _lung(c, (0.02, apex), 0.82 * depth, dia, dome=rng.uniform(0.15, 0.25), amount=0.75)
    _vessels(c, rng, (0.0, rng.uniform(-0.2, 0.0)), -1.0, 0.5 * depth)
    _vessels(c, rng, (0.0, rng.uniform(-0.2, 0.0)), 1.0, 0.5 * depth)
    heart = (-0.32 * depth, dia - 0.22)
    c.ellipse(c.air, heart, (0.36 * depth, 0.3), -1.0, angle=25.0, kind="plateau", edge=0.3)
    c.ellipse(c.tissue, heart, (0.36 * depth, 0.3), 0.1, angle=25.0)
    c.stroke(c.bone, _arc((-0.9 * depth, apex + 0.2), (-0.8 * depth, dia), 0.05), 0.035, 0.2, kind="shell")
    hy = 0.045 if child else 0.065
    _column_lateral(
        c, x0=0.7 * depth, y_top=apex - 0.3, y_bottom=1.8, half=(1.6 * hy, hy), bend=-0.05, amount=0.16
    )
    for k in range(8):
        y = apex + 0.12 + 0.14 * k
        c.stroke(c.bone, _arc((0.75 * depth, y), (-0.7 * depth, y + 0.35), 0.1), 0.018, 0.06, kind="shell")
    for _ in range(2):  # the raised arms: a humerus inside each arm's soft tissue
        arm = [(rng.uniform(-0.3, 0.3), apex - 0.9), (rng.uniform(0.1, 0.5), apex + 0.1)]
        c.stroke(c.tissue, arm, [0.16, 0.14], 0.3)
        c.stroke(c.bone, arm, [0.05, 0.05], 0.16, kind="shell")


def _adult_chest_lateral(c: _Canvas, rng: np.random.Generator) -> tuple[str, bool]:
    _chest_lateral(c, rng, child=False)
    return "LL", bool(rng.random() < 0.3)


def _pediatric_chest_lateral(c: _Canvas, rng: np.random.Generator) -> tuple[str, bool]:
    _chest_lateral(c, rng, child=True)
    _bowel_gas(c, rng, (-0.5, 0.3, 0.45, 1.2), int(rng.integers(4, 10)))
    return "LL", bool(rng.random() < 0.3)


def _supine_chest(c: _Canvas, rng: np.random.Generator) -> tuple[str, bool]:
    """Supine or portable AP chest: the PA drawing under a raised diaphragm, lines and leads on top."""
    _adult_chest(c, rng)
    c.ellipse(c.tissue, (0.0, 0.75), (1.1, 0.55), 0.25)
    c.stroke(c.bone, _arc((0.55, -1.4), (0.08, -0.2), 0.1), 0.012, 0.35)
    for _ in range(int(rng.integers(2, 5))):
        c.ellipse(c.bone, (rng.uniform(-0.7, 0.7), rng.uniform(-0.8, 0.4)), (0.04, 0.04), 0.6, kind="shell")
    return "AP", False


def _cervical_spine(c: _Canvas, rng: np.random.Generator) -> tuple[str, bool]:
    """Cervical spine, mostly lateral (skull base and jaw above, lordotic C2–C7, airway in front,
    shoulders below) or AP (small stacked bodies, jaw across the top, trachea, clavicles)."""
    if rng.random() < 0.7:
        c.stroke(c.tissue, [(0.05, -2.0), (0.05, 1.2)], [0.7, 0.8], 0.5)
        c.ellipse(c.tissue, (0.3, -1.7), (1.0, 0.6), 0.4)
        c.ellipse(c.bone, (0.35, -1.65), (0.95, 0.5), 0.3, kind="shell")
        jaw = [(-0.05, -1.55), (-0.15, -1.05), (-0.8, -0.95)]
        c.stroke(c.bone, jaw, [0.07, 0.09, 0.07], 0.3, kind="shell")
        airway = _arc((-0.5, -1.3), (-0.4, 1.6), rng.uniform(-0.1, 0.05))
        c.stroke(c.air, airway, 0.09, 0.6, kind="plateau", edge=0.4)
        half = (rng.uniform(0.15, 0.19), rng.uniform(0.07, 0.085))
        _column_lateral(
            c,
            x0=rng.uniform(-0.05, 0.1),
            y_top=-1.0,
            y_bottom=1.1,
            half=half,
            bend=rng.uniform(0.0, 0.12),
            amount=0.3,
        )
        c.ellipse(c.bone, (0.05, -1.15), (0.06, 0.14), 0.3, kind="shell")
        c.ellipse(c.tissue, (0.2, 1.6), (1.3, 0.45), 0.4)
        return "LL", bool(rng.random() < 0.3)
    c.stroke(c.tissue, [(0.0, -2.0), (0.0, 1.0)], [0.6, 0.7], 0.45)
    _column_ap(c, rng, y_top=-0.9, y_bottom=1.2, half=(0.16, 0.065), amount=0.28, sway=rng.uniform(0.0, 0.03))
    c.stroke(c.bone, _arc((-0.7, -1.3), (0.7, -1.3), 0.35, 7), 0.07, 0.35, kind="shell")
    c.stroke(c.air, [(0.0, -0.6), (0.0, 1.8)], [0.07, 0.09], 0.4, kind="plateau", edge=0.4)
    for side in (-1.0, 1.0):
        c.stroke(c.bone, _arc((side * 0.1, 1.35), (side * 1.1, 1.15), side * 0.05), 0.05, 0.3, kind="shell")
        c.ellipse(c.tissue, (side * 1.0, 1.6), (0.6, 0.5), 0.35)
    return "AP", False


def _thoracic_lateral(c: _Canvas, rng: np.random.Generator) -> tuple[str, bool]:
    """Thoracic spine, lateral: kyphotic bodies behind the lung field, ribs and scapulae across them."""
    _trunk(c, rng.uniform(1.2, 1.5), 0.6, center_x=-0.3)
    _lung(c, (-0.3, -2.2), 1.1, 2.4, dome=0.2, amount=0.5)
    half = (rng.uniform(0.19, 0.23), rng.uniform(0.085, 0.1))
    _column_lateral(
        c,
        x0=rng.uniform(0.1, 0.3),
        y_top=-1.8,
        y_bottom=1.8,
        half=half,
        bend=-rng.uniform(0.03, 0.12),
        amount=0.3,
    )
    for k in range(10):
        y = -1.7 + 0.35 * k
        c.stroke(c.bone, _arc((0.6, y), (-1.0, y + 0.5), 0.15), 0.03, 0.08, kind="shell")
    c.ellipse(c.bone, (0.45, rng.uniform(-1.2, -0.6)), (0.35, 0.7), 0.08, kind="shell")
    return "LL", bool(rng.random() < 0.5)


def _pelvis_ap(c: _Canvas, rng: np.random.Generator) -> str:
    """Pelvis AP: wings, sacrum, hips and proximal femurs filling the film, lower lumbar spine above."""
    _trunk(c, rng.uniform(1.1, 1.3), 0.6)
    _pelvis(c, rng, rng.uniform(-0.7, -0.45), rng.uniform(1.25, 1.45), 0.3)
    _column_ap(c, rng, y_top=-2.0, y_bottom=-0.7, half=(0.2, 0.1), amount=0.25, sway=0.0)
    _bowel_gas(c, rng, (-0.6, 0.6, -1.2, -0.3), int(rng.integers(2, 8)))
    return "AP"


def _child_limb(c: _Canvas, rng: np.random.Generator) -> str:
    """A child's knee or ankle: slender shafts, rounded epiphyses apart from them by dark growth plates."""
    joint = rng.uniform(-0.2, 0.2)
    w = rng.uniform(0.16, 0.2)
    c.stroke(c.tissue, [(0.0, -2.0), (0.0, joint), (0.0, 2.0)], [0.5, 0.48, 0.38], 0.5)
    c.stroke(c.bone, [(0.0, -2.0), (0.0, joint - 0.3)], [w, 1.4 * w], 0.42, kind="shell")
    c.ellipse(c.bone, (0.0, joint - 0.16), (1.6 * w, 0.09), 0.38, kind="shell")
    c.ellipse(c.bone, (0.0, joint + 0.16), (1.5 * w, 0.08), 0.38, kind="shell")
    c.stroke(c.bone, [(0.0, joint + 0.3), (0.0, 2.0)], [1.3 * w, 0.9 * w], 0.42, kind="shell")
    if rng.random() < 0.6:
        c.stroke(c.bone, [(1.3 * w, joint + 0.35), (1.1 * w, 2.0)], [0.04, 0.03], 0.3, kind="shell")
    return "AP" if rng.random() < 0.6 else "LL"


def _dxa(c: _Canvas, rng: np.random.Generator) -> str:
    """A bone densitometry scan: lumbar spine or hip on a flat grey field, cropped tight, with the
    region-of-interest lines burnt in."""
    c.tissue += 0.25
    if rng.random() < 0.5:
        _column_ap(c, rng, y_top=-1.5, y_bottom=1.5, half=(0.3, 0.16), amount=0.5, sway=0.0)
        for k in range(5):
            c.block(c.bone, (0.0, -1.2 + 0.6 * k), (0.6, 0.004), 1.0, kind="plateau")
    else:
        _pelvis(c, rng, -1.6, 2.2, 0.45)
        c.block(c.bone, (0.7, -0.2), (0.25, 0.25), 0.9, angle=35.0, kind="plateau", edge=0.02)
        c.block(c.bone, (0.7, -0.2), (0.23, 0.23), -0.9, angle=35.0, kind="plateau", edge=0.02)
    return "AP"


def _contrast_study(c: _Canvas, rng: np.random.Generator) -> str:
    """A fluoroscopy or contrast study: barium-filled bowel loops or oesophagus, brighter than bone."""
    _trunk(c, rng.uniform(0.9, 1.1), 0.55)
    _column_ap(c, rng, y_top=-1.6, y_bottom=1.6, half=(0.14, 0.075), amount=0.2, sway=0.02)
    if rng.random() < 0.5:
        path = [(rng.uniform(-0.1, 0.1), -1.8)] + [
            (rng.normal(0.05, 0.08), -1.8 + 0.6 * k) for k in range(1, 6)
        ]
        c.stroke(c.bone, path, rng.uniform(0.06, 0.12), 0.9, kind="plateau", edge=0.3)
    else:
        x, y = rng.uniform(-0.6, 0.6), rng.uniform(-1.0, 1.0)
        loop = [(x, y)]
        for _ in range(14):
            x = float(np.clip(x + rng.normal(0, 0.3), -0.8, 0.8))
            y = float(np.clip(y + rng.normal(0, 0.3), -1.4, 1.4))
            loop.append((x, y))
        c.stroke(c.bone, loop, rng.uniform(0.05, 0.1), 0.8, kind="plateau", edge=0.4)
    return "AP"


def _others_variety(c: _Canvas, rng: np.random.Generator) -> tuple[str, bool]:
    """What else an archive holds: pelvis, children's limbs, densitometry and contrast studies."""
    return _one_of(c, rng, [_pelvis_ap, _child_limb, _dxa, _contrast_study], [0.3, 0.3, 0.15, 0.25])


Drawer = Callable[[_Canvas, np.random.Generator], tuple[str, bool]]

_DRAWERS: dict[str, tuple[Drawer, tuple[float, float]]] = {
    "abdominal": (_abdominal, (0.95, 1.1)),
    "adult_chest": (_adult_chest, (0.92, 1.08)),
    "pediatric_chest": (_pediatric_chest, (0.7, 1.0)),
    "spine": (_spine, (0.8, 1.0)),
    "others": (_others, (0.7, 0.95)),
}
"""Each label's drawing function and the range of its pose scale (how much of the body fills the image)."""

VARIETY: dict[str, tuple[tuple[Drawer, float], ...]] = {
    "adult_chest": ((_adult_chest_lateral, 0.3), (_supine_chest, 0.2)),
    "pediatric_chest": ((_pediatric_chest_lateral, 0.3),),
    "spine": ((_cervical_spine, 0.35), (_thoracic_lateral, 0.2)),
    "others": ((_others_variety, 0.5),),
}
"""With ``variety``, the views real archives hold beside the classic ones (each with its share of the
label; the classic drawing keeps the rest): lateral and supine chests, infants' laterals, cervical and
thoracic spines, and for ``others`` pelvis, children's limbs, densitometry and contrast studies. A
model trained on the classic set alone learns one look per label; these teach it anatomy."""


def _blur_resample(n_out: int, n_in: int, sigma: float) -> FloatArray:
    """Gaussian blur + resampling from ``n_in`` to ``n_out`` samples as one (n_out, n_in) matrix."""
    step = n_in / n_out
    centers = (np.arange(n_out, dtype=np.float64) + 0.5) * step - 0.5
    width = math.hypot(sigma, 0.5 * step) if step > 1 else sigma
    dist = np.arange(n_in, dtype=np.float64)[None, :] - centers[:, None]
    weights = np.exp(-0.5 * (dist / width) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def _collimate(image: FloatArray, rng: np.random.Generator) -> None:
    """Unexposed margins outside the collimator blades: bright, with a slightly soft edge."""
    rows, cols = image.shape
    top, bottom = rng.uniform(0.0, 0.12, 2) * rows
    left, right = rng.uniform(0.0, 0.14, 2) * cols
    ramp_r = np.clip(np.minimum(np.arange(rows) - top, rows - 1 - bottom - np.arange(rows)), 0.0, 2.0) / 2.0
    ramp_c = np.clip(np.minimum(np.arange(cols) - left, cols - 1 - right - np.arange(cols)), 0.0, 2.0) / 2.0
    inside = (ramp_r[:, None] * ramp_c[None, :]).astype(np.float32)
    level = rng.uniform(0.82, 0.95)
    image *= inside
    image += level * (1.0 - inside)


def render_view(
    label: str, rng: np.random.Generator, shape: tuple[int, int], *, variety: bool = False
) -> tuple[FloatArray, str]:
    """One phantom of ``label`` and the DICOM ViewPosition it was drawn in (``PA``, ``AP``, ``LL``);
    with ``variety`` also the views of ``VARIETY``.

    The writer needs the view to keep the header consistent with the pixels; the image alone is
    ``render_phantom``.
    """
    if label not in _DRAWERS:
        raise ValueError(f"unknown label {label!r}; known: {', '.join(LABELS)}")
    rows, cols = shape
    if rows < 8 or cols < 8:
        raise ValueError(f"shape {shape} too small: at least 8x8 pixels")
    long_side = max(rows, cols)
    k = min(max(long_side, _RENDER_LONG_SIDE[0]), _RENDER_LONG_SIDE[1]) / long_side
    inner = (max(8, round(rows * k)), max(8, round(cols * k)))
    draw, scale = _DRAWERS[label]
    if variety and label in VARIETY:
        pick = rng.random()
        for drawer, share in VARIETY[label]:
            if pick < share:
                draw = drawer
                break
            pick -= share
    canvas = _Canvas(inner, rng, scale)
    view, flip = draw(canvas, rng)
    image = canvas.compose()
    if rng.random() < 0.25:
        _collimate(image, rng)
    sigma = rng.uniform(0.5, 1.0)
    out = _blur_resample(rows, inner[0], sigma) @ image @ _blur_resample(cols, inner[1], sigma).T
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32), view


def render_phantom(
    label: str, rng: np.random.Generator, shape: tuple[int, int], *, variety: bool = False
) -> FloatArray:
    """A float32 attenuation image in [0, 1] of ``label`` (bone bright, air dark), varied by ``rng``."""
    return render_view(label, rng, shape, variety=variety)[0]
