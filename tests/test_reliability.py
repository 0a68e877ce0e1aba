"""Reliability of the bundled nodes and of generic nodes: bad input, non-finite samples, numerical
faults, input immutability, threads, reproducibility, serialisation, double backward.

The NaN/Inf policy tested here is documented in ``docs/reliability.md``:

- projections and generic nodes: a sample with a non-finite input gets an output with a non-finite
  entry (L∞: ``±inf`` is clamped to ``±r``) and NaN input gradients; every other sample's output
  and input gradient, and the parameter gradients, equal those of a call without the bad sample.
- robust pooling: a row with a non-finite entry raises ``ValueError`` naming the row.
"""

from __future__ import annotations

import ast
import copy
import io
import math
import pathlib
import pickle
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import ddnlib
import ddnlib.testing
from ddnlib import DeclarativeNode, Options
from ddnlib.errors import DDNWarning, NonConvergenceError, NonConvergenceWarning
from ddnlib.nodes import (PENALTIES, L1Ball, L1Sphere, L2Ball, L2Sphere, LInfBall, LInfSphere,
                          RobustGlobalPool1d, RobustGlobalPool2d, project, robust_global_pool)
from toy_nodes import PseudoHuberRegression

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECTIONS = (L1Sphere, L1Ball, L2Sphere, L2Ball, LInfSphere, LInfBall)
F64 = torch.float64


# -- generic nodes on the default solvers (unconstrained Newton, SQP, inequality fallback) -------

class QuarticSphere(DeclarativeNode):
    """``y = argmin ½‖y − x‖² + ¼ s Σ y⁴`` subject to ``‖y‖² = 1``, learnable ``s``."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(0.1, dtype=F64))

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + 0.25 * self.s * (y ** 4).sum(-1)

    def equality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - 1


class HalfSpace(DeclarativeNode):
    """``y = argmin ½‖y − x‖²`` subject to ``Σ y ≤ b``, learnable ``b``."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor(0.5, dtype=F64))

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - self.b


# -- the bundled nodes, each with a float64 input batch (samples along dim 0) -------------------

def _pool1d(penalty):
    def make():
        extra = dict(alpha=1.3, learn_alpha=True) if penalty == "general" else {}
        node = RobustGlobalPool1d(penalty, c=0.7, learn_c=penalty != "quadratic", channels=3,
                                  **extra)
        return node.double(), torch.randn(4, 3, 9, dtype=F64)
    return make


def _projection(cls):
    def make():
        return cls(0.8, learn_radius=True).double(), 1.5 * torch.randn(5, 6, dtype=F64)
    return make


BUNDLED = {
    **{cls.__name__: _projection(cls) for cls in PROJECTIONS},
    **{f"pool1d-{p}": _pool1d(p) for p in PENALTIES},
    "pool2d-huber": lambda: (RobustGlobalPool2d("huber", c=0.5, learn_c=True).double(),
                             torch.randn(3, 2, 4, 5, dtype=F64)),
}
GENERIC = {
    "newton": lambda: (PseudoHuberRegression(), torch.randn(4, 6, dtype=F64)),
    "newton-cg": lambda: (PseudoHuberRegression(options=Options(linear_solver="cg")),
                          torch.randn(4, 6, dtype=F64)),
    "sqp": lambda: (QuarticSphere(), torch.randn(4, 3, dtype=F64)),
    "inequality": lambda: (HalfSpace(), torch.randn(3, 3, dtype=F64)),
}
ALL = {**BUNDLED, **GENERIC}


def _run(node, x, v=None):
    """Output and gradients (input, then every learnable parameter) of ``⟨v, node(x)⟩``."""
    x = x.detach().clone().requires_grad_()
    y = node(x)
    v = torch.ones_like(y) if v is None else v
    params = [p for p in node.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * v).sum(), [x, *params])
    return y.detach(), grads


# -- 1. validation at every public entry point ---------------------------------------------------

def _call(cls, *args, **kwargs):
    return lambda: cls(*args, **kwargs)


def _pool1d_call(x, **kwargs):
    return lambda: RobustGlobalPool1d(**kwargs)(x)


