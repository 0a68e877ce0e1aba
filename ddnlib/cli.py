"""Command line: ``python -m ddnlib gradcheck package.module:NodeClass [options]``.

Instantiates a node class, draws random float64 inputs of the given shapes and runs the checks of
:mod:`ddnlib.testing` (optimality of the forward solution, gradients against finite differences for
every input and learnable parameter, an overridden ``vjp`` against the generic engine), printing a
table per sample. Exit status: 0 when every check passes, 1 when one fails, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Sequence

import torch

from .node import DeclarativeNode

__all__ = ["main"]

_MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes (seed + sample index must fit)

_DESCRIPTION = """\
Check a declarative node class: the forward solution is optimal (stationarity / KKT residual,
feasibility, no lower objective nearby or from the default solver when the node has its own
solve), the problem is separable across the batch (perturbing one sample changes neither the
objective nor the solution of the others), its gradients for every input and learnable parameter
match central finite differences in float64, and an overridden vjp matches the generic engine.
Prints a table (check, argument, worst error, tolerance, result) per sample, with the sign
convention of the signed rows below it, and exits with status 1 if any check fails (0 otherwise,
2 for bad usage).
"""

_EPILOG = """\
examples:
  python -m ddnlib gradcheck mypkg.layers:MyNode --input-shape 3,5
  python -m ddnlib gradcheck mypkg.layers:Pair --input-shape 4,6 --input-shape 4,6 --samples 3
  python -m ddnlib gradcheck mypkg.layers:Ridge --kwargs '{"n": 5, "m": 3}' --input-shape 8,5
  python -m ddnlib gradcheck RobustPooling --input-shape 3,6 --input-shape 3 --input-shape 3 \
      --input-range normal --input-range 0.5,2 --input-range 0.5,2.5

The module is imported from the current directory or sys.path. A bare class name (no ':') names
a bundled node of ddnlib.nodes.
"""


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: expected positive integers separated by commas, batch "
            "first, e.g. 3,5")
    return dims


def _range(text: str) -> tuple[float, float] | None:
    if text == "normal":
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        low = high = float("nan")
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise argparse.ArgumentTypeError(
            f"invalid range {text!r}: expected finite LOW,HIGH with LOW < HIGH (e.g. 0.5,2) or "
            "'normal'")
    return low, high


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"invalid seed {text!r}: expected an integer from 0 to {_MAX_SEED}")
    return value


def _kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"invalid kwargs {text!r}: expected a JSON object, e.g. '{{\"n\": 5}}'")
    return value


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="python -m ddnlib", description="ddnlib command line.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "gradcheck", help="check a node class (optimality, gradients, vjp)",
        description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("target", metavar="package.module:NodeClass",
                       help="the DeclarativeNode subclass to check")
    check.add_argument("--input-shape", type=_shape, action="append", dest="shapes",
                       metavar="B,N,...",
                       help="shape of one positional input, batch first; repeat once per input "
                            "(default: one input of shape 3,5)")
    check.add_argument("--input-range", type=_range, action="append", dest="ranges",
                       metavar="LOW,HIGH",
                       help="draw the matching input uniformly from [LOW, HIGH] instead of a "
                            "standard normal ('normal'); if given, once per --input-shape")
    check.add_argument("--seed", type=_seed, default=0,
                       help=f"seed of the random inputs, 0 to {_MAX_SEED} (default 0)")
    check.add_argument("--samples", type=int, default=1, metavar="K",
                       help="number of independent random input draws to check (default 1)")
    check.add_argument("--kwargs", type=_kwargs, default={}, metavar="JSON",
                       help="constructor keyword arguments as a JSON object (default {})")
    return parser, check


def _load(target: str) -> type:
    """The class named by ``package.module:NodeClass`` (or a bare name in ``ddnlib.nodes``)."""
    module_name, sep, qualname = target.rpartition(":")
    if not sep:
        module_name, qualname = "ddnlib.nodes", target
    if not module_name or not qualname:
        raise ValueError(f"invalid target {target!r}: expected package.module:NodeClass")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any failure while importing the user's module is a usage error
        raise ValueError(f"cannot import {module_name!r}: {type(error).__name__}: {error}") from None
    obj = module
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {qualname!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, DeclarativeNode)):
        raise ValueError(f"{target!r} is {obj!r}: expected a subclass of ddnlib.DeclarativeNode")
    return obj


def _gradcheck(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .testing import check_node

    if args.samples < 1:
        parser.error(f"argument --samples: {args.samples}: expected a positive integer")
    if args.seed + args.samples - 1 > _MAX_SEED:
        parser.error(f"argument --seed: {args.seed} with --samples {args.samples}: expected "
                     f"seed + samples - 1 <= {_MAX_SEED} (one seed per sample)")
    shapes = args.shapes or [(3, 5)]
    if len({s[0] for s in shapes}) > 1:
        parser.error(f"argument --input-shape: batch sizes {[s[0] for s in shapes]} differ: "
                     "every input needs the same leading batch dimension")
    ranges = args.ranges or [None] * len(shapes)
    if len(ranges) != len(shapes):
        parser.error(f"argument --input-range: given {len(ranges)} times for {len(shapes)} "
                     "inputs: expected none or one per --input-shape")
    try:
        cls = _load(args.target)
    except ValueError as error:
        parser.error(str(error))
    try:
        node = cls(**args.kwargs)
    except Exception as error:
        parser.error(f"cannot construct {cls.__name__}(**{args.kwargs}): "
                     f"{type(error).__name__}: {error}")
    failed = 0
    for k in range(args.samples):
        generator = torch.Generator().manual_seed(args.seed + k)
        xs = [_draw(shape, bounds, generator) for shape, bounds in zip(shapes, ranges)]
        result = check_node(node, *xs, seed=args.seed + k)
        shown = ", ".join("x".join(map(str, s)) for s in shapes)
        print(f"== {cls.__name__}, sample {k + 1} of {args.samples} (seed {args.seed + k}, "
              f"inputs {shown})")
        print(result.table())
        legend = result.legend()
        if legend:
            print("signed rows:\n" + legend)
        print(result.summary() + "\n")
        failed += not result.passed
    print(f"{cls.__name__}: {'FAILED' if failed else 'PASSED'} "
          f"({args.samples - failed} of {args.samples} samples passed)")
    return 1 if failed else 0


def _draw(shape: tuple[int, ...], bounds: tuple[float, float] | None, generator) -> torch.Tensor:
    if bounds is None:
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser, gradcheck = _parser()
    args = parser.parse_args(argv)
    return _gradcheck(args, gradcheck)
