"""The ten class shapes of the synthetic set, as filled polygons in unit coordinates.

Each shape is a list of polygons (circumradius exactly 1) filled in order with 1 (object)
or 0 (hole), so rings and crescents are true holes; :mod:`service.models.synthetic` places
one at a random pose on a cluttered background.
"""

from __future__ import annotations

import math

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "heart",
    "arrow",
    "crescent",
)


def _circle(n: int = 48, radius: float = 1.0, cx: float = 0.0) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([cx + radius * np.cos(t), radius * np.sin(t)], axis=1)


def _regular(k: int, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.arange(k) * 2.0 * math.pi / k
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart(n: int = 64) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)
    return pts / np.abs(pts).max()


_W = 0.32  # half-width of the cross's arms and the arrow's shaft
# Each shape: polygons in unit coordinates (circumradius about 1), filled in order with
# 1 (object) or 0 (hole), so rings and crescents are true holes showing the background.
SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_circle(), 1)],
    "square": [(_regular(4, math.pi / 4), 1)],
    "triangle": [(_regular(3), 1)],
    "star": [(_star(), 1)],
    "cross": [
        (
            np.array(
                [
                    [-_W, -1],
                    [_W, -1],
                    [_W, -_W],
                    [1, -_W],
                    [1, _W],
                    [_W, _W],
                    [_W, 1],
                    [-_W, 1],
                    [-_W, _W],
                    [-1, _W],
                    [-1, -_W],
                    [-_W, -_W],
                ],
                dtype=np.float64,
            ),
            1,
        )
    ],
    "ring": [(_circle(), 1), (_circle(radius=0.55), 0)],
    "hexagon": [(_regular(6, 0.0), 1)],
    "heart": [(_heart(), 1)],
    "arrow": [
        (
            np.array(
                [
                    [-1, -0.25],
                    [0.1, -0.25],
                    [0.1, -0.7],
                    [1, 0],
                    [0.1, 0.7],
                    [0.1, 0.25],
                    [-1, 0.25],
                ],
                dtype=np.float64,
            ),
            1,
        )
    ],
    "crescent": [(_circle(), 1), (_circle(radius=0.85, cx=0.5), 0)],
}
assert set(SHAPES) == set(CLASS_NAMES)
# Scale every shape to circumradius exactly 1 (the cross's and arrow's corners stick out).
for _polys in SHAPES.values():
    _r = max(float(np.linalg.norm(p, axis=1).max()) for p, _ in _polys)
    _polys[:] = [(p / _r, v) for p, v in _polys]
