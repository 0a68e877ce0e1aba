"""Smoke tests of the two studies in ``examples/`` (a few steps on tiny data), their command line,
determinism and error messages, and a finite-difference check of the study model's gradient with
respect to the learned robust-pooling threshold."""

import csv
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import common  # noqa: E402
import images  # noqa: E402
import pointcloud  # noqa: E402

_TINY_PC = ["--per-class", "2", "--test-per-class", "1", "--classes", "4", "--num-points", "32",
            "--widths", "8,8,8", "--epochs", "1", "--batch-size", "4", "--rates", "0,50", "--seeds", "3,4",
            "--no-progress"]


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_pointcloud_smoke(tmp_path, capsys):
    args = pointcloud._parser().parse_args(
        _TINY_PC + ["--poolings", "max,mean,pseudo_huber:learned,general:learned", "--out", str(tmp_path)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a barely trained net may leave a pooled row unconverged
        results = pointcloud.run(args)
    assert list(results) == ["max", "mean", "pseudo_huber:learned", "general:learned"]
    assert all(results[s][m].shape == (2, 2) for s in results for m in ("top1", "map"))  # (seeds, rates)
    written = ("table.txt", "accuracy.csv", "summary.csv", "learned.csv", "timing.csv", "trajectory.csv",
               "accuracy.png", "trajectory.png")
    for name in written:
        assert (tmp_path / name).stat().st_size > 0, name
    rows = _rows(tmp_path / "accuracy.csv")
    assert len(rows) == 4 * 2 * 2 and {r["outlier_rate"] for r in rows} == {"0", "50"}
    assert {r["seed"] for r in rows} == {"3", "4"}
    assert all(0 <= float(r["map"]) <= 100 and 0 <= float(r["top1"]) <= 100 for r in rows)
    # the summary is the mean and sample std of the per-seed rows, with the seed's published value
    summary = {(r["pooling"], r["outlier_rate"]): r for r in _rows(tmp_path / "summary.csv")}
    for spec in results:
        for rate in ("0", "50"):
            vals = [float(r["map"]) for r in rows if r["pooling"] == spec and r["outlier_rate"] == rate]
            m = sum(vals) / 2
            assert float(summary[spec, rate]["map_mean"]) == pytest.approx(m, abs=1e-3)
            assert float(summary[spec, rate]["map_std"]) == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2), abs=1e-3)
    assert float(summary["max", "0"]["seed_top1"]) == 88.4 and float(summary["mean", "50"]["seed_map"]) == 62.3
    assert summary["general:learned", "0"]["seed_top1"] == ""  # not one of the seed's columns
    traj = _rows(tmp_path / "trajectory.csv")
    assert {r["pooling"] for r in traj} == {"pseudo_huber:learned", "general:learned"}
    general = [r for r in traj if r["pooling"] == "general:learned"]
    assert len(general) == 2 * 2 and "pool.alpha" in general[0] and "pool.c" in general[0]
    # one Adam step moved the learned values away from their initial c = 1, alpha = 1
    assert all(float(r["pool.c"]) != 1.0 for r in traj)
    learned = _rows(tmp_path / "learned.csv")
    assert len(learned) == 2 * (1 + 2)  # seeds × (c of pseudo-Huber, c and α of general)
    ckpt = torch.load(tmp_path / "checkpoints" / "general-learned-seed4.pt")
    assert set(ckpt["learned"]) == {"pool.c", "pool.alpha"}
    assert "pool.parametrizations.c.original" in ckpt["state_dict"]
    timing = _rows(tmp_path / "timing.csv")
    assert all(float(t["forward_backward_ms"]) >= float(t["forward_ms"]) for t in timing)
    out = capsys.readouterr().out
    table = (tmp_path / "table.txt").read_text()
    assert table.strip() in out
    assert "beside the seed's Table 3.2" in table and "mAP ×100, every pooling" in table
    written_line = next(line for line in out.splitlines() if line.startswith("written to"))
    assert all(name in written_line for name in written)


def test_pointcloud_outlier_training_mode(tmp_path):
    args = pointcloud._parser().parse_args(_TINY_PC + ["--poolings", "max,huber:learned", "--mode", "outliers",
                                                       "--seeds", "0", "--out", str(tmp_path)])
    results = pointcloud.run(args)
    assert results["max"]["top1"].shape == (1, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "huber-learned-train0-seed0.pt", "huber-learned-train50-seed0.pt", "max-train0-seed0.pt", "max-train50-seed0.pt"]
    learned = _rows(tmp_path / "learned.csv")
    assert sorted(r["train_rate"] for r in learned) == ["0", "50"]
    assert "beside the seed's Table 3.1" in (tmp_path / "table.txt").read_text()


