"""Multi-process training: robust pooling with a learnable ``c`` under DistributedDataParallel.

Two processes (gloo, CPU) train a small point-cloud classifier, each on half of a global batch;
DDP averages the gradients, so after every step each rank holds the parameters of one process
training on the whole batch (the loss is a mean over equally sized halves). The test checks that
the learned ``c`` (and every other parameter) agrees bitwise across ranks and matches
single-process training on the same global batch to rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from ddnlib.nodes import RobustGlobalPool1d

WORLD = 2
STEPS = 5
BATCH, POINTS, CLASSES = 8, 24, 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv1d(3, 8, 1),  # per-point features (B, 8, N)
        torch.nn.Tanh(),
        RobustGlobalPool1d("pseudo_huber", c=0.5, learn_c=True, channels=8),  # (B, 8)
        torch.nn.Linear(8, CLASSES),
    ).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, POINTS, generator=g, dtype=torch.float64)
    outliers = torch.rand(BATCH, 1, POINTS, generator=g) < 0.2  # 20% gross outliers
    x = torch.where(outliers, 20 * torch.randn(x.shape, generator=g, dtype=x.dtype), x)
    return x, torch.randint(CLASSES, (BATCH,), generator=g)


def _train(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> list[float]:
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    c_values = []
    for _ in range(STEPS):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        optimiser.step()
        pool = model.module[2] if isinstance(model, DistributedDataParallel) else model[2]
        c_values.append(pool.c.detach().clone())
    return c_values


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        x, labels = _data()
        half = BATCH // WORLD
        part = slice(rank * half, (rank + 1) * half)
        ddp = DistributedDataParallel(_model())
        c_values = _train(ddp, x[part], labels[part])
        torch.save({"state": ddp.module.state_dict(), "c": c_values}, f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_two_processes_match_single_process_training(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    single = _model()
    c_single = _train(single, *_data())
    expected = single.state_dict()
    initial = _model().state_dict()

    key = "2.parametrizations.c.original"
    assert key in expected, sorted(expected)
    assert not torch.allclose(expected[key], initial[key]), "c did not learn"
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"{name} differs across ranks"
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    for step, c in enumerate(c_single):
        torch.testing.assert_close(ranks[0]["c"][step], c, rtol=1e-10, atol=1e-12)
