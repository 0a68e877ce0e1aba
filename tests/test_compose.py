"""A declarative node composes with the rest of PyTorch (issue 17; docs/composition.md).

Every item runs on generic nodes (default solver, custom ``solve``, custom ``vjp``) and on bundled
nodes where it applies, against plain autograd through a closed form or finite differences in
float64: functional_call with swapped values that do not require grad, in-place modification
detected, hooks once, autocast and half-precision inputs, torch.compile, batched backward,
vmap over inputs and over parameters, torch.func transforms.
"""

from __future__ import annotations

import pytest
import torch

from ddnlib import DeclarativeNode
from ddnlib.nodes import L1Ball, L2Ball, L2Sphere, LInfBall, RobustGlobalPool1d
from toy_nodes import Ridge

F64 = torch.float64
LOG_RADIUS = "parametrizations.radius.original"
LOG_C = "parametrizations.c.original"
LAM = "parametrizations.lam.original"


class RidgeSolve(Ridge):
    """Ridge with a problem-specific forward solver (the closed form)."""

    def solve(self, x):
        return self.closed_form(x)


class RidgeVjp(RidgeSolve):
    """Ridge with a closed-form ``vjp`` (plain autograd through the closed form)."""

    differentiable_vjp = True  # written with differentiable operations: double backward works

    def vjp(self, x, *, y, v, ctx=None):
        params = {k: p for k, p in self.named_parameters() if p.requires_grad}
        wanted = ([x] if x.requires_grad else []) + list(params.values())
        with torch.enable_grad():
            grads = list(torch.autograd.grad(self.closed_form(x), wanted, v, allow_unused=True,
                                             create_graph=True))  # differentiable: jvp, 2nd order
        gx = grads.pop(0) if x.requires_grad else None
        return (gx,), dict(zip(params, grads))


GENERIC = {"default": Ridge, "solve": RidgeSolve, "vjp": RidgeVjp}
generic = pytest.mark.parametrize("cls", list(GENERIC.values()), ids=list(GENERIC))


class _ClosedForm(torch.nn.Module):
    """``node.closed_form`` as a module, so that ``functional_call`` swaps the same names."""

    def __init__(self, node):
        super().__init__()
        self.node = node

    def forward(self, x):
        return self.node.closed_form(x)


def closed_form(node, state, x):
    """The closed form of a generic node at the swapped ``state`` (names as in the node)."""
    return torch.func.functional_call(_ClosedForm(node), {f"node.{k}": t for k, t in state.items()},
                                      (x,))


def _x(b=4, n=5, dtype=F64):
    return torch.randn(b, n, dtype=dtype)


def _params(node):
    return {k: p for k, p in node.named_parameters() if p.requires_grad}


def _sphere(x, r):
    return r * x / x.norm(dim=-1, keepdim=True)


# Bundled nodes with a closed form to compare against: (node, x, reference(x, r)).
def _l2_sphere():
    return L2Sphere(0.8, learn_radius=True).double(), _x(), _sphere


def _l2_ball():  # every sample outside the ball: the projection onto the sphere
    return L2Ball(0.8, learn_radius=True).double(), 3 + _x(), _sphere


def _linf_ball():
    return (LInfBall(0.8, learn_radius=True).double(), 2 * _x(),
            lambda x, r: torch.maximum(torch.minimum(x, r), -r))


BUNDLED = {"L2Sphere": _l2_sphere, "L2Ball": _l2_ball, "LInfBall": _linf_ball}
bundled = pytest.mark.parametrize("make", list(BUNDLED.values()), ids=list(BUNDLED))


def _pool(learn_c=True):
    return RobustGlobalPool1d("pseudo_huber", c=0.7, learn_c=learn_c, channels=3).double()


def _assert_all_close(got, want, **tol):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


# -- functional_call with swapped values that do not require grad -------------------------------

@generic
def test_functional_call_swap_without_grad_uses_the_swapped_values(cls):
    node = cls()
    x = _x().requires_grad_()
    swapped = {"A": torch.randn(5, 3, dtype=F64)}  # an EMA/teacher weight: no grad
    y = torch.func.functional_call(node, swapped, (x,))
    ref = closed_form(node, swapped, x)
    torch.testing.assert_close(y, ref)
    v = torch.randn_like(y)
    lam = node.parametrizations.lam.original
    _assert_all_close(torch.autograd.grad((y * v).sum(), [x, lam]),
                      torch.autograd.grad((ref * v).sum(), [x, lam]))


