"""Smoke tests of the benchmark harness (``python -m benchmarks --quick``): it runs, writes its
results, and its measuring pieces count what they claim to. Speed itself is never judged here."""

import json

import pytest
import torch

from benchmarks.engine_vs_loop import _crossover, loop_backward
from benchmarks.harness import Report, Settings, interleaved, saved_bytes
from benchmarks.problems import RobustRegression, SmoothDenoiser
from benchmarks.run import main, markdown


@pytest.fixture
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_json_and_markdown(tmp_path, _keep_threads):
    assert main(["unrolled", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["quick"] and result["machine"]["threads"] == 1
    rows = result["rows"]
    assert {r["variant"] for r in rows} == {"implicit", "unrolled"}
    assert all(r["value"] > 0 and r["ratio"] > 0 for r in rows)
    assert all(r["ratio"] == 1 for r in rows if r["variant"] == r["baseline"])
    assert {t["case"] for t in result["targets"]} == {"unrolled"}
    assert (tmp_path / "results.md").read_text() == markdown(result)


def test_unknown_case_is_rejected(capsys, _keep_threads):
    with pytest.raises(SystemExit):
        main(["no_such_case", "--quick"])
    assert "no_such_case" in capsys.readouterr().err


def test_interleaved_returns_a_median_per_variant():
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    times = interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")},
                        Settings(repeats=3, min_block_s=0.0))
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == {"a": 4, "b": 4}  # one warm-up call, then one call per round


def test_saved_bytes_counts_saved_storages_and_excludes_leaves():
    a = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    counted, out = saved_bytes(lambda: a.exp().sum(), exclude=[a])
    assert counted == 1000 * 8  # exp saves its result; sum saves nothing
    counted, _ = saved_bytes(lambda: (a * a).sum(), exclude=[a])
    assert counted == 0  # mul saves only the (excluded) leaf
    assert saved_bytes(lambda: (a * a).sum())[0] == 1000 * 8  # one storage, counted once


@pytest.mark.parametrize("make", [lambda m: SmoothDenoiser(), lambda m: RobustRegression(m)])
def test_loop_baseline_matches_autograd_through_the_engine(make):
    torch.manual_seed(0)
    node = make(6).requires_grad_(False)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 6, dtype=torch.float64)
    y = node(x)
    expected = torch.autograd.grad(y, x, v)[0]
    torch.testing.assert_close(loop_backward(node, x, y.detach(), v), expected)


def test_crossover_interpolates_where_cg_starts_winning():
    ms = [8, 32, 128]
    assert _crossover(ms, dense=[1.0, 1.0, 1.0], cg=[2.0, 0.5, 0.25]) == pytest.approx(16.0)
    assert _crossover(ms, dense=[1.0, 1.0, 1.0], cg=[2.0, 2.0, 2.0]) is None
    assert _crossover(ms, dense=[1.0, 1.0, 1.0], cg=[0.5, 0.5, 0.5]) == 8


def test_report_ratios_are_against_the_named_baseline():
    report = Report()
    report.add("c", "s", {"base": 2.0, "other": 5.0}, baseline="base", m=3)
    assert [(r.variant, r.ratio, r.params) for r in report.rows] == [
        ("base", 1.0, {"m": 3}), ("other", 2.5, {"m": 3})]
