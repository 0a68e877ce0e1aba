"""Readers for local copies of the real data sets (no downloads) and the small transforms the
studies need.

* ModelNet40, HDF5 release (``modelnet40_ply_hdf5_2048``): ``ply_data_{train,test}*.h5`` files,
  each with ``data`` ``(n, 2048, 3)`` and ``label`` ``(n, 1)``; optional ``shape_names.txt``.
* ModelNet40, per-shape text files (``modelnet40_normal_resampled``): ``modelnet40_shape_names.txt``,
  ``modelnet40_{train,test}.txt`` listing ids such as ``airplane_0001``, and
  ``<class>/<id>.txt`` with one ``x,y,z[,nx,ny,nz]`` line per point.
* CIFAR-10, python pickle batches (``cifar-10-batches-py``): ``data_batch_1`` … ``data_batch_5`` and
  ``test_batch``, each a pickled dict with ``b"data"`` ``(n, 3072)`` uint8 and ``b"labels"``;
  optional ``batches.meta`` with ``b"label_names"``.
* An image folder (e.g. Imagewoof): ``<split>/<class>/<image>`` with ``split`` ``train`` and
  ``val`` (or ``test``); images are resized (shorter side) and centre-cropped to ``size``.

Every reader returns ``(inputs, labels, class_names)``; point clouds as float32 ``(n, p, 3)``
centred and scaled into the unit ball, images as uint8 ``(n, 3, H, W)``. A missing directory
raises :class:`FileNotFoundError`, a malformed one :class:`ValueError`, both naming the path and
the expected layout.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "load_modelnet40_h5",
    "load_modelnet40_txt",
    "load_cifar10",
    "load_image_folder",
    "normalize_clouds",
    "standardize",
    "random_crop_flip",
    "corrupt_images",
]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm"}


def _require_dir(path: Path | str | None, what: str, layout: str) -> Path:
    if path is None:
        raise FileNotFoundError(f"--data-dir is required for {what}: expected {layout}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {str(path)!r} does not exist: expected {what}, {layout}")
    return path


def normalize_clouds(points: Tensor) -> Tensor:
    """Centre each cloud ``(n, p, 3)`` at its centroid and scale it into the unit ball."""
    points = points - points.mean(1, keepdim=True)
    return points / points.norm(dim=-1).amax(1).clamp_min(1e-12)[:, None, None]


def load_modelnet40_h5(root, split: str, num_points: int = 1024) -> tuple[Tensor, Tensor, list[str]]:
    """ModelNet40 from the HDF5 release; the first ``num_points`` points of each cloud."""
    import h5py

    layout = "the HDF5 release: ply_data_train*.h5 / ply_data_test*.h5 with 'data' and 'label'"
    root = _require_dir(root, "ModelNet40 (HDF5)", layout)
    files = sorted(root.glob(f"ply_data_{split}*.h5"))
    if not files:
        raise ValueError(f"no ply_data_{split}*.h5 in {str(root)!r}: expected {layout}")
    data, labels = [], []
    for f in files:
        try:
            h = h5py.File(f, "r")
        except OSError as exc:
            raise ValueError(f"{str(f)!r} is not a readable HDF5 file: {exc}") from exc
        with h:
            if "data" not in h or "label" not in h:
                raise ValueError(f"{str(f)!r} has datasets {list(h)}: expected 'data' and 'label'")
            x, y = np.asarray(h["data"]), np.asarray(h["label"]).reshape(-1)
        if x.ndim != 3 or x.shape[2] != 3 or len(x) != len(y):
            raise ValueError(f"{str(f)!r}: data {x.shape}, label {y.shape}: expected (n, p, 3), (n, 1)")
        if x.shape[1] < num_points:
            raise ValueError(f"{str(f)!r} has {x.shape[1]} points per shape, fewer than {num_points}")
        data.append(x[:, :num_points].astype(np.float32))
        labels.append(y.astype(np.int64))
    names_file = root / "shape_names.txt"
    labels_t = torch.from_numpy(np.concatenate(labels))
    names = (
        names_file.read_text().split()
        if names_file.exists()
        else [str(i) for i in range(int(labels_t.max()) + 1)]
    )
    return normalize_clouds(torch.from_numpy(np.concatenate(data))), labels_t, names


def load_modelnet40_txt(root, split: str, num_points: int = 1024) -> tuple[Tensor, Tensor, list[str]]:
    """ModelNet40 from per-shape text files; the first ``num_points`` points of each shape."""
    layout = "modelnet40_shape_names.txt, modelnet40_{train,test}.txt and <class>/<id>.txt files"
    root = _require_dir(root, "ModelNet40 (text files)", layout)
    names_file, list_file = root / "modelnet40_shape_names.txt", root / f"modelnet40_{split}.txt"
    for f in (names_file, list_file):
        if not f.exists():
            raise ValueError(f"{str(f)!r} is missing: expected {layout}")
    names = names_file.read_text().split()
    index = {n: i for i, n in enumerate(names)}
    clouds, labels = [], []
    for shape_id in list_file.read_text().split():
        cls = shape_id.rsplit("_", 1)[0]
        if cls not in index:
            raise ValueError(f"{shape_id!r} in {str(list_file)!r}: class {cls!r} not in {str(names_file)!r}")
        f = root / cls / f"{shape_id}.txt"
        if not f.exists():
            raise ValueError(f"{str(f)!r} is missing: listed in {str(list_file)!r}")
        pts = np.loadtxt(f, delimiter=",", max_rows=num_points, ndmin=2)
        if pts.shape[0] < num_points or pts.shape[1] < 3:
            raise ValueError(f"{str(f)!r}: {pts.shape} values: expected {num_points} lines 'x,y,z[,...]'")
        clouds.append(pts[:, :3].astype(np.float32))
        labels.append(index[cls])
    if not clouds:
        raise ValueError(f"{str(list_file)!r} lists no shapes")
    return normalize_clouds(torch.from_numpy(np.stack(clouds))), torch.tensor(labels), names


def load_cifar10(root, split: str) -> tuple[Tensor, Tensor, list[str]]:
    """CIFAR-10 from the python pickle batches; images uint8 ``(n, 3, 32, 32)``."""
    layout = "the python release: data_batch_1..5 and test_batch pickles"
    root = _require_dir(root, "CIFAR-10", layout)
    names = ["data_batch_%d" % i for i in range(1, 6)] if split == "train" else ["test_batch"]
    files = [root / n for n in names if (root / n).exists()]
    if not files:
        raise ValueError(f"no {' / '.join(names)} in {str(root)!r}: expected {layout}")
    images, labels = [], []
    for f in files:
        with open(f, "rb") as fh:
            try:
                batch = pickle.load(fh, encoding="bytes")
            except Exception as exc:  # any unpickling failure means a malformed file
                raise ValueError(f"{str(f)!r} is not a CIFAR-10 pickle batch: {exc}") from exc
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise ValueError(f"{str(f)!r}: expected a dict with b'data' and b'labels'")
        x = np.asarray(batch[b"data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(batch[b"labels"]):
            raise ValueError(f"{str(f)!r}: data {x.shape}: expected (n, 3072) and n labels")
        images.append(x.reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    meta = root / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as fh:
            classes = [n.decode() for n in pickle.load(fh, encoding="bytes")[b"label_names"]]
    else:
        classes = [str(i) for i in range(10)]
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64), classes


def load_image_folder(root, split: str, size: int = 64) -> tuple[Tensor, Tensor, list[str]]:
    """Images under ``root/<split>/<class>/``, resized and centre-cropped to ``size``."""
    from PIL import Image

    layout = "<split>/<class>/<image> with split 'train' and 'val' (or 'test')"
    root = _require_dir(root, "an image folder", layout)
    candidates = ["train"] if split == "train" else ["val", "test"]
    base = next((root / c for c in candidates if (root / c).is_dir()), None)
    if base is None:
        raise ValueError(f"no {' or '.join(candidates)} folder in {str(root)!r}: expected {layout}")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    images, labels = [], []
    for k, cls in enumerate(classes):
        for f in sorted((base / cls).iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                img = Image.open(f).convert("RGB")
            except OSError as exc:
                raise ValueError(f"{str(f)!r} is not a readable image: {exc}") from exc
            w, h = img.size
            s = size / min(w, h)
            img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
            labels.append(k)
    if not images:
        raise ValueError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {str(base)!r}")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), classes


def standardize(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Float images with the per-channel mean and std of ``train`` (``(n, C, H, W)``)."""
    train = train.float()
    mean = train.mean((0, 2, 3), keepdim=True)
    std = train.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return tuple((x.float() - mean) / std for x in (train, *others))


