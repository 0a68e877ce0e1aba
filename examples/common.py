"""What both studies share: seeding, device choice, mini-batch training, evaluation (top-1 and
mean average precision), summaries over seeds, tracking of the learned node parameters,
checkpoints, tables, CSV files and plots."""

from __future__ import annotations

import argparse
import csv
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils import parametrize
from tqdm import tqdm

__all__ = [
    "base_parser",
    "set_seed",
    "resolve_device",
    "batches",
    "train",
    "accuracy",
    "evaluate",
    "mean_average_precision",
    "mean_std",
    "format_mean_std",
    "plural",
    "parse_seeds",
    "learned_values",
    "save_checkpoint",
    "write_csv",
    "format_table",
    "median_ms",
]

# Attribute names under which the bundled nodes expose their learnable scalars (or vectors).
_LEARNED = ("c", "alpha", "radius", "r")


def base_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", default="0,1,2",
                   help="comma-separated seeds; each seeds data, initialisation and shuffling of one repetition")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', ...")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per model")
    p.add_argument("--batch-size", type=int, default=32, help="training mini-batch size (evaluation uses twice it)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--data-dir", type=Path, default=None, help="local copy of a real data set")
    p.add_argument("--out", type=Path, default=Path(default_out), help="output directory")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest on a shared 2-core machine; results depend on it)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the tqdm progress bars (they are hidden anyway when stderr is not a terminal)")
    return p


def run_program(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object],
                argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and ``run``; a missing or malformed data set is a usage error (exit 2)."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    return 0


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; at least one seed, no repeats."""
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: expected one or more distinct integers")
    return seeds


def set_seed(seed: int, threads: int, device: torch.device) -> None:
    """Seed Python, NumPy and torch; fix the CPU thread count (CPU kernels are deterministic for
    a fixed count) and ask for deterministic kernels on CUDA."""
    if threads < 1:
        raise ValueError(f"--threads {threads}: expected a positive integer")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[Tensor]:
    """Index batches over ``range(n)``: shuffled with ``generator``, in order when it is None."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


def learned_values(model: torch.nn.Module) -> dict[str, float]:
    """The current value of every learnable node scalar (``c``, ``alpha``, ``radius``), by module
    path; read through the module attribute, so a parametrised value is the constrained one.
    A per-channel parameter is summarised by its mean."""
    out = {}
    for path, module in model.named_modules():
        for name in _LEARNED:
            owned = name in module._parameters or parametrize.is_parametrized(module, name)
            value = getattr(module, name) if owned else None
            if isinstance(value, Tensor) and value.requires_grad:
                out[f"{path}.{name}" if path else name] = float(value.detach().float().mean())
    return out


def train(
    model: torch.nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
    augment: Callable[[Tensor], Tensor] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Minimise cross-entropy; return one record per step (epoch, step, loss and the learned node
    values after the step)."""
    loss_fn = torch.nn.CrossEntropyLoss()
    history = []
    steps = epochs * -(-len(labels) // batch_size)
    # disable=None: tqdm hides itself when its stream (stderr) is not a terminal, e.g. in a log file
    bar = tqdm(total=steps, desc=desc, disable=None if progress else True, leave=False)
    step = 0
    for epoch in range(epochs):
        model.train()
        for idx in batches(len(labels), batch_size, generator):
            x = inputs[idx]
            if augment is not None:
                x = augment(x)
            x, y = x.to(device), labels[idx].to(device)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            history.append({"epoch": epoch, "step": step, "loss": float(loss.detach()), **learned_values(model)})
            bar.update()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    return history


@torch.no_grad()
def scores(model: torch.nn.Module, inputs: Tensor, batch_size: int, device) -> Tensor:
    """Softmax class probabilities ``(n, classes)`` in evaluation mode, on the CPU."""
    model.eval()
    out = [torch.softmax(model(inputs[idx].to(device)).float(), 1).cpu()
           for idx in batches(len(inputs), batch_size, None)]
    return torch.cat(out)


def accuracy(model: torch.nn.Module, inputs: Tensor, labels: Tensor, batch_size: int, device) -> float:
    """Top-1 accuracy in percent, evaluation mode."""
    return evaluate(model, inputs, labels, batch_size, device)[0]


def mean_average_precision(probs: Tensor, labels: Tensor) -> float:
    """Mean average precision ×100: for each class ``k`` present in ``labels``, scikit-learn's
    ``average_precision_score(labels == k, probs[:, k])`` (one-vs-rest ranking of the test set by
    the class-``k`` score; AP = Σ_n (R_n − R_{n−1}) P_n), then the unweighted mean over classes
    (macro average). Classes absent from ``labels`` have no AP and are left out."""
    from sklearn.metrics import average_precision_score

    y = labels.numpy()
    p = probs.double().numpy()
    aps = [average_precision_score(y == k, p[:, k]) for k in range(p.shape[1]) if (y == k).any()]
    return 100.0 * float(np.mean(aps)) if aps else math.nan


def evaluate(model: torch.nn.Module, inputs: Tensor, labels: Tensor, batch_size: int, device) -> tuple[float, float]:
    """``(top-1 %, mAP ×100)`` of ``model`` on ``(inputs, labels)`` (see :func:`mean_average_precision`)."""
    probs = scores(model, inputs, batch_size, device)
    top1 = 100.0 * float((probs.argmax(1) == labels).double().mean()) if len(labels) else math.nan
    return top1, mean_average_precision(probs, labels)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof = 1``; 0 for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def plural(n: int, noun: str) -> str:
    """``"1 seed"``, ``"3 seeds"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_mean_std(values: Sequence[float] | None, digits: int = 1) -> str:
    """``"86.6±1.2"`` (mean ± sample std over seeds); ``"-"`` for None."""
    if values is None:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f}±{s:.{digits}f}"


def save_checkpoint(path: Path, model: torch.nn.Module, **extra) -> None:
    """``state_dict`` of the model plus the learned node values and ``extra`` metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "learned": learned_values(model), **extra}, path)


def save_figure(fig, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (PNG, 120 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def format_table(title: str, row_names: Sequence[str], col_names: Sequence[str], cells,
                 groups: Sequence[tuple[str, int]] = ()) -> str:
    """A fixed-width text table; ``cells[i][j]`` is a number (one decimal), a string, or None
    (printed as '-'). Columns are separated by two spaces; ``groups`` ``[(label, span), …]`` adds
    a header line above the column names with each label centred over ``span`` columns."""
    text = [["-" if v is None else v if isinstance(v, str) else f"{v:.1f}" for v in row] for row in cells]
    width = max(len(title), *(len(r) for r in row_names))
    cw = [max(len(c), *(len(row[j]) for row in text)) for j, c in enumerate(col_names)]
    lines = []
    if groups:
        spans, j = [], 0
        for label, span in groups:
            w = sum(cw[j:j + span]) + 2 * (span - 1)
            spans.append(f"{label:^{w}}")
            j += span
        lines.append((f"{'':<{width}} | " + "  ".join(spans)).rstrip())
    head = f"{title:<{width}} | " + "  ".join(f"{c:>{w}}" for c, w in zip(col_names, cw))
    lines += [head, "-" * len(head)]
    for name, row in zip(row_names, text):
        lines.append(f"{name:<{width}} | " + "  ".join(f"{v:>{w}}" for v, w in zip(row, cw)))
    return "\n".join(lines)


def median_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return float(np.median(times))
