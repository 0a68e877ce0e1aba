"""The user-node contract (``ddnlib.contract``, issue 20): what a node's own methods return is
checked, and every message names the method, the samples where relevant and what was expected.
Also the inputs a node accepts: a leading dimension of 1 is shared by the batch (gradient summed),
``None`` and non-tensors are refused with a message saying how to express them."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ddnlib import DDNWarning, DeclarativeNode
from toy_nodes import Quartic

F64 = torch.float64


def _x(b=4, n=5, seed=0):
    return torch.randn(b, n, dtype=F64, generator=torch.Generator().manual_seed(seed))


class Least(DeclarativeNode):
    """y = argmin ½‖y − w x‖², learnable w (closed form y = w x)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.5, dtype=F64))

    def objective(self, x, y):
        return 0.5 * ((y - self.w * x) ** 2).sum(-1)


class Mapped(DeclarativeNode):
    """y = argmin ½‖A y − x‖² + ½‖y‖² with y of shape (b, 3) for x (b, 5)."""

    def __init__(self, guess=None):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(5, 3, dtype=F64))
        self.guess = guess

    def objective(self, x, y):
        r = y @ self.A.T - x
        return 0.5 * (r * r).sum(-1) + 0.5 * (y * y).sum(-1)

    def initial_guess(self, x):
        return self.guess(x) if self.guess else x.new_zeros(x.shape[0], 3)


def _node(objective, guess=None, eq=None):
    """A node of class ``Probe`` with the given methods (``guess=None``: the default)."""
    methods = {"objective": lambda self, x, y: objective(x, y)}
    if guess is not None:
        methods["initial_guess"] = lambda self, x: guess(x)
    if eq is not None:
        methods["equality_constraints"] = lambda self, x, y: eq(x, y)
    return type("Probe", (DeclarativeNode,), methods)()


def _sq(x, y):
    return ((y - x) ** 2).sum(-1)


# every case: (node, inputs, error type, fragments the message must contain)
CASES = {
    "guess float": (_node(_sq, guess=lambda x: 0.0), _x(), TypeError,
                    ["Probe.initial_guess returned float", "torch.Tensor", "b=4",
                     "initial_guess declares the output shape"]),
    "guess dtype": (_node(_sq, guess=lambda x: torch.zeros(x.shape)), _x(), TypeError,
                    ["Probe.initial_guess returned dtype torch.float32",
                     "expected the inputs' dtype torch.float64"]),
    "guess batch": (_node(_sq, guess=lambda x: x[:2].clone()), _x(), ValueError,
                    ["Probe.initial_guess returned shape (2, 5)", "b=4",
                     "initial_guess declares the output shape"]),
    "guess 0-d": (_node(_sq, guess=lambda x: x.new_zeros(())), _x(), ValueError,
                  ["Probe.initial_guess returned shape ()", "leading batch dimension b=4"]),
    "objective not summed": (_node(lambda x, y: (y - x) ** 2), _x(), ValueError,
                             ["Probe.objective returned shape (4, 5)", "expected (b,) = (4,)",
                              "default initial_guess copies input 0",
                              "initial_guess declares the output shape"]),
    "objective not summed, own guess": (
        _node(lambda x, y: (y - x) ** 2, guess=lambda x: x.clone()), _x(), ValueError,
        ["Probe.objective returned shape (4, 5)", "as Probe.initial_guess returned"]),
    "objective float": (_node(lambda x, y: 1.0), _x(), TypeError,
                        ["Probe.objective returned float", "shape (b,) = (4,)"]),
    "objective int": (_node(lambda x, y: (y > 0).sum(-1)), _x(), TypeError,
                      ["Probe.objective returned dtype torch.int64", "floating"]),
    "objective raises at the default guess": (Mapped.__new__(Mapped), _x(), ValueError,
                                              ["Probe.objective raised RuntimeError"]),
    "objective without y": (_node(lambda x, y: (x * x).sum(-1)), _x(), ValueError,
                            ["Probe.objective does not depend on y", "y.detach()"]),
    "objective of y.detach()": (_node(lambda x, y: ((y.detach() - x) ** 2).sum(-1)), _x(),
                                ValueError, ["Probe.objective does not depend on y"]),
    "objective nan at the guess": (_node(lambda x, y: (y * y.log() - x * y).sum(-1)), -_x().abs(),
                                   ValueError, ["Probe.objective is nan at initial_guess",
                                                "samples [0, 1, 2, 3] (4 of 4)", "domain"]),
    "gradient inf at the guess": (_node(lambda x, y: (y.sqrt() + (y - 1) ** 2).sum(-1),
                                        guess=lambda x: torch.zeros_like(x)), _x(), ValueError,
                                  ["the y-gradient of Probe.objective is inf at initial_guess",
                                   "samples [0, 1, 2, 3]"]),
    "parameter inf": (Quartic(s=math.inf), torch.ones(3, 2, dtype=F64), ValueError,
                      ["Quartic.objective is inf at initial_guess", "samples [0, 1, 2] (3 of 3)",
                       "parameters to be finite"]),
    "constraint nan at the guess": (
        _node(_sq, eq=lambda x, y: y.log().sum(-1, keepdim=True)), -_x().abs(), ValueError,
        ["Probe.equality_constraints is nan at initial_guess", "samples [0, 1, 2, 3]"]),
}
# the class name shown is the user's: give the raising Mapped node the name the fragments expect
CASES["objective raises at the default guess"] = (
    type("Probe", (Mapped,), {"initial_guess": DeclarativeNode.initial_guess})(), _x(),
    ValueError, ["Probe.objective raised RuntimeError at the default initial_guess",
                 "y has shape (4, 5) because the default initial_guess copies input 0",
                 "override initial_guess(*xs)"])