def _proj_call(x, cls=L2Ball):
    return lambda: cls()(x)


_X3 = torch.randn(2, 3, 5)
BAD_INPUT = {
    # constructors of the projections
    "radius=0": (_call(L2Ball, 0.0), ValueError, "radius=0.0"),
    "radius<0": (_call(L1Sphere, -1.0), ValueError, "radius=-1.0"),
    "radius=nan": (_call(LInfBall, float("nan")), ValueError, "radius=nan"),
    "radius=inf": (_call(L2Sphere, float("inf")), ValueError, "radius=inf"),
    "radius=str": (_call(L2Ball, "1"), TypeError, "radius='1'"),
    "radius=bool": (_call(L2Ball, True), TypeError, "radius=True"),
    "learn_radius=str": (_call(L2Ball, 1.0, "yes"), TypeError, "learn_radius='yes'"),
    "options=dict": (_call(L2Ball, 1.0, False, {"strict": True}), TypeError, "options="),
    # calls of the projections
    "proj x int": (_proj_call(torch.ones(2, 3, dtype=torch.int64)), TypeError, "torch.int64"),
    "proj x complex": (_proj_call(torch.ones(2, 3, dtype=torch.complex64)), TypeError,
                       "torch.complex64"),
    "proj x half": (_proj_call(torch.ones(2, 3, dtype=torch.float16)), TypeError,
                    "torch.float16"),
    "proj x bfloat16": (_proj_call(torch.ones(2, 3, dtype=torch.bfloat16), L1Ball), TypeError,
                        "torch.bfloat16"),
    "proj x 0-d": (_proj_call(torch.tensor(1.0), LInfSphere), ValueError, "shape ()"),
    "proj x n=0": (_proj_call(torch.ones(3, 0), L1Sphere), ValueError, "shape (3, 0)"),
    "proj x list": (_proj_call([[1.0, 2.0]]), TypeError, "x is list"),
    # functional projection
    "project p=3": (lambda: project(torch.randn(2, 3), p=3), ValueError, "p=3"),
    "project p='two'": (lambda: project(torch.randn(2, 3), p="two"), ValueError, "p='two'"),
    "project p=True": (lambda: project(torch.randn(2, 3), p=True), ValueError, "p=True"),
    "project kind": (lambda: project(torch.randn(2, 3), kind="cube"), ValueError, "kind='cube'"),
    "project radius=0": (lambda: project(torch.randn(2, 3), radius=0.0), ValueError, "radius=0.0"),
    "project radius 1-d": (lambda: project(torch.randn(2, 3), radius=torch.ones(2)), ValueError,
                           "radius has shape (2,)"),
    "project radius int": (lambda: project(torch.randn(2, 3), radius=torch.tensor(2)), ValueError,
                           "torch.int64"),
    "project radius<0 grad": (
        lambda: project(torch.randn(2, 3), radius=torch.tensor(-1.0, requires_grad=True)),
        ValueError, "radius=-1.0"),
    "project x int": (lambda: project(torch.ones(2, 3, dtype=torch.int32)), TypeError,
                      "torch.int32"),
    # constructors of the pooling modules
    "penalty unknown": (_call(RobustGlobalPool1d, "cauchy"), ValueError, "penalty='cauchy'"),
    "penalty int": (_call(RobustGlobalPool2d, 3), ValueError, "penalty=3"),
    "c=0": (_call(RobustGlobalPool1d, c=0.0), ValueError, "c=0.0"),
    "c<0": (_call(RobustGlobalPool2d, c=-2.0), ValueError, "c=-2.0"),
    "c=nan": (_call(RobustGlobalPool1d, c=float("nan")), ValueError, "c=nan"),
    "c=inf": (_call(RobustGlobalPool1d, c=float("inf"), learn_c=True), ValueError, "c=inf"),
    "c=str": (_call(RobustGlobalPool1d, c="1"), TypeError, "c='1'"),
    "c per channel <0": (_call(RobustGlobalPool1d, c=torch.tensor([1.0, -1.0]), channels=2),
                         ValueError, "c=tensor"),
    "c wrong channels": (_call(RobustGlobalPool1d, c=torch.ones(3), channels=2), ValueError,
                         "c has shape (3,)"),
    "alpha above range": (_call(RobustGlobalPool1d, "general", alpha=3.5), ValueError,
                          "alpha=3.5"),
    "alpha at open end": (_call(RobustGlobalPool1d, "general", alpha=0.0), ValueError,
                          "alpha=0.0"),
    "alpha outside custom range": (
        _call(RobustGlobalPool1d, "general", alpha=1.0, alpha_range=(1.5, 2.5)), ValueError,
        "alpha=1.0"),
    "alpha_range reversed": (_call(RobustGlobalPool1d, "general", alpha_range=(3.0, 0.0)),
                             ValueError, "alpha_range=(3.0, 0.0)"),
    "alpha_range inf": (_call(RobustGlobalPool1d, "general", alpha_range=(0.0, math.inf)),
                        ValueError, "alpha_range=(0.0, inf)"),
    "alpha_range str": (_call(RobustGlobalPool1d, "general", alpha_range="ab"), ValueError,
                        "alpha_range='ab'"),
    "learn_alpha not general": (_call(RobustGlobalPool1d, "huber", learn_alpha=True), ValueError,
                                "learn_alpha=True"),
    "channels=0": (_call(RobustGlobalPool1d, channels=0), ValueError, "channels=0"),
    "channels=float": (_call(RobustGlobalPool1d, channels=2.0), ValueError, "channels=2.0"),
    "starts=0": (_call(RobustGlobalPool1d, "welsch", starts=0), ValueError, "starts=0"),
    # calls of the pooling modules
    "pool x 2-d": (_pool1d_call(torch.randn(2, 3)), ValueError, "shape (2, 3)"),
    "pool x 4-d": (_pool1d_call(torch.randn(2, 3, 4, 5)), ValueError, "shape (2, 3, 4, 5)"),
    "pool x 0-d": (_pool1d_call(torch.tensor(1.0)), ValueError, "shape ()"),
    "pool x int": (_pool1d_call(torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "torch.int64"),
    "pool x complex": (_pool1d_call(torch.ones(2, 3, 4, dtype=torch.complex128)), TypeError,
                       "torch.complex128"),
    "pool x half": (_pool1d_call(torch.ones(2, 3, 4, dtype=torch.float16)), TypeError,
                    "torch.float16"),
    "pool x numpy": (_pool1d_call(_X3.numpy()), TypeError, "x is ndarray"),
    "pool wrong channels": (_pool1d_call(_X3, channels=4), ValueError, "3 channels"),
    "pool no points": (_pool1d_call(torch.randn(2, 3, 0)), ValueError, "shape (2, 3, 0)"),
    "pool2d x 3-d": (lambda: RobustGlobalPool2d()(_X3), ValueError, "shape (2, 3, 5)"),
    # functional pooling
    "rgp penalty": (lambda: robust_global_pool(_X3, "l1"), ValueError, "penalty='l1'"),
    "rgp c=0": (lambda: robust_global_pool(_X3, c=0.0), ValueError, "c="),
    "rgp c<0 tensor": (lambda: robust_global_pool(_X3, c=-torch.ones(3)), ValueError, "c="),
    "rgp alpha nan": (lambda: robust_global_pool(_X3, "general", alpha=float("nan")), ValueError,
                      "alpha="),
    "rgp c str": (lambda: robust_global_pool(_X3, c="big"), TypeError, "c='big'"),
    "rgp c shape": (lambda: robust_global_pool(_X3, c=torch.ones(4)), ValueError,
                    "c has shape (4,)"),
    "rgp c dtype": (lambda: robust_global_pool(_X3, c=torch.ones(3, dtype=F64)), TypeError,
                    "torch.float64"),
    "rgp c device": (lambda: robust_global_pool(_X3, c=torch.ones(3, device="meta")),
                     ValueError, "meta"),
    "rgp dim range": (lambda: robust_global_pool(_X3, dim=5), ValueError, "dim=5"),
    "rgp dim repeated": (lambda: robust_global_pool(_X3, dim=(2, -1)), ValueError, "dim=(2, -1)"),
    "rgp dim str": (lambda: robust_global_pool(_X3, dim="last"), TypeError, "dim='last'"),
    "rgp dim empty": (lambda: robust_global_pool(_X3, dim=()), TypeError, "dim=()"),
    "rgp x int": (lambda: robust_global_pool(torch.ones(2, 3, dtype=torch.int16)), TypeError,
                  "torch.int16"),
    "rgp x half": (lambda: robust_global_pool(torch.ones(2, 3, dtype=torch.float16)), TypeError,
                   "torch.float16"),
    "rgp x list": (lambda: robust_global_pool([1.0, 2.0]), TypeError, "x is list"),
    # generic nodes and Options
    "options damping<0": (lambda: Options(damping=-1.0), ValueError, "damping=-1.0"),
    "options solver": (lambda: Options(linear_solver="lu"), ValueError, "linear_solver='lu'"),
    "options max_iter": (lambda: Options(max_iter=0), ValueError, "max_iter=0"),
    "options tol nan": (lambda: Options(solver_tol=float("nan")), ValueError, "solver_tol=nan"),
    "generic x int": (lambda: PseudoHuberRegression()(torch.ones(2, 6, dtype=torch.int64)),
                      TypeError, "torch.int64"),
    "generic x 0-d": (lambda: PseudoHuberRegression()(torch.tensor(1.0, dtype=F64)), ValueError,
                      "0-d"),
    "generic x device": (lambda: ddnlib_two_inputs()(torch.ones(2, 3, dtype=F64),
                                                     torch.ones(2, 3, dtype=F64, device="meta")),
                         ValueError, "meta"),
    # ddnlib.testing
    "check_gradients node": (lambda: ddnlib.testing.check_gradients("node", torch.ones(2, 3)),
                             TypeError, "node='node'"),
    "check_gradients eps": (lambda: ddnlib.testing.check_gradients(
        PseudoHuberRegression(), torch.ones(2, 6, dtype=F64), eps=-1e-6), ValueError, "eps=-1e-06"),
    "check_vjp samples": (lambda: ddnlib.testing.check_vjp(
        L2Ball(), torch.ones(2, 3, dtype=F64), samples=0), ValueError, "samples=0"),
    "check_optimality tol": (lambda: ddnlib.testing.check_optimality(
        L2Ball(), torch.ones(2, 3, dtype=F64), tol=-1.0), ValueError, "tol=-1.0"),
    "check_optimality perturbations": (lambda: ddnlib.testing.check_optimality(
        L2Ball(), torch.ones(2, 3, dtype=F64), perturbations=-2), ValueError, "perturbations=-2"),
    "strategies scales": (lambda: ddnlib.testing.scales(low=1e7), ValueError, "low=10000000.0"),
    "check_gradients x int": (
        lambda: ddnlib.testing.check_gradients(PseudoHuberRegression(),
                                               torch.ones(2, 6, dtype=torch.int64)),
        ValueError, "torch.int64"),
}


def ddnlib_two_inputs():
    from toy_nodes import WeightedMean
    return WeightedMean()


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_raises_naming_argument_and_value(case):
    call, error, shown = BAD_INPUT[case]
    with pytest.raises(error) as info:
        call()
    assert shown in str(info.value), f"{case}: {info.value!s} does not show {shown!r}"


def test_library_has_no_assert_statements():
    """``python -O`` strips asserts: validation must not rely on them."""
    offenders = []
    for folder in ("ddnlib", "nodes"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            offenders += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(tree)
                          if isinstance(n, ast.Assert)]
    assert offenders == []


_OPTIMISED = """
import torch
from ddnlib.nodes import L2Ball, RobustGlobalPool1d, robust_global_pool
for call in (lambda: L2Ball(-1.0), lambda: RobustGlobalPool1d(c=0.0),
             lambda: robust_global_pool(torch.ones(2, 3, dtype=torch.int64)),
             lambda: L2Ball()(torch.ones(2, 3, dtype=torch.float16))):
    try:
        call()
    except (TypeError, ValueError) as e:
        print(type(e).__name__)
"""


def test_validation_is_unchanged_under_python_O():
    out = subprocess.run([sys.executable, "-O", "-c", _OPTIMISED], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert out == "ValueError\nValueError\nTypeError\nTypeError\n"


@pytest.mark.parametrize("name", list(BUNDLED))
def test_empty_batch_gives_empty_output_and_zero_gradients(name):
    node, x = BUNDLED[name]()
    empty = x[:0].clone().requires_grad_()
    y = node(empty)
    assert y.shape == (0, *node(x).shape[1:])
    params = [p for p in node.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.sum(), [empty, *params], allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(BUNDLED))
def test_output_and_gradients_follow_the_input_device_and_dtype(name, dtype):
    node, x = BUNDLED[name]()
    node = node.to("cuda", dtype)
    y, grads = _run(node, x.to("cuda", dtype))
    y_cpu, grads_cpu = _run(node.cpu(), x.to(dtype))
    assert y.device.type == "cuda" and y.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(y.cpu(), y_cpu, **tol)
    for g, g_cpu in zip(grads, grads_cpu):
        torch.testing.assert_close(g.cpu(), g_cpu, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_different_devices_are_rejected():
    x = torch.randn(2, 3, 5, device="cuda")
    with pytest.raises(ValueError, match="c is on cpu"):
        robust_global_pool(x, c=torch.ones(3))
    from toy_nodes import WeightedMean
    with pytest.raises(ValueError, match="input 1 is on cpu"):
        WeightedMean()(x[:, 0], torch.ones(2, 5))


# -- 2. numerical faults ---------------------------------------------------------------------------

NON_FINITE = pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf],
                                     ids=["nan", "inf", "-inf"])


@NON_FINITE
@pytest.mark.parametrize("name", [n for n in ALL if not n.startswith("pool")])
def test_non_finite_sample_does_not_poison_the_others(name, bad):
    node, x = ALL[name]()
    x_bad = x.clone()
    x_bad[1].view(-1)[2] = bad
    keep = [i for i in range(x.shape[0]) if i != 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DDNWarning)  # the bad sample is reported
        y_bad, (gx_bad, *gp_bad) = _run(node, x_bad)
        y_ref, (gx_ref, *gp_ref) = _run(node, x[keep])
    if math.isnan(bad) or not name.startswith("LInf"):  # L∞: ±inf is clamped to ±r, its limit
        assert not torch.isfinite(y_bad[1]).all(), "a non-finite input gave a finite output"
    torch.testing.assert_close(y_bad[keep], y_ref, rtol=1e-7, atol=1e-9)
    assert torch.isnan(gx_bad[1]).all()
    torch.testing.assert_close(gx_bad[keep], gx_ref, rtol=1e-6, atol=1e-8)
    for g, ref in zip(gp_bad, gp_ref):  # the bad sample adds nothing to parameter gradients
        torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-8)


