"""Smoke tests of the two studies in ``examples/`` (a few steps on tiny data), their command line,
determinism and error messages, and a finite-difference check of the study model's gradient with
respect to the learned robust-pooling threshold."""

import csv
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import common  # noqa: E402
import images  # noqa: E402
import pointcloud  # noqa: E402

_TINY_PC = ["--per-class", "2", "--test-per-class", "1", "--classes", "4", "--num-points", "32",
            "--widths", "8,8,8", "--epochs", "1", "--batch-size", "4", "--rates", "0,50", "--no-progress"]


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
    for name in ("table.txt", "accuracy.csv", "accuracy.png", "timing.csv", "trajectory.csv", "trajectory.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = _rows(tmp_path / "accuracy.csv")
    assert len(rows) == 4 * 2 and {r["outlier_rate"] for r in rows} == {"0", "50"}
    traj = _rows(tmp_path / "trajectory.csv")
    assert {r["pooling"] for r in traj} == {"pseudo_huber:learned", "general:learned"}
    general = [r for r in traj if r["pooling"] == "general:learned"]
    assert len(general) == 2 and "pool.alpha" in general[0] and "pool.c" in general[0]
    # one Adam step moved the learned values away from their initial c = 1, alpha = 1
    assert all(float(r["pool.c"]) != 1.0 for r in traj)
    ckpt = torch.load(tmp_path / "checkpoints" / "general-learned.pt")
    assert set(ckpt["learned"]) == {"pool.c", "pool.alpha"}
    assert "pool.parametrizations.c.original" in ckpt["state_dict"]
    out = capsys.readouterr().out
    assert "pseudo_huber:learned" in out and "pooling \\ outliers %" in out


def test_pointcloud_outlier_training_mode(tmp_path):
    args = pointcloud._parser().parse_args(_TINY_PC + ["--poolings", "max", "--mode", "outliers", "--out", str(tmp_path)])
    results = pointcloud.run(args)
    assert len(results["max"]) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["max-train0.pt", "max-train50.pt"]


def test_pointcloud_is_deterministic(tmp_path):
    argv = _TINY_PC + ["--poolings", "max,huber:learned", "--seed", "5"]
    runs = []
    for k in range(2):
        pointcloud.run(pointcloud._parser().parse_args(argv + ["--out", str(tmp_path / str(k))]))
        runs.append((_rows(tmp_path / str(k) / "accuracy.csv"), _rows(tmp_path / str(k) / "trajectory.csv")))
    assert runs[0] == runs[1]


def test_images_smoke(tmp_path, capsys):
    variants = "none,l2_ball:fixed,linf_ball:learned,linf_ball:learned-scaled"
    args = images._parser().parse_args(["--variants", variants, "--epochs", "1", "--limit", "128", "--width", "4",
                                        "--no-progress", "--out", str(tmp_path)])
    results = images.run(args)
    assert list(results) == variants.split(",")
    assert all(0 <= a <= 100 for a in results.values())
    for name in ("table.txt", "accuracy.csv", "accuracy.png", "trajectory.csv", "trajectory.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    traj = _rows(tmp_path / "trajectory.csv")
    assert {r["variant"] for r in traj} == {"linf_ball:learned", "linf_ball:learned-scaled"}
    assert "projection.radius" in traj[0] or "projection.projection.radius" in traj[-1]
    assert "linf_ball" in capsys.readouterr().out


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