@pytest.mark.parametrize("case", list(CASES))
def test_what_user_code_returns_is_checked_with_a_message_naming_it(case):
    node, x, error, fragments = CASES[case]
    with pytest.raises(error) as info:
        node(x)
    for fragment in fragments:
        assert fragment in str(info.value), f"{case}: {fragment!r} not in {info.value}"


def test_an_error_inside_the_objective_keeps_its_cause_and_own_guesses_pass_it_through():
    raising = CASES["objective raises at the default guess"][0]
    with pytest.raises(ValueError) as info:
        raising(_x())
    assert isinstance(info.value.__cause__, RuntimeError)
    wrong = Mapped(guess=lambda x: x.clone())  # an overridden guess: the user's error, unchanged
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        wrong(_x())


def test_a_non_finite_input_sample_is_left_to_the_solver_not_raised():
    x = _x()
    x[1, 2] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DDNWarning)
        y = Least()(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    torch.testing.assert_close(y[[0, 2, 3]], 1.5 * x[[0, 2, 3]])


def test_the_check_at_the_start_does_not_change_correct_nodes():
    node = Mapped()
    x = _x().requires_grad_()
    y = node(x)
    A = node.A.detach()
    expected = torch.linalg.solve(A.T @ A + torch.eye(3, dtype=F64), A.T @ x.detach().T).T
    torch.testing.assert_close(y, expected)
    torch.autograd.gradcheck(lambda t, A: torch.func.functional_call(node, {"A": A}, (t,)),
                             (x[:2], node.A))


# -- vjp overrides ------------------------------------------------------------------------------

def _vjp_node(vjp):
    return type("Closed", (Least,), {"vjp": lambda self, x, *, y, v, ctx=None: vjp(self, x, v)})()


def _right(self, x, v):
    return (self.w * v,), {"w": (v * x).sum()}


VJP_CASES = {
    "bare tensor": (lambda self, x, v: (self.w * v, {}), TypeError,
                    ["Closed.vjp returned a bare Tensor of shape (4, 5) as input_grads",
                     "one entry per input (1 input)", "(grad_x,)"]),
    "unknown key": (lambda self, x, v: ((self.w * v,), {"weight": (v * x).sum()}), ValueError,
                    ["Closed.vjp returned gradients for ['weight']", "not parameters of Closed",
                     "['w']"]),
    "too many input gradients": (lambda self, x, v: ((v, v), {}), TypeError,
                                 ["Closed.vjp returned 2 input gradients", "a tuple of 1"]),
    "input gradient shape": (lambda self, x, v: ((v[:, :1],), {}), ValueError,
                             ["Closed.vjp returned shape (4, 1) as the gradient of input 0",
                              "the input's shape (4, 5)"]),
    "parameter gradient shape": (lambda self, x, v: ((self.w * v,), {"w": v * x}), ValueError,
                                 ["Closed.vjp returned shape (4, 5) as the gradient of parameter "
                                  "'w'", "the parameter's shape ()", "summed over the batch"]),
    "a single tensor": (lambda self, x, v: self.w * v, TypeError,
                        ["Closed.vjp returned Tensor", "(input_grads, param_grads)"]),
    "three items": (lambda self, x, v: ((v,), {}, None), TypeError,
                    ["Closed.vjp returned a tuple of 3 items", "(input_grads, param_grads)"]),
    "param_grads a list": (lambda self, x, v: ((v,), [v]), TypeError,
                           ["Closed.vjp returned list as param_grads", "parameter names"]),
}


@pytest.mark.parametrize("case", list(VJP_CASES))
def test_vjp_override_results_are_checked(case):
    vjp, error, fragments = VJP_CASES[case]
    node = _vjp_node(vjp)
    x = _x().requires_grad_()
    y = node(x)
    with pytest.raises(error) as info:
        y.sum().backward()
    for fragment in fragments:
        assert fragment in str(info.value), f"{case}: {fragment!r} not in {info.value}"


def test_a_correct_vjp_override_passes_and_gives_the_closed_form():
    node = _vjp_node(_right)
    x = _x().requires_grad_()
    v = torch.randn(4, 5, dtype=F64)
    gx, gw = torch.autograd.grad(node(x), [x, node.w], v)
    torch.testing.assert_close(gx, 1.5 * v)
    torch.testing.assert_close(gw, (v * x.detach()).sum())


def test_solve_returning_three_items_names_the_method():
    node = type("Triple", (Least,), {"solve": lambda self, x: (x, {}, None)})()
    with pytest.raises(TypeError, match=r"Triple\.solve returned a tuple of 3 items"):
        node(_x())


# -- inputs: shared across the batch, None, non-tensors ------------------------------------------

class Weighted(DeclarativeNode):
    """y = argmin Σ_j w_j (y_j − x_j)² + ½‖y‖²: y = 2 w x / (2 w + 1), per entry."""

    def objective(self, x, w, y):
        return (w * (y - x) ** 2).sum(-1) + 0.5 * (y * y).sum(-1)


def test_an_input_with_a_leading_dimension_of_one_is_shared_and_its_gradient_summed():
    x = _x().requires_grad_()
    w = (1 + torch.rand(1, 5, dtype=F64)).requires_grad_()
    y = Weighted()(x, w)
    torch.testing.assert_close(y, (2 * w * x / (2 * w + 1)).detach())
    v = torch.randn(4, 5, dtype=F64)
    gx, gw = torch.autograd.grad(y, [x, w], v)
    closed = 2 * w * x / (2 * w + 1)
    ex, ew = torch.autograd.grad(closed, [x, w], v)
    assert gw.shape == (1, 5)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)  # summed over the 4 samples
    torch.autograd.gradcheck(lambda x, w: Weighted()(x, w), (x[:2], w))
    # input 0 may be the shared one too
    shared_x = Weighted()(x[:1], (1 + torch.rand(3, 5, dtype=F64)))
    assert shared_x.shape == (3, 5)