@NON_FINITE
@pytest.mark.parametrize("name", [n for n in BUNDLED if n.startswith("pool")])
def test_non_finite_row_is_rejected_by_pooling(name, bad):
    node, x = BUNDLED[name]()
    x[2, 1].view(-1)[3] = bad
    with pytest.raises(ValueError, match=r"pooled row \d+ of x .* expected finite values"):
        node(x)


@pytest.mark.parametrize("name", [n for n in ALL if not n.startswith("pool")])
def test_non_finite_incoming_gradient_stays_in_its_sample(name):
    node, x = ALL[name]()
    y, (g_ref, *_) = _run(node, x)
    v = torch.ones_like(y)
    v[0].view(-1)[0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DDNWarning)
        _, (g, *_) = _run(node, x, v)
    torch.testing.assert_close(g[1:], g_ref[1:], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in BUNDLED if n.startswith("pool")])
def test_non_finite_incoming_gradient_stays_in_its_pooled_row(name):
    node, x = BUNDLED[name]()
    y, (g_ref, *_) = _run(node, x)
    v = torch.ones_like(y)
    v[0, 0] = math.nan
    _, (g, *_) = _run(node, x, v)
    torch.testing.assert_close(g[1:], g_ref[1:], rtol=0, atol=0)
    assert torch.isfinite(g[0, 1:]).all()


