"""Embedded point-cloud data: parametric 3-D shapes sampled on their surfaces.

Each sample is a shape of one of :data:`CLASSES`, sampled area-uniformly on its surface, then
anisotropically stretched (per-axis factors in ``[1 - aniso, 1 + aniso]``), randomly posed
(a uniform turn about the vertical axis and a tilt of up to ``tilt``, like the mostly upright
ModelNet40 shapes; a point-wise MLP with global pooling has no rotation invariance to learn a
full SO(3) from a few hundred examples), perturbed by Gaussian noise of standard deviation ``noise``, centred,
scaled into the unit ball (as ModelNet40 clouds are) and finally shrunk by a random factor in
``[0.7, 1]``. Sample ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, s, i])``,
so a data set is a pure function of ``(seed, split, index)``.

Outliers for the robustness study **replace** a fraction of the points by points drawn uniformly
in the unit ball (:func:`add_outliers`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["CLASSES", "sample_shape", "make_dataset", "add_outliers", "uniform_ball"]

_SPLITS = {"train": 0, "test": 1}


def _sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _mesh(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """Area-uniform samples on a triangle mesh."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    f = rng.choice(len(faces), size=n, p=area / area.sum())
    u, v = rng.random((2, n))
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    return a[f] + u[:, None] * (b[f] - a[f]) + v[:, None] * (c[f] - a[f])


_CUBE_V = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
_CUBE_F = np.array(
    [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
     [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]
)
_PYRAMID_V = np.array([[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1], [0, 0, 1]], float)
_PYRAMID_F = np.array([[0, 1, 2], [0, 2, 3], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
_TETRA_V = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)
_TETRA_F = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
_OCTA_V = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
_OCTA_F = np.array([[i, j, k] for i in (0, 1) for j in (2, 3) for k in (4, 5)])


def _disc(rng: np.random.Generator, n: int, r_in: float, r_out: float, z: float) -> np.ndarray:
    rad = np.sqrt(rng.uniform(r_in**2, r_out**2, n))
    t = rng.uniform(0, 2 * np.pi, n)
    return np.stack([rad * np.cos(t), rad * np.sin(t), np.full(n, z)], 1)


def _split(rng: np.random.Generator, n: int, areas: list[float]) -> np.ndarray:
    """How many of ``n`` points fall on each part, proportional to its area."""
    p = np.asarray(areas) / np.sum(areas)
    return rng.multinomial(n, p)


def _cylinder(rng, n, r=0.5, h=1.0):
    side, cap = _split(rng, n, [2 * np.pi * r * 2 * h, np.pi * r * r])
    t = rng.uniform(0, 2 * np.pi, side)
    tube = np.stack([r * np.cos(t), r * np.sin(t), rng.uniform(-h, h, side)], 1)
    ends = _disc(rng, cap, 0, r, 0.0)
    ends[:, 2] = rng.choice([-h, h], cap)
    return np.concatenate([tube, ends])


def _cone(rng, n, r=0.8, h=1.6):
    slant = np.hypot(r, h)
    side, base = _split(rng, n, [np.pi * r * slant, np.pi * r * r])
    s = np.sqrt(rng.random(side))  # fraction of the way from apex to base, area-uniform
    t = rng.uniform(0, 2 * np.pi, side)
    lateral = np.stack([s * r * np.cos(t), s * r * np.sin(t), h / 2 - s * h], 1)
    return np.concatenate([lateral, _disc(rng, base, 0, r, -h / 2)])


def _torus(rng, n, big=0.7, small=0.3):
    out = np.empty((0, 3))
    while len(out) < n:  # rejection on the area element (R + r cos v)
        u, v = rng.uniform(0, 2 * np.pi, (2, 2 * n))
        keep = rng.random(2 * n) < (big + small * np.cos(v)) / (big + small)
        u, v = u[keep], v[keep]
        ring = big + small * np.cos(v)
        out = np.concatenate([out, np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], 1)])
    return out[:n]


def _capsule(rng, n, r=0.4, h=0.6):
    side, caps = _split(rng, n, [2 * np.pi * r * 2 * h, 4 * np.pi * r * r])
    t = rng.uniform(0, 2 * np.pi, side)
    tube = np.stack([r * np.cos(t), r * np.sin(t), rng.uniform(-h, h, side)], 1)
    ball = r * _sphere(rng, caps)
    ball[:, 2] += np.where(ball[:, 2] > 0, h, -h)
    return np.concatenate([tube, ball])