def test_pointcloud_is_deterministic(tmp_path):
    argv = _TINY_PC + ["--poolings", "max,huber:learned", "--seeds", "5"]
    runs = []
    for k in range(2):
        pointcloud.run(pointcloud._parser().parse_args(argv + ["--out", str(tmp_path / str(k))]))
        runs.append((_rows(tmp_path / str(k) / "accuracy.csv"), _rows(tmp_path / str(k) / "trajectory.csv")))
    assert runs[0] == runs[1]


def _fake(values: dict) -> dict:
    """``{pooling: {"top1": array, "map": array}}`` with top-1 = mAP = ``values[pooling]``."""
    return {k: {"top1": np.asarray(v, float), "map": np.asarray(v, float)} for k, v in values.items()}


def test_side_by_side_table_puts_ours_beside_the_seeds_number():
    results = _fake({"max": [[80.0, 10.0], [90.0, 30.0]], "welsch:learned": [[70.0, 60.0], [70.0, 60.0]]})
    text = pointcloud.side_by_side("top1", [0, 1], results, pointcloud.SEED_TABLE_3_2)
    lines = text.splitlines()
    assert lines[0].split("|")[1].split() == list(pointcloud.SEED_COLUMNS)
    assert lines[1].split("|")[1].split() == ["ours", "seed"] * 6
    row0 = lines[3].split("|")[1].split()
    row1 = lines[4].split("|")[1].split()
    # M: mean ± sample std over the two seeds, then the seed's number; Q, PH, H not run; W
    assert row0[:2] == ["85.0±7.1", "88.4"] and row1[:2] == ["20.0±14.1", "32.6"]
    assert row0[2:8] == ["-", "84.7", "-", "86.6", "-", "86.7"]
    assert row0[8:10] == ["70.0±0.0", "85.9"] and row1[10:] == ["-", "85.3"]
    # every cell of a column starts at the same offset as its header: the columns do not run together
    bar = lines[1].index("|")
    header_ends = [m.end() for m in re.finditer(r"\S+", lines[1][bar:])]
    for line in lines[3:5]:
        assert line.index("|") == bar
        assert [m.end() for m in re.finditer(r"\S+", line[bar:])] == header_ends
    m = pointcloud.side_by_side("map", [10], results, pointcloud.SEED_TABLE_3_2).splitlines()[3].split()
    assert m[3] == "8.20" and m[-1] == "93.9"  # mAP of max and of TQ at 10 %, as published


def test_seed_tables_are_the_published_numbers():
    t = pointcloud.SEED_TABLE_3_2
    assert sorted(t) == list(pointcloud.DEFAULT_RATES)
    assert t[0]["top1"] == {"M": 88.4, "Q": 84.7, "PH": 86.6, "H": 86.7, "W": 85.9, "TQ": 85.4}
    assert t[90]["map"] == {"M": 4.49, "Q": 8.20, "PH": 17.2, "H": 18.9, "W": 17.1, "TQ": 9.78}
    assert pointcloud.SEED_TABLE_3_1[50]["top1"]["W"] == 84.9


def test_mean_average_precision_matches_its_definition():
    """Per class: AP = Σ_n (R_n − R_{n−1}) P_n over the test set ranked by that class's score
    (no ties here), then the unweighted mean over the classes present."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (60,), generator=g)
    labels[:3] = torch.tensor([0, 1, 2])  # class 3 may be absent; classes 0..2 present
    labels[labels == 3] = 2
    probs = torch.softmax(torch.randn(60, 4, generator=g), 1)
    aps = []
    for k in range(3):
        order = probs[:, k].argsort(descending=True)
        hit = (labels[order] == k).double()
        precision = hit.cumsum(0) / torch.arange(1, 61)
        aps.append(float((precision * hit).sum() / hit.sum()))
    assert common.mean_average_precision(probs, labels) == pytest.approx(100 * sum(aps) / 3, abs=1e-9)
    perfect = torch.nn.functional.one_hot(labels, 4).double() * 0.9 + 0.025
    assert common.mean_average_precision(perfect, labels) == pytest.approx(100.0)
    top1, ap = common.evaluate(torch.nn.Identity(), perfect.log(), labels, 7, "cpu")
    assert top1 == pytest.approx(100.0) and ap == pytest.approx(100.0)


def test_mean_std_and_its_format():
    assert common.mean_std([1.0, 2.0, 3.0, 6.0]) == pytest.approx((3.0, math.sqrt(14 / 3)))
    assert common.mean_std([4.0]) == (4.0, 0.0)
    assert common.format_mean_std([86.0, 87.0, 88.0]) == "87.0±1.0"
    assert common.format_mean_std(None) == "-"


@pytest.mark.parametrize("text,ok", [("0,1,2", [0, 1, 2]), ("7", [7]), ("1,1", None), ("", None), ("a", None)])
def test_parse_seeds(text, ok):
    if ok is None:
        with pytest.raises(ValueError, match="--seeds"):
            common.parse_seeds(text)
    else:
        assert common.parse_seeds(text) == ok


def test_progress_bars_stay_out_of_a_non_terminal_log(capsys):
    """pytest's captured streams are not terminals: with progress requested, nothing is printed."""
    model = torch.nn.Linear(3, 2)
    common.train(model, torch.randn(8, 3), torch.tensor([0, 1] * 4), epochs=2, batch_size=2,
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1), generator=torch.Generator().manual_seed(0),
                 device=torch.device("cpu"), progress=True)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_time_pooling_reports_consistent_times():
    pool = pointcloud.make_pooling("welsch:learned")
    fwd, bwd, both = pointcloud.time_pooling(pool, torch.randn(2, 4, 16), repeats=3)
    assert 0 < fwd <= both and 0 < bwd <= both
    assert all(p.grad is None for p in pool.parameters())