def test_pooling_non_convergence_warns_with_numbers_and_strict_raises():
    x = 100 * torch.randn(3, 2, 50, dtype=F64)
    counted = r"did not converge in 1 iterations for \d+ of 6 rows \(first rows \["
    with pytest.warns(NonConvergenceWarning, match=counted):
        robust_global_pool(x, "pseudo_huber", c=0.01, options=Options(max_iter=1))
    with pytest.raises(NonConvergenceError, match="did not converge"):
        robust_global_pool(x, "pseudo_huber", c=0.01, options=Options(max_iter=1, strict=True))


@pytest.mark.parametrize("name", list(BUNDLED))
def test_inputs_are_not_modified(name):
    node, x = BUNDLED[name]()
    x.requires_grad_()
    before = x.detach().clone()
    node(x).square().sum().backward()
    assert torch.equal(x.detach(), before)


def test_functional_forms_do_not_modify_their_tensors():
    x, c = torch.randn(3, 4, 6, dtype=F64), torch.full((4,), 0.5, dtype=F64, requires_grad=True)
    r = torch.tensor(0.7, dtype=F64, requires_grad=True)
    saved = [t.detach().clone() for t in (x, c, r)]
    robust_global_pool(x, "general", c=c, alpha=torch.tensor(0.5, dtype=F64)).sum().backward()
    project(x, radius=r, p=1, kind="sphere").sum().backward()
    assert all(torch.equal(t.detach(), s) for t, s in zip((x, c, r), saved))


