"""ddnlib.linalg.cg: batched conjugate gradients and its per-system diagnostics."""

import pytest
import torch

from ddnlib.linalg import cg

DTYPES = [torch.float32, torch.float64]


def _spd(b: int, m: int, dtype, cond: float = 10.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(b, m, m, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), m, dtype=torch.float64)
    return (Q @ torch.diag_embed(eig.expand(b, m)) @ Q.transpose(-1, -2)).to(dtype)


def _matvec(M: torch.Tensor):
    return lambda P: (M @ P.unsqueeze(-1)).squeeze(-1)  # P (k, b, m)


@pytest.mark.parametrize("dtype", DTYPES)
def test_solves_spd_systems_per_right_hand_side(dtype):
    b, m = 5, 12
    M = _spd(b, m, dtype)
    rhs = torch.randn(2, b, m, dtype=dtype)
    tol = torch.tensor([[torch.finfo(dtype).eps ** 0.5], [0.1]], dtype=dtype)
    x, info = cg(_matvec(M), rhs, tol, 100)
    exact = torch.linalg.solve(M.double(), rhs.double().unsqueeze(-1)).squeeze(-1)
    residual = (_matvec(M)(x) - rhs).norm(dim=-1) / rhs.norm(dim=-1)
    assert (residual <= tol * 1.01).all()
    assert torch.allclose(x[0].double(), exact[0], rtol=0, atol=1e3 * torch.finfo(dtype).eps ** 0.5)
    assert not (info.not_pd | info.singular | info.not_converged).any()
    eig_min = torch.linalg.eigvalsh(M.double())[:, 0]
    assert (info.min_eig.double() >= eig_min * (1 - 1e-4)).all()  # an upper bound of λ_min


def test_strided_right_hand_side_gives_the_contiguous_answer():
    b, m = 4, 9
    M = _spd(b, m, torch.float64)
    By = torch.randn(b, m, 2, dtype=torch.float64)
    strided, _ = cg(_matvec(M), By.movedim(-1, 0), 1e-12, 100)
    dense, _ = cg(_matvec(M), By.movedim(-1, 0).contiguous(), 1e-12, 100)
    assert torch.allclose(strided, dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flags_singular_indefinite_and_non_finite_samples(dtype):
    b, m = 4, 6
    M = _spd(b, m, dtype)
    M[1] = torch.zeros(m, m, dtype=dtype)               # zero curvature everywhere: singular
    M[2] = -M[2]                                       # negative definite: not PD
    rhs = torch.randn(1, b, m, dtype=dtype)

    def matvec(P):
        out = _matvec(M)(P)
        out[:, 3] = torch.nan                          # a non-finite Hessian-vector product
        return out

    x, info = cg(matvec, rhs, 1e-6, 50)
    assert info.singular.tolist() == [False, True, False, False]
    assert info.not_pd.tolist() == [False, False, True, False]
    assert info.not_converged.tolist() == [False, False, False, True]
    assert torch.isfinite(x[0, 0]).all()


def test_matvec_sees_only_running_right_hand_sides():
    b, m = 3, 8
    M = _spd(b, m, torch.float64, cond=100.0)
    rhs = torch.randn(2, b, m, dtype=torch.float64)
    rhs[1] = 0.0                                       # solved from the start
    widths = []

    def matvec(P):
        widths.append(P.shape[0])
        return _matvec(M)(P)

    x, info = cg(matvec, rhs, 1e-10, 100)
    assert set(widths) == {1} and (x[1] == 0).all() and not info.not_converged.any()