@pytest.mark.parametrize("learn", [False, True], ids=["buffer", "parameter"])
def test_functional_call_swap_of_a_projection_radius(learn):
    node = L2Sphere(0.8, learn_radius=learn).double()
    x = _x().requires_grad_()
    r = torch.tensor(2.5, dtype=F64)
    swapped = {LOG_RADIUS: r.log()} if learn else {"radius": r}
    y = torch.func.functional_call(node, swapped, (x,))
    ref = _sphere(x, r)
    v = torch.randn_like(y)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(torch.autograd.grad((y * v).sum(), x)[0],
                               torch.autograd.grad((ref * v).sum(), x)[0])


def test_functional_call_swap_of_a_pooling_buffer_matches_finite_differences():
    pool = _pool(learn_c=False)
    c = torch.tensor([0.3, 1.0, 2.0], dtype=F64)  # the module's own c is 0.7
    x = torch.randn(2, 3, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.func.functional_call(pool, {"c": c}, (t,)),
                                    (x,))


# -- in-place modification between forward and backward ------------------------------------------

def _modify_generic():
    node = RidgeVjp()
    return node, _x().requires_grad_(), node.A


def _modify_radius():
    node = L2Sphere(0.8, learn_radius=True).double()
    return node, _x().requires_grad_(), node.parametrizations.radius.original


def _modify_buffer():
    node = L2Sphere(0.8).double()
    return node, _x().requires_grad_(), node.radius


@pytest.mark.parametrize("make", [_modify_generic, _modify_radius, _modify_buffer],
                         ids=["generic", "radius", "radius-buffer"])
def test_in_place_modification_before_backward_raises(make):
    node, x, tensor = make()
    y = node(x)
    with torch.no_grad():
        tensor.mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# -- hooks on parameters run once per backward -----------------------------------------------------

def _hooked(node, x, leaf):
    calls = []
    leaf.register_hook(lambda g: calls.append(1) or 2 * g)
    node(x).square().sum().backward()
    return calls, leaf.grad


@pytest.mark.parametrize("make", [
    lambda: (GENERIC["default"](), _x(), "A"),
    lambda: (GENERIC["solve"](), _x(), LAM),
    lambda: (GENERIC["vjp"](), _x(), "A"),
    lambda: (L2Sphere(0.8, learn_radius=True).double(), _x(), LOG_RADIUS),
    lambda: (_pool(), torch.randn(2, 3, 6, dtype=F64), LOG_C),
], ids=["default", "solve", "vjp", "L2Sphere", "pool"])
def test_parameter_hook_runs_once_per_backward(make):
    node, x, name = make()
    leaf = dict(node.named_parameters())[name]
    want = torch.autograd.grad(node(x).square().sum(), leaf)[0]
    calls, got = _hooked(node, x, leaf)
    assert len(calls) == 1
    torch.testing.assert_close(got, 2 * want)  # the hook's scaling applied once


# -- autocast and half precision -------------------------------------------------------------------

