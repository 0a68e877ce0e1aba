"""Real-format loaders, transforms and the embedded shape generator of ``examples/``.

Each loader reads a tiny data set that the test writes in the real on-disk format."""

import pickle
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import loaders  # noqa: E402
import shapes  # noqa: E402


def _normalized(points: np.ndarray) -> np.ndarray:
    p = points - points.mean(1, keepdims=True)
    return p / np.linalg.norm(p, axis=2).max(1)[:, None, None]


# -- ModelNet40, HDF5 -----------------------------------------------------------------------------
def _write_h5(path: Path, data: np.ndarray, label: np.ndarray) -> None:
    with h5py.File(path, "w") as h:
        h.create_dataset("data", data=data)
        h.create_dataset("label", data=label)


def test_modelnet40_h5(tmp_path):
    rng = np.random.default_rng(0)
    train0, train1 = rng.normal(size=(3, 40, 3)), rng.normal(size=(2, 40, 3))
    _write_h5(tmp_path / "ply_data_train0.h5", train0.astype(np.float32), np.array([[0], [2], [1]], np.uint8))
    _write_h5(tmp_path / "ply_data_train1.h5", train1.astype(np.float32), np.array([[1], [1]], np.uint8))
    _write_h5(tmp_path / "ply_data_test0.h5", train1.astype(np.float32), np.array([[2], [0]], np.uint8))
    (tmp_path / "shape_names.txt").write_text("airplane\nbathtub\nbed\n")
    x, y, names = loaders.load_modelnet40_h5(tmp_path, "train", num_points=32)
    assert x.shape == (5, 32, 3) and x.dtype == torch.float32
    assert y.tolist() == [0, 2, 1, 1, 1]
    assert names == ["airplane", "bathtub", "bed"]
    expected = _normalized(np.concatenate([train0, train1])[:, :32])
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-6)
    xt, yt, _ = loaders.load_modelnet40_h5(tmp_path, "test", num_points=40)
    assert xt.shape == (2, 40, 3) and yt.tolist() == [2, 0]


def test_modelnet40_h5_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loaders.load_modelnet40_h5(tmp_path / "missing", "train")
    with pytest.raises(ValueError, match=r"ply_data_train\*\.h5"):
        loaders.load_modelnet40_h5(tmp_path, "train")
    _write_h5(tmp_path / "ply_data_train0.h5", np.zeros((2, 16, 3), np.float32), np.zeros((2, 1), np.uint8))
    with pytest.raises(ValueError, match="16 points"):
        loaders.load_modelnet40_h5(tmp_path, "train", num_points=32)
    with h5py.File(tmp_path / "ply_data_train0.h5", "w") as h:
        h.create_dataset("points", data=np.zeros((2, 16, 3)))
    with pytest.raises(ValueError, match="'data' and 'label'"):
        loaders.load_modelnet40_h5(tmp_path, "train", num_points=8)


# -- ModelNet40, text files -----------------------------------------------------------------------
def _write_txt_dataset(root: Path, clouds: dict[str, np.ndarray]) -> None:
    classes = sorted({k.rsplit("_", 1)[0] for k in clouds})
    (root / "modelnet40_shape_names.txt").write_text("\n".join(classes) + "\n")
    (root / "modelnet40_train.txt").write_text("\n".join(clouds) + "\n")
    (root / "modelnet40_test.txt").write_text(next(iter(clouds)) + "\n")
    for shape_id, pts in clouds.items():
        folder = root / shape_id.rsplit("_", 1)[0]
        folder.mkdir(exist_ok=True)
        normals = np.zeros_like(pts)
        lines = [",".join(f"{v:.6f}" for v in row) for row in np.concatenate([pts, normals], 1)]
        (folder / f"{shape_id}.txt").write_text("\n".join(lines) + "\n")


def test_modelnet40_txt(tmp_path):
    rng = np.random.default_rng(1)
    clouds = {"night_stand_0001": rng.normal(size=(20, 3)), "chair_0007": rng.normal(size=(20, 3))}
    _write_txt_dataset(tmp_path, clouds)
    x, y, names = loaders.load_modelnet40_txt(tmp_path, "train", num_points=12)
    assert names == ["chair", "night_stand"]
    assert y.tolist() == [1, 0]
    expected = _normalized(np.stack([c[:12] for c in clouds.values()]))
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert loaders.load_modelnet40_txt(tmp_path, "test", num_points=12)[0].shape == (1, 12, 3)
    with pytest.raises(ValueError, match="20 lines|expected 30 lines"):
        loaders.load_modelnet40_txt(tmp_path, "train", num_points=30)
    (tmp_path / "chair" / "chair_0007.txt").unlink()
    with pytest.raises(ValueError, match="chair_0007.txt' is missing"):
        loaders.load_modelnet40_txt(tmp_path, "train", num_points=12)
    (tmp_path / "modelnet40_shape_names.txt").unlink()
    with pytest.raises(ValueError, match="modelnet40_shape_names.txt' is missing"):
        loaders.load_modelnet40_txt(tmp_path, "train")