def test_batch_size_has_help():
    assert "mini-batch size" in pointcloud._parser().format_help()


def test_images_smoke(tmp_path, capsys):
    variants = "none,l2_ball:fixed,l2_ball:learned,linf_ball:learned,linf_ball:learned-scaled"
    args = images._parser().parse_args(["--data", "digits", "--variants", variants, "--epochs", "1", "--limit", "64", "--width", "4",
                                        "--seeds", "0,1", "--no-progress", "--out", str(tmp_path)])
    results = images.run(args)
    assert list(results) == variants.split(",")
    assert all(results[v][m].shape == (2,) and ((0 <= results[v][m]) & (results[v][m] <= 100)).all()
               for v in results for m in ("top1", "map"))
    written = ("table.txt", "accuracy.csv", "summary.csv", "trajectory.csv", "accuracy.png", "trajectory.png")
    for name in written:
        assert (tmp_path / name).stat().st_size > 0, name
    rows = _rows(tmp_path / "accuracy.csv")
    assert len(rows) == 5 * 2 and {r["seed"] for r in rows} == {"0", "1"}
    traj = _rows(tmp_path / "trajectory.csv")
    assert {r["variant"] for r in traj} == {"l2_ball:learned", "linf_ball:learned", "linf_ball:learned-scaled"}
    assert "projection.radius" in traj[0] or "projection.projection.radius" in traj[-1]
    out = capsys.readouterr().out
    assert "learned-fixed" in out and "the seed, Imagewoof" in out and "linf_ball:learned-scaled" in out
    written_line = next(line for line in out.splitlines() if line.startswith("written to"))
    assert all(name in written_line for name in written)


def test_images_noisy_digits_split_and_corruption():
    args = images._parser().parse_args([])
    tx, ty, _vx, vy, names, _ = images.load_data(args, seed=0)
    assert (len(ty), len(vy)) == (500, 1297) and names == [str(i) for i in range(10)]
    tx2, *_ = images.load_data(args, seed=0)
    torch.testing.assert_close(tx, tx2)
    other, *_ = images.load_data(args, seed=1)
    assert not torch.equal(tx, other)
    clean = images.load_data(images._parser().parse_args(["--data", "digits"]), seed=0)
    assert len(clean[1]) == int(0.7 * 1797)


def test_images_comparison_table_reports_the_paired_difference():
    results = {"none": {"top1": np.array([60.0, 62.0]), "map": np.array([50.0, 54.0])},
               "l2_ball:fixed": {"top1": np.array([70.0, 60.0]), "map": np.array([60.0, 50.0])},
               "l2_ball:learned": {"top1": np.array([71.0, 63.0]), "map": np.array([65.0, 51.0])}}
    text = images.comparison_table(results, "test")
    assert "no projection: top-1 61.0±1.4, mAP 52.0±2.8" in text
    row = next(line for line in text.splitlines() if line.startswith("l2_ball")).split("|")[1].split()
    # top-1: fixed 65±7.1, learned 67±5.7, paired difference (1, 3) → 2.0±1.4; mAP: (5, 1) → 3.0±2.8
    assert row == ["65.0±7.1", "67.0±5.7", "2.0±1.4", "55.0±7.1", "58.0±9.9", "3.0±2.8"]


def test_images_seed_table_is_the_published_numbers():
    text = images.seed_table()
    line = next(line for line in text.splitlines()[text.splitlines().index("the seed, Imagewoof (ResNet-18)"):]
                if line.startswith("l2_ball"))
    assert line.split("|")[1].split() == ["80.35", "81.34", "+0.99", "72.86", "80.35", "+7.49"]