def _bowl(rng, n):
    p = _sphere(rng, n)
    p[:, 2] = -np.abs(p[:, 2])
    return p


def _helix(rng, n, radius=0.7, pitch=0.5, turns=3.0, tube=0.1):
    t = rng.uniform(0, 2 * np.pi * turns, n)
    centre = np.stack([radius * np.cos(t), radius * np.sin(t), pitch * t / (2 * np.pi)], 1)
    return centre + tube * _sphere(rng, n)


def _annulus(rng, n):
    return _disc(rng, n, 0.5, 1.0, 0.0)


CLASSES: dict[str, callable] = {
    "sphere": _sphere,
    "cube": lambda rng, n: _mesh(_CUBE_V, _CUBE_F, rng, n),
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "pyramid": lambda rng, n: _mesh(_PYRAMID_V, _PYRAMID_F, rng, n),
    "tetrahedron": lambda rng, n: _mesh(_TETRA_V, _TETRA_F, rng, n),
    "octahedron": lambda rng, n: _mesh(_OCTA_V, _OCTA_F, rng, n),
    "capsule": _capsule,
    "bowl": _bowl,
    "helix": _helix,
    "annulus": _annulus,
}


def _rotation(rng: np.random.Generator, tilt: float) -> np.ndarray:
    """A random pose: a uniform turn about the vertical ``z`` axis after a tilt about a random
    horizontal axis by an angle uniform in ``[0, tilt]`` (radians)."""
    phi, t, psi = rng.uniform(0, 2 * np.pi), rng.uniform(0, tilt), rng.uniform(0, 2 * np.pi)

    def about_z(a):
        return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])

    tilt_x = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return about_z(phi) @ about_z(psi) @ tilt_x @ about_z(-psi)


def sample_shape(
    label: int, rng: np.random.Generator, num_points: int = 1024, aniso: float = 0.3,
    noise: float = 0.01, tilt: float = np.pi / 6,
) -> np.ndarray:
    """One cloud ``(num_points, 3)`` of class ``label`` (index into :data:`CLASSES`), float32."""
    names = list(CLASSES)
    if not 0 <= label < len(names):
        raise ValueError(f"label={label}: expected an integer in [0, {len(names)})")
    p = CLASSES[names[label]](rng, num_points)
    p = p * rng.uniform(1 - aniso, 1 + aniso, 3)
    p = p @ _rotation(rng, tilt).T + noise * rng.standard_normal(p.shape)
    p = p - p.mean(0)
    p = p / np.linalg.norm(p, axis=1).max() * rng.uniform(0.7, 1.0)
    return p.astype(np.float32)


def make_dataset(
    split: str, per_class: int, seed: int = 0, num_points: int = 1024, num_classes: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(points (n, num_points, 3) float32, labels (n,) int64)``, classes interleaved."""
    if split not in _SPLITS:
        raise ValueError(f"split={split!r}: expected one of {list(_SPLITS)}")
    k = len(CLASSES) if num_classes is None else num_classes
    if not 1 <= k <= len(CLASSES):
        raise ValueError(f"num_classes={num_classes}: expected 1..{len(CLASSES)}")
    if per_class < 1:
        raise ValueError(f"per_class={per_class}: expected a positive integer")
    labels = np.tile(np.arange(k), per_class)
    clouds = np.stack(
        [
            sample_shape(int(y), np.random.default_rng([seed, _SPLITS[split], i]), num_points)
            for i, y in enumerate(labels)
        ]
    )
    return torch.from_numpy(clouds), torch.from_numpy(labels)


def uniform_ball(shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """Points uniform in the unit ball, ``(*shape, 3)``: Gaussian direction, radius ``U^{1/3}``."""
    d = torch.randn(*shape, 3, generator=generator)
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return d * torch.rand(*shape, 1, generator=generator) ** (1 / 3)


def add_outliers(points: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """A copy of ``points (b, n, 3)`` with ``round(rate n)`` random points of each cloud replaced
    by points uniform in the unit ball."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate={rate}: expected a fraction in [0, 1]")
    b, n, _ = points.shape
    k = int(round(rate * n))
    out = points.clone()
    if k == 0:
        return out
    idx = torch.rand(b, n, generator=generator).argsort(dim=1)[:, :k]
    noise = uniform_ball((b, k), generator).to(points)
    out.scatter_(1, idx[..., None].expand(b, k, 3), noise)
    return out