# -- CIFAR-10 ---------------------------------------------------------------------------------------
def _write_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    with open(path, "wb") as fh:
        pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels, b"filenames": []}, fh)


def test_cifar10(tmp_path):
    rng = np.random.default_rng(2)
    d1, d2, dt = (rng.integers(0, 256, (n, 3072), dtype=np.uint8) for n in (3, 2, 4))
    _write_batch(tmp_path / "data_batch_1", d1, [1, 2, 3])
    _write_batch(tmp_path / "data_batch_2", d2, [9, 0])
    _write_batch(tmp_path / "test_batch", dt, [5, 5, 6, 7])
    names = [f"class{i}".encode() for i in range(10)]
    with open(tmp_path / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, fh)
    x, y, classes = loaders.load_cifar10(tmp_path, "train")
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [1, 2, 3, 9, 0] and classes[9] == "class9"
    # the row layout of the release: 1024 red, then green, then blue values, row-major
    assert int(x[3, 1, 2, 5]) == int(d2[0, 1024 + 2 * 32 + 5])
    assert int(x[0, 2, 31, 31]) == int(d1[0, 3071])
    xt, yt, _ = loaders.load_cifar10(tmp_path, "test")
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == [5, 5, 6, 7]


def test_cifar10_errors(tmp_path):
    with pytest.raises(ValueError, match="data_batch_1"):
        loaders.load_cifar10(tmp_path, "train")
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10 pickle"):
        loaders.load_cifar10(tmp_path, "test")
    _write_batch(tmp_path / "test_batch", np.zeros((2, 100), np.uint8), [0, 1])
    with pytest.raises(ValueError, match="3072"):
        loaders.load_cifar10(tmp_path, "test")