@pytest.mark.parametrize("name,d", [("l1_ball", 64), ("l2_sphere", 64), ("linf_ball", 64), ("linf_sphere", 512)])
def test_default_radius_is_the_expected_norm_of_standardised_features(name, d):
    p = {"l1": 1, "l2": 2, "li": math.inf}[name[:2]]
    z = torch.randn(20000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = float(torch.linalg.vector_norm(z, ord=p, dim=1).mean())
    assert images.default_radius(name, d) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("main,argv,message", [
    (pointcloud.main, ["--data", "modelnet40", "--data-dir", "/nonexistent/modelnet"], "does not exist"),
    (pointcloud.main, ["--data", "modelnet40-txt"], "--data-dir is required"),
    (pointcloud.main, ["--poolings", "max,median"], "'median' is not one of"),
    (pointcloud.main, ["--rates", "0,ten"], "comma-separated integers"),
    (images.main, ["--data", "cifar10", "--data-dir", "/nonexistent/cifar"], "does not exist"),
    (images.main, ["--variants", "l3_ball:fixed"], "'l3_ball:fixed' is not one of"),
    (images.main, ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])  # fmt: skip
def test_clear_errors(main, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_malformed_data_dir(tmp_path, capsys):
    (tmp_path / "ply_data_train0.h5").write_bytes(b"not hdf5")
    (tmp_path / "ply_data_test0.h5").write_bytes(b"not hdf5")
    with pytest.raises(SystemExit) as exc:
        pointcloud.main(["--data", "modelnet40", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "ply_data_train0.h5' is not a readable HDF5 file" in capsys.readouterr().err


@pytest.mark.parametrize("penalty", ["pseudo_huber", "welsch", "general"])
def test_study_model_gradient_wrt_learned_pooling_parameters(penalty):
    """Finite differences of the whole classifier's loss in float64 against the implicit gradient
    for every learned pooling parameter (``log c`` and the logit of ``α``) and the input points."""
    torch.manual_seed(0)
    model = pointcloud.PointNet(3, pointcloud.make_pooling(f"{penalty}:learned"), widths=(8, 8, 4)).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.momentum = None  # cumulative: one batch sets the running statistics
    with torch.no_grad():  # running statistics of these points, so eval-mode features vary
        model.train()(torch.cat([x, x.flip(1)]))
    model.eval()
    assert model.point_features(x).std(-1).min() > 0.05
    learned = [p for n, p in model.named_parameters() if n.startswith("pool.")]
    assert learned

    def loss(x, *params):
        state = {n: p for (n, _), p in zip([(n, p) for n, p in model.named_parameters() if n.startswith("pool.")], params)}
        out = torch.func.functional_call(model, state, (x,), strict=False)
        return out.square().sum()

    assert torch.autograd.gradcheck(loss, (x, *learned), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_learned_values_reads_constrained_parameters():
    model = pointcloud.PointNet(3, pointcloud.make_pooling("general:learned", c=2.0), widths=(4, 4, 4))
    values = common.learned_values(model)
    assert values == pytest.approx({"pool.c": 2.0, "pool.alpha": 1.0})
    assert common.learned_values(pointcloud.PointNet(3, pointcloud.make_pooling("huber:fixed"))) == {}


def test_seed_linf_radius_gradient_is_the_seeds_formula():
    """The reimplementation used to study the seed's L∞ collapse: ``∂ℓ/∂z = v`` on unclipped
    features, 0 on clipped ones; ``∂ℓ/∂r = Σ_b sign(Σ_{i∈M_b} σ_i v_i / |M_b|)``."""
    r = torch.tensor(1.0, requires_grad=True)
    z = torch.tensor([[2.0, -3.0, 0.5], [0.1, 0.2, -0.3], [-1.5, 0.0, 4.0]])
    v = torch.tensor([[1.0, 5.0, 7.0], [1.0, 1.0, 1.0], [-2.0, 3.0, 1.0]])
    y = images._SeedLInfBallFn.apply(z, r)
    torch.testing.assert_close(y, z.clamp(-1, 1))
    z = z.clone().requires_grad_(True)
    gz, gr = torch.autograd.grad(images._SeedLInfBallFn.apply(z, r), (z, r), v)
    torch.testing.assert_close(gz, torch.tensor([[0.0, 0.0, 7.0], [1.0, 1.0, 1.0], [0.0, 3.0, 0.0]]))
    # sample 0: (1·1 + (−1)·5)/2 < 0 → −1; sample 1: nothing clipped → 0; sample 2: (2 + 1)/2 > 0 → +1
    assert float(gr) == 0.0
    # the exact derivative of the bundled node differs: Σ_{i∈M} σ_i v_i summed over the batch = −4 + 3
    from ddnlib.nodes import LInfBall

    node = LInfBall(radius=1.0, learn_radius=True)
    (g_exact,) = torch.autograd.grad((node(z) * v).sum(), [p for p in node.parameters()])
    assert float(g_exact) == pytest.approx(-1.0 * 1.0)  # ∂ℓ/∂ρ = r ∂ℓ/∂r with r = exp(ρ) = 1