# -- 3. concurrency, determinism, torch.func ------------------------------------------------------

@pytest.mark.parametrize("name", list(BUNDLED))
def test_threads_match_sequential_calls(name):
    node, x = BUNDLED[name]()
    inputs = [x * (1 + 0.1 * k) for k in range(4)]
    expected = [_run(node, xi) for xi in inputs]
    results, errors = [None] * 4, []

    def work(k):
        try:
            for _ in range(3):
                results[k] = _run(node, inputs[k])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (y, g), (y_ref, g_ref) in zip(results, expected):
        assert torch.equal(y, y_ref) and all(map(torch.equal, g, g_ref))


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("name", ["L1Sphere", "pool1d-welsch", "pool1d-general", "newton", "sqp"])
def test_bitwise_reproducible_for_a_fixed_seed(name, n_threads, threads):
    def once():
        torch.manual_seed(7)
        node, x = ALL[name]()
        return _run(node, x)

    with threads(n_threads):
        (y1, g1), (y2, g2) = once(), once()
    assert torch.equal(y1, y2) and all(map(torch.equal, g1, g2))


@pytest.mark.parametrize("name", ["L1Ball", "LInfSphere", "pool1d-huber", "pool1d-general"])
def test_vmap_and_functional_call_on_bundled_nodes(name):
    node, x = BUNDLED[name]()
    stacked = torch.stack([x, 2 * x])
    torch.testing.assert_close(torch.func.vmap(node)(stacked), torch.stack([node(x), node(2 * x)]))
    params = {k: p.detach() + 0.1 for k, p in node.named_parameters()}
    moved = copy.deepcopy(node)
    with torch.no_grad():
        for k, p in moved.named_parameters():
            p.copy_(params[k])
    leaves = {k: p.clone().requires_grad_() for k, p in params.items()}
    y = torch.func.functional_call(node, leaves, (x,))
    grads = torch.autograd.grad(y.square().sum(), list(leaves.values()))
    y_ref, g_ref = moved(x), None
    g_ref = torch.autograd.grad(y_ref.square().sum(), [p for p in moved.parameters()])
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(grads, g_ref):
        torch.testing.assert_close(g, r)