# -- image folder -----------------------------------------------------------------------------------
def test_image_folder(tmp_path):
    from PIL import Image

    colours = {"n02086240": (255, 0, 0), "n02087394": (0, 0, 255)}
    for split in ("train", "val"):
        for cls, rgb in colours.items():
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (30, 12), rgb).save(tmp_path / split / cls / "a.JPEG", quality=95)
            Image.new("L", (12, 12), 128).save(tmp_path / split / cls / "b.png")
    (tmp_path / "train" / "n02086240" / "notes.txt").write_text("ignored")
    x, y, classes = loaders.load_image_folder(tmp_path, "train", size=8)
    assert classes == sorted(colours)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.uint8
    assert y.tolist() == [0, 0, 1, 1]
    red, grey, blue = x[0].float().mean((1, 2)), x[1].float(), x[2].float().mean((1, 2))
    assert red[0] > 240 and red[2] < 15 and blue[2] > 240 and blue[0] < 15
    assert torch.all(grey == 128)
    assert loaders.load_image_folder(tmp_path, "val", size=8)[0].shape == (4, 3, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir is required"):
        loaders.load_image_folder(None, "train")
    with pytest.raises(ValueError, match="no val or test folder"):
        loaders.load_image_folder(tmp_path, "val")
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable image"):
        loaders.load_image_folder(tmp_path, "train")


# -- transforms -------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(pad=st.integers(0, 3), flip=st.booleans(), seed=st.integers(0, 2**16))
def test_random_crop_flip_is_a_window_of_the_padded_image(pad, flip, seed):
    x = torch.arange(2 * 2 * 5 * 6, dtype=torch.float32).reshape(2, 2, 5, 6) + 1
    out = loaders.random_crop_flip(x, pad, flip, torch.Generator().manual_seed(seed))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for k in range(2):
        windows = [
            w for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
            for w in (padded[k, :, dy:dy + 5, dx:dx + 6],) + ((padded[k, :, dy:dy + 5, dx:dx + 6].flip(-1),) if flip else ())
        ]  # fmt: skip
        assert any(torch.equal(out[k], w) for w in windows)
    assert torch.equal(x, torch.arange(120, dtype=torch.float32).reshape(2, 2, 5, 6) + 1)


def test_standardize_uses_train_statistics():
    train = torch.rand(50, 3, 4, 4) * torch.tensor([1.0, 5.0, 10.0])[:, None, None]
    test = train[:5] + 1
    st_train, st_test = loaders.standardize(train, test)
    torch.testing.assert_close(st_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(st_train.std((0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(st_test - st_train[:5], 1 / train.std((0, 2, 3))[:, None, None].expand(5, 3, 4, 4))


# -- embedded shapes --------------------------------------------------------------------------------
def test_shapes_are_deterministic_and_index_addressed():
    a, ya = shapes.make_dataset("train", 2, seed=3, num_points=64)
    b, yb = shapes.make_dataset("train", 1, seed=3, num_points=64)
    c, _ = shapes.make_dataset("train", 1, seed=4, num_points=64)
    t, _ = shapes.make_dataset("test", 1, seed=3, num_points=64)
    assert len(shapes.CLASSES) >= 10
    assert a.shape == (2 * len(shapes.CLASSES), 64, 3) and ya.tolist() == 2 * list(range(len(shapes.CLASSES)))
    assert torch.equal(a[: len(yb)], b) and torch.equal(ya[: len(yb)], yb)
    assert not torch.equal(b, c) and not torch.equal(b, t)
    norms = a.norm(dim=-1).amax(1)
    assert torch.all(norms <= 1.0 + 1e-6) and torch.all(norms >= 0.7 - 1e-6)
    torch.testing.assert_close(a.mean(1), torch.zeros(len(ya), 3), atol=1e-6, rtol=0)


def test_shape_classes_differ():
    """A class is not a relabelled copy of another: the mean distance of the points to the
    centroid (a rotation-invariant statistic) separates most pairs of classes on average."""
    x, y = shapes.make_dataset("train", 20, seed=0, num_points=256)
    stat = torch.stack([(x[y == k].norm(dim=-1) / x[y == k].norm(dim=-1).amax(1, keepdim=True)).std(1).mean()
                        for k in range(len(shapes.CLASSES))])
    assert len(set(torch.round(stat, decimals=2).tolist())) >= len(shapes.CLASSES) // 2


@settings(max_examples=30, deadline=None)
@given(rate=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_add_outliers_replaces_a_fraction_with_points_in_the_ball(rate, seed):
    x = torch.full((3, 50, 3), 5.0)
    before = x.clone()
    out = shapes.add_outliers(x, rate, torch.Generator().manual_seed(seed))
    assert torch.equal(x, before)
    replaced = (out != 5.0).any(-1)
    assert replaced.sum(1).tolist() == [int(round(rate * 50))] * 3
    assert torch.all(out[replaced].norm(dim=-1) <= 1.0 + 1e-6)
    assert torch.all(out[~replaced] == 5.0)


def test_add_outliers_rejects_bad_rate():
    with pytest.raises(ValueError, match="rate=1.5"):
        shapes.add_outliers(torch.zeros(1, 4, 3), 1.5)


def test_uniform_ball_radius_distribution():
    """``P(|p| ≤ s) = s³`` for points uniform in the unit ball."""
    p = shapes.uniform_ball((20000,), torch.Generator().manual_seed(0))
    r = p.norm(dim=-1)
    for s in (0.3, 0.6, 0.9):
        assert abs(float((r <= s).float().mean()) - s**3) < 0.015


# -- the harder digits of the image study ---------------------------------------------------------
@pytest.mark.parametrize("occlusion", [0, 1, 3, 8])
def test_corrupt_images_occludes_one_square_per_image(occlusion):
    x = torch.arange(5 * 64, dtype=torch.float32).reshape(5, 1, 8, 8) % 17
    before = x.clone()
    out = loaders.corrupt_images(x, 0.0, occlusion, torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, before)  # input untouched
    assert out.shape == x.shape
    assert float(out.min()) >= float(x.min()) and float(out.max()) <= float(x.max())
    changed = out != x
    for k in range(5):  # the changed pixels lie inside one occlusion × occlusion window
        rows, cols = changed[k, 0].nonzero(as_tuple=True)
        if len(rows):
            assert int(rows.max() - rows.min()) < occlusion and int(cols.max() - cols.min()) < occlusion
    # a uniform fill changes almost every pixel of the square; none outside it
    assert occlusion * occlusion * 5 * 0.8 <= int(changed.sum()) <= occlusion * occlusion * 5


def test_corrupt_images_noise_level_and_determinism():
    x = torch.zeros(200, 1, 8, 8)
    x[:, :, 0, 0] = 16.0  # value range 0..16
    a = loaders.corrupt_images(x, 0.25, 0, torch.Generator().manual_seed(0))
    b = loaders.corrupt_images(x, 0.25, 0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert float((a - x).std()) == pytest.approx(0.25 * 16, rel=0.03)


@pytest.mark.parametrize("noise,occlusion,match", [(-0.1, 2, "noise=-0.1"), (0.1, 9, "occlusion=9"), (0.1, -1, "occlusion=-1")])
def test_corrupt_images_rejects_bad_arguments(noise, occlusion, match):
    with pytest.raises(ValueError, match=match):
        loaders.corrupt_images(torch.zeros(2, 1, 8, 8), noise, occlusion, torch.Generator())