def random_crop_flip(x: Tensor, pad: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random translation by up to ``pad`` pixels (zero padding) and, if ``flip``, random
    horizontal flips; ``x (n, C, H, W)``, a new tensor."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        out[mirror] = out[mirror].flip(-1)
    return out


def corrupt_images(x: Tensor, noise: float, occlusion: int, generator: torch.Generator) -> Tensor:
    """A harder copy of images ``x (n, C, H, W)`` (float, any range): a square of side
    ``occlusion`` pixels at a uniformly random position of each image is filled with uniform
    noise over the image's value range, then Gaussian noise of standard deviation
    ``noise × (max − min)`` of the whole batch is added everywhere. Pure function of ``x`` and the
    generator's state; ``x`` is not modified."""
    if noise < 0:
        raise ValueError(f"noise={noise}: expected a non-negative standard deviation (fraction of the value range)")
    n, c, h, w = x.shape
    if not 0 <= occlusion <= min(h, w):
        raise ValueError(f"occlusion={occlusion}: expected a square side in [0, {min(h, w)}]")
    x = x.float()
    lo, hi = float(x.min()), float(x.max())
    out = x.clone()
    if occlusion:
        top = torch.randint(0, h - occlusion + 1, (n,), generator=generator)
        left = torch.randint(0, w - occlusion + 1, (n,), generator=generator)
        rows = torch.arange(h)[None, :, None]
        cols = torch.arange(w)[None, None, :]
        inside = ((rows >= top[:, None, None]) & (rows < (top + occlusion)[:, None, None])
                  & (cols >= left[:, None, None]) & (cols < (left + occlusion)[:, None, None]))
        fill = lo + (hi - lo) * torch.rand(n, c, h, w, generator=generator)
        out = torch.where(inside[:, None], fill, out)
    if noise:
        out = out + noise * (hi - lo) * torch.randn(n, c, h, w, generator=generator)
    return out