INPUT_CASES = {
    "None": ((_x(), None), TypeError, ["Weighted(): input 1 is None",
                                       "attribute of the node", "register_buffer"]),
    "float": ((_x(), 2.0), TypeError, ["Weighted(): input 1 is float", "(1, ...)",
                                       "attribute of the node"]),
    "0-d": ((_x(), torch.tensor(2.0, dtype=F64)), ValueError,
            ["Weighted(): input 1 is 0-d", "(1, ...) for a value shared by every sample"]),
    "batch sizes": ((_x(), torch.ones(3, 5, dtype=F64)), ValueError,
                    ["inputs have batch sizes input 0: 4, input 1: 3", "or 1 for an input shared"]),
}


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_inputs_that_cannot_be_batched_say_how_to_express_them(case):
    xs, error, fragments = INPUT_CASES[case]
    with pytest.raises(error) as info:
        Weighted()(*xs)
    for fragment in fragments:
        assert fragment in str(info.value), f"{case}: {fragment!r} not in {info.value}"


# -- Options: numbers that are not numbers ---------------------------------------------------------

OPTION_CASES = [
    (dict(damping=math.inf), "damping=inf: expected a finite non-negative number"),
    (dict(damping=math.nan), "damping=nan: expected a finite non-negative number"),
    (dict(damping=True), "damping=True: expected a finite non-negative number"),
    (dict(damping="0.1"), "damping='0.1': expected a finite non-negative number"),
    (dict(cg_max_iter=True), "cg_max_iter=True: expected a positive integer or None"),
    (dict(cg_max_iter=2.5), "cg_max_iter=2.5: expected a positive integer or None"),
    (dict(max_iter=False), "max_iter=False: expected a positive integer"),
    (dict(dense_max=1e9), "dense_max=1000000000.0: expected a positive integer"),
    (dict(solver_tol=math.inf), "solver_tol=inf: expected a finite positive number or None"),
    (dict(cg_tol=math.inf), "cg_tol=inf: expected a finite positive number or None"),
    (dict(optimality_tol=True), "optimality_tol=True: expected a finite positive number or None"),
    (dict(active_tol=-math.inf), "active_tol=-inf: expected a finite positive number or None"),
    (dict(strict=1), "strict=1: expected True or False"),
    (dict(check_optimality="no"), "check_optimality='no': expected True or False"),
]


@pytest.mark.parametrize("kwargs, message", OPTION_CASES, ids=[m.split(":")[0] for _, m in
                                                               OPTION_CASES])
def test_options_reject_bools_and_non_finite_numbers(kwargs, message):
    from ddnlib import Options

    with pytest.raises(ValueError) as info:
        Options(**kwargs)
    assert message in str(info.value)


def test_options_accept_numpy_numbers_and_ints_for_floats():
    import numpy as np

    from ddnlib import Options

    options = Options(damping=1, cg_max_iter=np.int64(7), solver_tol=np.float64(1e-8))
    assert options.tol("solver_tol", F64) == 1e-8 and options.cg_max_iter == 7


def test_a_constrained_node_may_have_an_objective_without_y():
    """y fixed by its constraints alone (a root-finding layer): y = x / 2 from 2 y − x = 0."""
    node = _node(lambda x, y: x.new_zeros(x.shape[0]), eq=lambda x, y: 2 * y - x)
    x = _x(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DDNWarning)
        y = node(x)
    torch.testing.assert_close(y, x / 2)
