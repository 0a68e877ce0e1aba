"""A ten-minute tour of ddnlib: a user node written as an objective only, trained, and checked.

The node solves ridge regression per sample,

    y(x; A, λ) = argmin_y ½‖A y − x‖² + ½ λ ‖y‖²,        x: (b, n),  y: (b, m),

with a learnable matrix ``A`` and a learnable ``λ > 0`` (kept positive by
``torch.nn.utils.parametrize``). Its forward pass runs ddnlib's default Newton solver and its backward
pass comes from the implicit function theorem; nothing else is written by hand. We fit ``A`` and ``λ``
so that the node reproduces a teacher node, print the loss falling, and finish with a float64
finite-difference gradient check of the node against the input and both parameters.

Run: ``python examples/ridge.py [--steps N] [--seed S]``.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.utils import parametrize

from ddnlib import DeclarativeNode


class Positive(torch.nn.Module):
    """``λ = softplus(θ)``: a positive parametrisation."""

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(theta)

    def right_inverse(self, lam: torch.Tensor) -> torch.Tensor:
        return lam.expm1().log()


class Ridge(DeclarativeNode):
    """``y = argmin_y ½‖A y − x‖² + ½ λ‖y‖²`` with learnable ``A (n, m)`` and ``λ > 0``."""

    def __init__(self, n: int, m: int, lam: float = 1.0):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(n, m) / n**0.5)
        self.lam = torch.nn.Parameter(torch.tensor(lam))
        parametrize.register_parametrization(self, "lam", Positive())

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = y @ self.A.T - x
        return 0.5 * (r * r).sum(-1) + 0.5 * self.lam * (y * y).sum(-1)

    def initial_guess(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.A.shape[1])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimisation steps (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: expected a positive integer")

    torch.manual_seed(args.seed)
    n, m, b = 6, 3, 64
    teacher, student = Ridge(n, m, lam=0.3), Ridge(n, m, lam=2.0)
    x = torch.randn(b, n)
    with torch.no_grad():
        target = teacher(x)
    optimiser = torch.optim.Adam(student.parameters(), lr=0.05)
    for step in range(args.steps):
        loss = torch.nn.functional.mse_loss(student(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3e}  lambda {student.lam.item():.3f}")

    node = student.double()
    xg = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    params = dict(node.named_parameters())
    names = list(params)

    def call(x, *theta):
        return torch.func.functional_call(node, dict(zip(names, theta)), (x,))

    ok = torch.autograd.gradcheck(call, (xg, *(p.detach().requires_grad_() for p in params.values())))
    print(f"gradcheck (float64; x, {', '.join(names)}): {'passed' if ok else 'FAILED'}")
    return loss.item()


if __name__ == "__main__":
    main()