# -- 4. state ----------------------------------------------------------------------------------

LEARNABLE = {
    "pool1d-c-channels": lambda c: RobustGlobalPool1d("pseudo_huber", c=c, learn_c=True,
                                                      channels=3),
    "pool1d-general-c-alpha": lambda c: RobustGlobalPool1d(
        "general", c=c, learn_c=True, alpha=c.clamp(max=2.9) / 1.1, learn_alpha=True,
        alpha_range=(0.0, 3.0), channels=3),
    "pool2d-welsch-c": lambda c: RobustGlobalPool2d("welsch", c=c[0], learn_c=True),
    **{f"{cls.__name__}-r": (lambda cls: lambda c: cls(float(c[1]), learn_radius=True))(cls)
       for cls in PROJECTIONS},
}


def _inputs_for(module):
    if isinstance(module, RobustGlobalPool2d):
        return torch.randn(2, 3, 4, 4)
    if isinstance(module, RobustGlobalPool1d):
        return torch.randn(2, 3, 8)
    return torch.randn(4, 5)


def _visible(module):
    """The parametrised values as the user sees them (c, α, radius) and the raw parameters."""
    names = [n for n in ("c", "alpha", "radius") if hasattr(module, n)]
    return {n: getattr(module, n).detach().clone() for n in names}