AUTOCAST = [("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    AUTOCAST.append(("cuda", torch.float16))


@pytest.mark.parametrize("device, low", AUTOCAST)
@pytest.mark.parametrize("make", [
    *[lambda cls=cls: (cls(), _x()) for cls in GENERIC.values()],
    lambda: (L2Sphere(0.8, learn_radius=True), _x()),
    lambda: (_pool(), torch.randn(2, 3, 6)),
], ids=[*GENERIC, "L2Sphere", "pool"])
def test_autocast_runs_the_node_in_float32(make, device, low):
    node, x = make()
    node, x = node.float().to(device), x.float().to(device).requires_grad_()
    params = list(_params(node).values())
    y_ref = node(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *params])
    with torch.autocast(device, dtype=low):
        y = node(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref)
    with torch.autocast(device, dtype=low):  # a backward inside the region stays float32 too
        g = torch.autograd.grad(y.square().sum(), [x, *params])
    _assert_all_close(g, g_ref)


@pytest.mark.parametrize("device, low", AUTOCAST)
@generic
def test_autocast_input_in_the_low_dtype_is_computed_in_float32(cls, device, low):
    """The output of an autocast layer (e.g. a bfloat16 linear) fed to a node: float32 out."""
    node = cls().float().to(device)
    x = _x().to(device, low)
    with torch.autocast(device, dtype=low):
        y = node(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, node.closed_form(x.float()))


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@generic
def test_half_precision_inputs_are_solved_in_float32_and_returned_in_their_dtype(cls, low):
    node = cls().float()
    x = _x().to(low).requires_grad_()
    y = node(x)
    assert y.dtype == low
    ref = node.closed_form(x.float())
    torch.testing.assert_close(y, ref.to(low))
    v = torch.randn_like(ref)
    gx, gA = torch.autograd.grad((y.float() * v).sum(), [x, node.A])
    want = torch.autograd.grad((ref * v).sum(), [x, node.A])
    assert gx.dtype == low and gA.dtype == torch.float32
    torch.testing.assert_close(gx, want[0].to(low))
    torch.testing.assert_close(gA, want[1], rtol=1e-2, atol=1e-2)  # y rounded to `low`


# -- torch.compile -------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_model_matches_eager_values_and_gradients():
    """A graph break at each node: the layers around it are compiled, the nodes run eagerly."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), Ridge(),
                                torch.nn.Linear(3, 6), L2Ball(0.5, learn_radius=True)).double()
    x = torch.randn(6, 4, dtype=F64, requires_grad=True)
    compiled = torch.compile(model)
    wrt = [x, *model.parameters()]
    for scale in (1.0, 2.0):  # the second call reuses the compiled graphs
        got_y = compiled(scale * x)
        got = torch.autograd.grad(got_y.square().sum(), wrt)
        want_y = model(scale * x)
        want = torch.autograd.grad(want_y.square().sum(), wrt)
        torch.testing.assert_close(got_y, want_y)
        _assert_all_close(got, want)


# -- batched backward: jacobian(vectorize=True), is_grads_batched, check_batched_grad ------------

def _as_function(node, n_inputs=1):
    """``(*xs, *params) -> y`` through ``functional_call`` and the float64 leaves to check."""
    names = list(_params(node))

    def call(*args):
        return torch.func.functional_call(node, dict(zip(names, args[n_inputs:])),
                                          args[:n_inputs])

    return call, [p.detach().clone().requires_grad_() for p in _params(node).values()]


CHECKED = {
    **{k: (lambda cls=cls: (cls(), _x(3))) for k, cls in GENERIC.items()},
    "L2Sphere": lambda: (L2Sphere(0.8, learn_radius=True).double(), _x(3, 4)),
    "L1Ball": lambda: (L1Ball(0.8, learn_radius=True).double(), 2 * _x(3, 4)),
    "pool": lambda: (_pool(), torch.randn(2, 3, 5, dtype=F64)),
}
checked = pytest.mark.parametrize("make", list(CHECKED.values()), ids=list(CHECKED))


@checked
def test_gradcheck_batched_backward_and_forward_mode(make):
    """Reverse mode, batched reverse (vmap over the backward), forward mode and batched forward."""
    node, x = make()
    call, params = _as_function(node)
    assert torch.autograd.gradcheck(call, (x.requires_grad_(), *params), check_batched_grad=True,
                                    check_forward_ad=True, check_batched_forward_grad=True)


@checked
def test_vectorized_jacobian_and_batched_grads_match_the_loop(make):
    node, x = make()
    x.requires_grad_()
    J = torch.autograd.functional.jacobian(node, x, vectorize=True)
    torch.testing.assert_close(J, torch.autograd.functional.jacobian(node, x), atol=0, rtol=0)
    y = node(x)
    vs = torch.randn(3, *y.shape, dtype=F64)
    wrt = [x, *_params(node).values()]
    batched = torch.autograd.grad(y, wrt, vs, is_grads_batched=True, retain_graph=True)
    loop = [torch.autograd.grad(y, wrt, v, retain_graph=True) for v in vs]
    _assert_all_close(batched, [torch.stack(g) for g in zip(*loop)])


# -- vmap over inputs and over parameters ----------------------------------------------------------

@checked
def test_vmap_over_inputs_matches_the_loop(make):
    node, x = make()
    xs = torch.stack([x, 2 * x])
    torch.testing.assert_close(torch.func.vmap(node)(xs), torch.stack([node(x), node(2 * x)]))


@pytest.mark.parametrize("make", [CHECKED["vjp"], CHECKED["default"], CHECKED["L2Sphere"]],
                         ids=["vjp", "default", "L2Sphere"])
def test_vmap_over_parameters_ensemble_matches_each_member(make):
    node, x = make()
    params = _params(node)
    stacked = {k: torch.stack([p.detach(), p.detach() + 0.1]).requires_grad_()
               for k, p in params.items()}
    x = x.requires_grad_()
    y = torch.func.vmap(lambda state: torch.func.functional_call(node, state, (x,)))(stacked)
    leaves = [x, *stacked.values()]
    got = torch.autograd.grad(y.square().sum(), leaves)
    members = [{k: s[i] for k, s in stacked.items()} for i in range(2)]
    want_y = torch.stack([torch.func.functional_call(node, m, (x,)) for m in members])
    want = torch.autograd.grad(want_y.square().sum(), leaves)
    torch.testing.assert_close(y, want_y)
    _assert_all_close(got, want)


# -- torch.func gradient transforms ----------------------------------------------------------------

@generic
def test_func_grad_vjp_jacrev_and_per_sample_grads_match_the_closed_form(cls):
    node = cls()
    x = _x(3)
    state = {k: p.detach() for k, p in node.named_parameters()}
    f = lambda s, x: torch.func.functional_call(node, s, (x,))  # noqa: E731
    g = lambda s, x: closed_form(node, s, x)  # noqa: E731
    both = dict(argnums=(0, 1))
    _assert_all_close(
        torch.utils._pytree.tree_leaves(torch.func.grad(lambda s, x: f(s, x).square().sum(),
                                                        **both)(state, x)),
        torch.utils._pytree.tree_leaves(torch.func.grad(lambda s, x: g(s, x).square().sum(),
                                                        **both)(state, x)))
    _assert_all_close(torch.utils._pytree.tree_leaves(torch.func.jacrev(f, **both)(state, x)),
                      torch.utils._pytree.tree_leaves(torch.func.jacrev(g, **both)(state, x)))
    y, pullback = torch.func.vjp(lambda x: f(state, x), x)
    v = torch.randn_like(y)
    y_ref, pullback_ref = torch.func.vjp(lambda x: g(state, x), x)
    _assert_all_close(pullback(v), pullback_ref(v))

    def per_sample(h):
        loss = lambda s, xi: h(s, xi[None]).square().sum()  # noqa: E731
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(state, x)

    _assert_all_close(torch.utils._pytree.tree_leaves(per_sample(f)),
                      torch.utils._pytree.tree_leaves(per_sample(g)))


@bundled
def test_func_jacrev_of_a_projection_matches_the_closed_form(make):
    node, x, reference = make()
    rho = node.parametrizations.radius.original.detach()
    f = lambda x, rho: torch.func.functional_call(node, {LOG_RADIUS: rho}, (x,))  # noqa: E731
    g = lambda x, rho: reference(x, rho.exp())  # noqa: E731
    _assert_all_close(torch.func.jacrev(f, argnums=(0, 1))(x, rho),
                      torch.func.jacrev(g, argnums=(0, 1))(x, rho))


def test_func_grad_of_pooling_matches_autograd():
    pool = _pool()
    x = torch.randn(2, 3, 6, dtype=F64)
    got = torch.func.grad(lambda t: pool(t).square().sum())(x)
    want = torch.autograd.grad(pool(x.requires_grad_()).square().sum(), x)[0]
    torch.testing.assert_close(got, want)


# -- forward mode: forward_ad, torch.func.jvp, jacfwd ------------------------------------------------

@generic
def test_forward_ad_jvp_and_jacfwd_match_the_closed_form(cls):
    import torch.autograd.forward_ad as fwAD

    node = cls()
    x, dx = _x(3), _x(3)
    state = {k: p.detach() for k, p in node.named_parameters()}
    tangent = {k: torch.randn_like(p) for k, p in state.items()}
    f = lambda s, x: torch.func.functional_call(node, s, (x,))  # noqa: E731
    g = lambda s, x: closed_form(node, s, x)  # noqa: E731
    want = torch.func.jvp(g, (state, x), (tangent, dx))
    _assert_all_close(torch.func.jvp(f, (state, x), (tangent, dx)), want)
    with fwAD.dual_level():
        dual = {k: fwAD.make_dual(p, tangent[k]) for k, p in state.items()}
        y = fwAD.unpack_dual(f(dual, fwAD.make_dual(x, dx)))
    _assert_all_close((y.primal, y.tangent), want)
    _assert_all_close(torch.utils._pytree.tree_leaves(torch.func.jacfwd(f, argnums=(0, 1))(state, x)),
                      torch.utils._pytree.tree_leaves(torch.func.jacrev(g, argnums=(0, 1))(state, x)))


@bundled
def test_jacfwd_of_a_projection_matches_the_closed_form(make):
    node, x, reference = make()
    rho = node.parametrizations.radius.original.detach()
    f = lambda x, rho: torch.func.functional_call(node, {LOG_RADIUS: rho}, (x,))  # noqa: E731
    g = lambda x, rho: reference(x, rho.exp())  # noqa: E731
    _assert_all_close(torch.func.jacfwd(f, argnums=(0, 1))(x, rho),
                      torch.func.jacrev(g, argnums=(0, 1))(x, rho))


# -- double backward: gradgradcheck, Hessian-vector products, a node inside a node ----------------

@checked
def test_gradgradcheck_or_a_clear_error(make):
    node, x = make()
    call, params = _as_function(node)
    leaves = (x.requires_grad_(), *params)
    if isinstance(node, Ridge):
        assert torch.autograd.gradgradcheck(call, leaves)
    else:  # closed-form first-order vjps (bundled nodes): refused, never wrong
        with pytest.raises(NotImplementedError, match="double backward .* overrides vjp"):
            torch.autograd.gradgradcheck(call, leaves)


@generic
def test_hessian_vector_product_of_a_loss_through_a_node_matches_the_closed_form(cls):
    node = cls()
    x, d = _x(3).requires_grad_(), _x(3)
    wrt = [x, node.A]

    def hvp(f):
        loss = f(x).sin().sum() + f(x).square().sum()
        grads = torch.autograd.grad(loss, wrt, create_graph=True)
        return torch.autograd.grad((grads[0] * d).sum(), wrt)

    _assert_all_close(hvp(node), hvp(node.closed_form))


class Nested(DeclarativeNode):
    """``y = argmin ½‖R(y) − x‖² + ½ ε‖y‖²`` where ``R`` is a declarative node (a Ridge layer)."""

    def __init__(self, eps=0.1):
        super().__init__()
        self.inner = Ridge(n=5, m=3)
        self.eps = eps

    def objective(self, x, y):
        return 0.5 * (self.inner(y) - x).square().sum(-1) + 0.5 * self.eps * y.square().sum(-1)

    def initial_guess(self, x):
        return x.new_zeros(x.shape[0], 5)

    def closed_form(self, x):
        R = self.inner.closed_form(torch.eye(5, dtype=x.dtype)).T  # inner(y) = R y, R (3, 5)
        M = R.T @ R + self.eps * torch.eye(5, dtype=x.dtype)
        return torch.linalg.solve(M, R.T @ x.T).T


def test_a_node_inside_another_nodes_objective():
    node = Nested()
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    y = node(x)
    ref = node.closed_form(x)
    torch.testing.assert_close(y, ref)
    v = torch.randn_like(y)
    wrt = [x, *_params(node).values()]
    _assert_all_close(torch.autograd.grad((y * v).sum(), wrt),
                      torch.autograd.grad((ref * v).sum(), wrt))


def test_double_backward_of_a_constrained_generic_node_raises_clearly():
    class Sphere(DeclarativeNode):
        def objective(self, x, y):
            return 0.5 * (y - x).square().sum(-1)

        def equality_constraints(self, x, y):
            return y.square().sum(-1, keepdim=True) - 1

    x = 2 + torch.rand(3, 4, dtype=F64, requires_grad=True)
    y = Sphere()(x)
    with pytest.raises(NotImplementedError, match="double backward .* constraints"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_nested_torch_func_transforms_raise_clearly():
    node = Ridge()
    with pytest.raises(NotImplementedError, match="nested torch.func transforms"):
        torch.func.hessian(lambda t: node(t).square().sum())(_x(2))
