"""Hypothesis strategies for batched node inputs (needs ``hypothesis``: ``pip install ddnlib[testing]``).

``node_inputs(*tails)`` draws a tuple of tensors ``x_k`` of shape ``(b, *tails[k])`` sharing one
batch size ``b``, with values ``scale · z`` where ``z`` lies in ``[−1, 1]``, ``scale`` ranges over
``1e-6 … 1e6`` and the values follow one of the ``PATTERNS``:

- ``"random"``: independent values;
- ``"ties"``: values on a coarse grid, so entries repeat within a row;
- ``"equal rows"``: some rows with all entries equal (e.g. every point of a cloud at one place);
- ``"zeros"``: some rows all zero.

A user property test then reads::

    @given(node_inputs((6,)))
    def test_my_node(xs):
        assert_gradients(MyNode(), *xs)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = ["PATTERNS", "SCALES", "scales", "shapes", "batched", "node_inputs"]

PATTERNS = ("random", "ties", "equal rows", "zeros")
SCALES = (1e-6, 1e-3, 1.0, 1e3, 1e6)
_GRID = 4  # "ties": values in {−1, −3/4, …, 1}


def scales(low: float = 1e-6, high: float = 1e6) -> st.SearchStrategy[float]:
    """Magnitudes of the inputs: the powers of ten in ``SCALES`` between ``low`` and ``high``."""
    chosen = [s for s in SCALES if low <= s <= high]
    if not chosen:
        raise ValueError(f"scales(low={low!r}, high={high!r}): no scale of {SCALES} in range")
    return st.sampled_from(chosen)


def shapes(min_dims: int = 1, max_dims: int = 2, min_side: int = 1, max_side: int = 6
           ) -> st.SearchStrategy[tuple[int, ...]]:
    """Per-sample shapes ``tails`` (without the batch dimension)."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                            max_side=max_side)


def _tail(tail) -> st.SearchStrategy[tuple[int, ...]]:
    if isinstance(tail, st.SearchStrategy):
        return tail
    if isinstance(tail, int):
        tail = (tail,)
    if not (isinstance(tail, Sequence) and all(isinstance(d, int) and d >= 0 for d in tail)):
        raise TypeError(f"tail={tail!r}: expected a tuple of non-negative ints or a strategy")
    return st.just(tuple(tail))


@st.composite
def batched(draw, shape, dtype: torch.dtype = torch.float64, scale=None, pattern=None
            ) -> torch.Tensor:
    """One tensor of the full shape ``shape`` (batch first) following a pattern (see module)."""
    shape = tuple(draw(_tail(shape)))
    scale = draw(scale if scale is not None else scales())
    pattern = draw(pattern if pattern is not None else st.sampled_from(PATTERNS))
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r}: expected one of {PATTERNS}")
    z = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1, 1, allow_subnormal=False)))
    if pattern == "ties":
        z = np.round(z * _GRID) / _GRID
    elif pattern in ("equal rows", "zeros") and shape and shape[0] > 0:
        rows = draw(st.lists(st.integers(0, shape[0] - 1), min_size=1, max_size=shape[0]))
        for r in rows:
            z[r] = 0.0 if pattern == "zeros" else z[r].flat[0] if z[r].size else 0.0
    return torch.from_numpy(scale * z).to(dtype)


@st.composite
def node_inputs(draw, *tails, batch=None, dtype: torch.dtype = torch.float64, scale=None,
                pattern=None) -> tuple[torch.Tensor, ...]:
    """A tuple of inputs ``(b, *tails[k])`` with one batch size ``b`` (default 1 to 4).

    Each of ``tails``, ``batch``, ``scale`` and ``pattern`` may be a value or a strategy; ``scale``
    and ``pattern`` are drawn once and shared by all inputs.
    """
    if not tails:
        raise TypeError("node_inputs() needs the per-sample shape of at least one input")
    b = draw(batch if isinstance(batch, st.SearchStrategy) else
             st.just(batch) if batch is not None else st.integers(1, 4))
    scale = st.just(draw(scale if isinstance(scale, st.SearchStrategy) else
                         st.just(scale) if scale is not None else scales()))
    pattern = st.just(draw(pattern if isinstance(pattern, st.SearchStrategy) else
                           st.just(pattern) if pattern is not None else st.sampled_from(PATTERNS)))
    return tuple(draw(batched((b, *draw(_tail(t))), dtype, scale, pattern)) for t in tails)