@pytest.mark.parametrize("name", list(LEARNABLE))
def test_state_dict_round_trip_preserves_parametrised_values_exactly(name):
    make = LEARNABLE[name]
    trained = make(torch.tensor([0.37, 1.91, 2.2]))
    with torch.no_grad():  # move the raw parameters off their initial values, as training does
        for p in trained.parameters():
            p.add_(0.123)
    fresh = make(torch.tensor([1.0, 1.0, 1.0]))
    fresh.load_state_dict(trained.state_dict())
    for k, v in _visible(trained).items():
        assert torch.equal(_visible(fresh)[k], v), k
    for (k, p), (k2, q) in zip(trained.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(p, q)
    x = _inputs_for(trained)
    assert torch.equal(trained(x), fresh(x))


def _deepcopy(module):
    return copy.deepcopy(module)


def _pickled(module):
    return pickle.loads(pickle.dumps(module))


def _torch_saved(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("clone", [_deepcopy, _pickled])
@pytest.mark.parametrize("name", list(LEARNABLE))
def test_deepcopy_and_pickle_give_independent_equal_modules(name, clone):
    original = LEARNABLE[name](torch.tensor([0.5, 1.5, 2.5]))
    x = _inputs_for(original)
    y = original(x)
    copied = clone(original)
    assert torch.equal(copied(x), y)
    assert all(torch.equal(a, b) for a, b in zip(copied.parameters(), original.parameters()))
    with torch.no_grad():
        for p in copied.parameters():
            p.add_(1.0)
    assert torch.equal(original(x), y)


def _trained_model():
    model = torch.nn.Sequential(
        torch.nn.Conv1d(3, 4, 1),
        RobustGlobalPool1d("general", c=0.8, learn_c=True, alpha=1.2, learn_alpha=True,
                           channels=4),
        torch.nn.Linear(4, 5),
        L1Ball(1.3, learn_radius=True),
    )
    x = torch.randn(6, 3, 10)
    model(x).square().sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    return model, x


def test_torch_save_and_load_of_a_whole_model():
    model, x = _trained_model()
    assert torch.equal(_torch_saved(model)(x), model(x))


def test_torch_save_and_load_of_a_model_state_dict():
    model, x = _trained_model()
    states = io.BytesIO()
    torch.save(model.state_dict(), states)
    states.seek(0)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(torch.load(states, weights_only=True))
    assert torch.equal(fresh[1].c, model[1].c) and torch.equal(fresh[1].alpha, model[1].alpha)
    assert torch.equal(fresh[3].radius, model[3].radius)
    assert torch.equal(fresh(x), model(x))


# -- 5. double backward and torch.func.grad ------------------------------------------------

@pytest.mark.parametrize("name", list(ALL))
def test_double_backward_and_func_grad_raise_clearly(name):
    node, x = ALL[name]()
    x.requires_grad_()
    y = node(x)
    if name in ("newton", "newton-cg"):  # unconstrained generic: double backward works
        torch.autograd.grad(y.square().sum(), x, create_graph=True)  # (tests/test_compose.py)
        return
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    # torch.func.grad through a node works: tests/test_compose.py
