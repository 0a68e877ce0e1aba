"""Entry point: ``python -m benchmarks [CASE ...] [--quick] [--threads N] [--out DIR] [--docs]``.

Runs the named cases (all by default) with a fixed thread count, prints every measured value with
its ratio against the baseline measured in the same run, checks the targets, and writes
``results.json`` and ``results.md`` to ``--out`` (default: ``benchmarks/results``, the committed
results, for a full run of every case; ``build/benchmarks`` otherwise, ignored by git, so a quick
or partial run never overwrites the committed figures). ``--docs`` also rewrites the results
section of ``docs/benchmarks.md`` and the plots ``docs/img/bench_*.png`` (full runs of every case
only). Absolute times depend on the machine; the ratios are the result.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from .harness import Report, Settings, Skip

CASES = {
    "engine_vs_loop": "generic engine backward vs per-output-dimension autograd loop; dense vs CG",
    "closed_form": "generic engine vs hand-derived closed-form vjp of the bundled nodes",
    "unrolled": "implicit backward vs autograd unrolled through the solver: time and memory",
    "pooling": "robust pooling per penalty vs mean pooling, forward and backward",
    "nonconvex_pooling": "Welsch / Barron pooling vs pseudo-Huber and the original DDN method",
    "projections": "projection nodes vs F.normalize, forward + backward",
    "torchopt_peer": "ddnlib vs torchopt.diff.implicit on the same node",
    "constrained": "objective + constraints only vs qpth, cvxpylayers, torchopt, closed forms",
}

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "benchmarks" / "results"  # the full run's results, tracked by git
SCRATCH = ROOT / "build" / "benchmarks"  # quick and partial runs (build/ is ignored)


def machine() -> dict[str, str | int]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count() or 0, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def _fmt_value(value: float, unit: str) -> str:
    if unit == "B":
        return f"{value / 2**20:.3f} MiB"
    for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if value >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value * 1e9:.3g} ns"


def markdown(result: dict) -> str:
    """The results of one run as Markdown: machine, targets, every row, skipped cases."""
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
             f"{m['threads']} threads, Python {m['python']}. Mode: "
             f"{'quick' if result['quick'] else 'full'}; {result['elapsed_s']:.0f} s in all."
             + (" Quick mode uses tiny sizes: its ratios and targets judge nothing."
                if result["quick"] else ""), "",
             "| target | measured | wanted | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['case']}: {t['what']} | {t['measured']:.3g} | {t['target']} | "
                     f"{'yes' if t['met'] else '**no**'} |")
    lines += ["", "| case | setting | variant | ratio to baseline | baseline | "
              "absolute (machine-dependent) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kind = "time" if r["unit"] == "s" else "saved for backward"
        lines.append(f"| {r['case']} | {r['setting']} | {r['variant']} | {r['ratio']:.3g}x | "
                     f"{r['baseline']} | {_fmt_value(r['value'], r['unit'])} ({kind}) |")
    if result["notes"]:
        lines += ["", *(f"- {n['case']}: {n['text']}" for n in result["notes"])]
    if result["skipped"]:
        lines += ["", *(f"- skipped {s['case']}: {s['reason']}" for s in result["skipped"])]
    return "\n".join(lines) + "\n"


def _print_table(result: dict) -> None:
    print(markdown(result))


def update_docs(result: dict, out: Path) -> None:
    """Rewrite the generated section of ``docs/benchmarks.md`` and the plots in ``docs/img``."""
    from .plots import plot_all

    doc = ROOT / "docs" / "benchmarks.md"
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = doc.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{doc} lacks the markers {start} / {end}")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    doc.write_text(f"{head}{start}\n{markdown(result)}{end}{tail}")
    plot_all(result, ROOT / "docs" / "img")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", metavar="CASE",
                        help="cases to run (default: all): " + ", ".join(CASES))
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: checks that everything runs (< 1 min)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: on a machine shared with other "
                             "work, more threads than idle cores makes timings meaningless)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per comparison (default 7, quick 3)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for results.json and results.md (default: "
                             "benchmarks/results for a full run of every case, build/benchmarks "
                             "for a quick or partial run)")
    parser.add_argument("--docs", action="store_true",
                        help="also update docs/benchmarks.md and docs/img/bench_*.png")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}: expected some of {list(CASES)}")
    if args.threads < 1:
        parser.error(f"--threads={args.threads}: expected a positive integer")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: expected a positive integer")
    full = not args.quick and not args.cases
    if args.docs and not full:
        parser.error("--docs publishes a full run of every case: drop --quick and the case names")
    out = args.out if args.out is not None else (COMMITTED if full else SCRATCH)
    torch.set_num_threads(args.threads)
    settings = Settings(quick=args.quick, repeats=args.repeats or (3 if args.quick else 7),
                        min_block_s=0.002 if args.quick else 0.02)

    report = Report()
    started = time.perf_counter()
    for name in args.cases or list(CASES):
        case_start = time.perf_counter()
        print(f"[{name}] {CASES[name]} ...", flush=True)
        try:
            module = importlib.import_module(f".{name}", __package__)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. unconverged unrolled solves, by design
                module.run(report, settings)
        except Skip as reason:
            report.skip(name, str(reason))
            print(f"[{name}] skipped: {reason}", flush=True)
        print(f"[{name}] {time.perf_counter() - case_start:.1f} s", flush=True)
    result = {"command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
              "quick": args.quick, "machine": machine(),
              "elapsed_s": time.perf_counter() - started, **report.as_dict()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(markdown(result))
    _print_table(result)
    print(f"results written to {out}")
    if args.docs:
        update_docs(result, out)
    return 0
