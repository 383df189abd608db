"""Dataset readers and batching helpers for the ds_hylo examples and benchmarks.

Only torch and numpy are used (no torchvision). Every loader returns the 4-tuple
``(train_x, train_y, test_x, test_y)`` with float32 inputs and int64 labels.
"""

from __future__ import annotations

import gzip
import os
import random
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch.bin",)
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32

# idx magic numbers: two zero bytes, type code 0x08 (unsigned byte), number of dims.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


# --------------------------------------------------------------------------- MNIST


def _read_maybe_gz(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as fh:
            return fh.read()
    return path.read_bytes()


NO_MNIST_HINT = ("--data-dir must name the folder holding the four MNIST idx files (train-images-idx3-ubyte, "
                 "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, plain or .gz); "
                 "without --data-dir the examples run MNIST-1D, generated locally, which needs no files")


def _find_idx_file(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    where = f"in {data_dir}" if data_dir.is_dir() else f"at {data_dir} (no such folder)"
    raise FileNotFoundError(f"MNIST file {name}[.gz] not found {where}. {NO_MNIST_HINT}")


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Read one idx file (optionally gzipped) into a uint8 array.

    Returns shape (N,) for label files (magic 0x801) and (N, rows, cols) for
    image files (magic 0x803). Raises ValueError naming the file when the magic
    number or the payload size does not match the header.
    """
    path = Path(path)
    raw = _read_maybe_gz(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an idx file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path}: bad idx magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated idx header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected_len = header_len + int(np.prod(dims))
    if len(raw) != expected_len:
        raise ValueError(
            f"{path}: size mismatch, header {dims} implies {expected_len} bytes, file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _mnist_split(data_dir: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(_find_idx_file(data_dir, f"{prefix}-images-idx3-ubyte"), _IDX_IMAGES_MAGIC)
    labels = read_idx(_find_idx_file(data_dir, f"{prefix}-labels-idx1-ubyte"), _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST {prefix}: {images.shape[0]} images but {labels.shape[0]} labels in {data_dir}"
        )
    x = torch.from_numpy(images.astype(np.float32))
    x = (x / 255.0 - MNIST_MEAN) / MNIST_STD
    y = torch.from_numpy(labels.astype(np.int64))
    return x.unsqueeze(1), y


def load_mnist(data_dir: str | os.PathLike) -> Split:
    """Load MNIST from the standard idx files (plain or ``.gz``) in ``data_dir``.

    Returns ``(train_x, train_y, test_x, test_y)``:
    train_x float32 (60000, 1, 28, 28) normalised with mean 0.1307 / std 0.3081,
    train_y int64 (60000,) in [0, 9]; test_x / test_y likewise with N=10000.
    """
    data_dir = Path(data_dir)
    train_x, train_y = _mnist_split(data_dir, "train")
    test_x, test_y = _mnist_split(data_dir, "t10k")
    return train_x, train_y, test_x, test_y


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array of shape (N,) or (N, rows, cols) as an idx file.

    The file is gzipped when ``path`` ends in ``.gz``. Used by tests.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


# ------------------------------------------------------------------------ MNIST-1D


def load_mnist1d(seed: int = 0, num_samples: int = 5000, train_split: float = 0.8) -> Split:
    """Generate the MNIST-1D dataset locally with the ``mnist1d`` package.

    Nothing is downloaded. Returns ``(train_x, train_y, test_x, test_y)``:
    float32 inputs of shape (N, 40) and int64 labels of shape (N,) in [0, 9];
    the train split holds ``int(num_samples * train_split)`` samples.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    args.train_split = train_split
    # make_dataset reseeds the global python/numpy RNGs; keep the caller's streams intact.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def to_x(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    def to_y(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.int64))

    return to_x(ds["x"]), to_y(ds["y"]), to_x(ds["x_test"]), to_y(ds["y_test"])


# ------------------------------------------------------------------------ CIFAR-10


def _cifar_dir(data_dir: Path) -> Path | None:
    """Return the folder holding the CIFAR-10 .bin files, or None if incomplete."""
    needed = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES
    for candidate in (data_dir, data_dir / CIFAR10_DIRNAME):
        if all((candidate / name).is_file() for name in needed):
            return candidate
    return None


def download_cifar10(data_dir: str | os.PathLike, url: str = CIFAR10_URL) -> Path:
    """Download and extract the CIFAR-10 binary release into ``data_dir``.

    Returns the path of the extracted ``cifar-10-batches-bin`` folder.
    Raises RuntimeError with a readable message when the download fails.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".tar.gz", dir=data_dir)
    os.close(fd)
    try:
        try:
            urllib.request.urlretrieve(url, tmp_name)
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(
                f"could not download CIFAR-10 from {url} ({exc}); are you offline? "
                f"Place the extracted '{CIFAR10_DIRNAME}' folder in {data_dir} instead."
            ) from exc
        with tarfile.open(tmp_name, "r:gz") as tar:
            # filter='data' rejects absolute paths, '..' escapes, links outside and devices.
            tar.extractall(data_dir, filter="data")
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return data_dir / CIFAR10_DIRNAME


def read_cifar10_records(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch file.

    Returns images uint8 (N, 3, 32, 32) and labels int64 (N,).
    Raises ValueError naming the file when its size is not a whole number of records.
    """
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD_BYTES:
        raise ValueError(
            f"{path}: size {raw.size} is not a positive multiple of {CIFAR10_RECORD_BYTES}"
        )
    records = raw.reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"{path}: label {labels.max()} out of range 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    return images, labels


def write_cifar10_records(
    path: str | os.PathLike, images_uint8: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray | torch.Tensor
) -> None:
    """Write images uint8 (N, 3, 32, 32) and labels (N,) in the CIFAR-10 binary layout.

    Each record is 1 label byte followed by 3072 bytes of CHW pixels. Used by tests.
    """
    images = np.asarray(images_uint8, dtype=np.uint8).reshape(-1, 3 * 32 * 32)
    labels_arr = np.asarray(labels, dtype=np.uint8).reshape(-1, 1)
    if images.shape[0] != labels_arr.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels_arr.shape[0]} labels")
    np.concatenate([labels_arr, images], axis=1).tofile(Path(path))


def normalize_cifar10(images_uint8: torch.Tensor) -> torch.Tensor:
    """Map uint8 (N, 3, 32, 32) pixels to float32 normalised by CIFAR10_MEAN / CIFAR10_STD."""
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (images_uint8.to(torch.float32) / 255.0 - mean) / std


def _cifar_split(folder: Path, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_cifar10_records(folder / name) for name in names]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return normalize_cifar10(images), labels


def load_cifar10(data_dir: str | os.PathLike, download: bool = False) -> Split:
    """Load the CIFAR-10 binary release.

    ``data_dir`` may contain ``data_batch_1..5.bin`` and ``test_batch.bin`` directly
    or a ``cifar-10-batches-bin`` folder holding them. With ``download=True`` missing
    files are fetched from CIFAR10_URL. Returns ``(train_x, train_y, test_x, test_y)``:
    float32 (N, 3, 32, 32) normalised per channel and int64 (N,) labels
    (N = 50000 / 10000 for the real data).
    """
    data_dir = Path(data_dir)
    folder = _cifar_dir(data_dir)
    if folder is None and download:
        download_cifar10(data_dir)
        folder = _cifar_dir(data_dir)
    if folder is None:
        raise FileNotFoundError(
            f"CIFAR-10 binary files ({', '.join(CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES)}) "
            f"not found in {data_dir} or {data_dir / CIFAR10_DIRNAME}; "
            "pass download=True to fetch them"
        )
    train_x, train_y = _cifar_split(folder, CIFAR10_TRAIN_FILES)
    test_x, test_y = _cifar_split(folder, CIFAR10_TEST_FILES)
    return train_x, train_y, test_x, test_y


def augment_cifar(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding plus random horizontal flip, per sample.

    ``images`` is (N, C, H, W) (any float dtype/device); returns a new tensor of the
    same shape. Padding with zeros in normalised space pads with the mean colour.
    Random numbers come from ``generator`` so runs are reproducible.
    """
    n, c, h, w = images.shape
    gen_device = generator.device
    off_y = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device)
    off_x = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device)
    flip = torch.rand(n, generator=generator, device=gen_device) < 0.5
    off_y, off_x, flip = (t.to(images.device) for t in (off_y, off_x, flip))

    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = off_y[:, None] + ar_h  # (N, H)
    # A flipped crop reads its columns right to left.
    cols = off_x[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (N, W)
    batch_idx = torch.arange(n, device=images.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


# ------------------------------------------------------------------------ batching


class TensorBatches:
    """Iterate over mini-batches of equally long tensors, reshuffled every epoch.

    Each iteration yields a tuple with one (B, ...) slice per input tensor.
    The permutation comes from a generator seeded with ``seed``, so the sequence of
    epochs is reproducible.
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if not tensors:
            raise ValueError("TensorBatches needs at least one tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError("all tensors must have the same first dimension")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_samples(self) -> int:
        return self.tensors[0].shape[0]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = self.num_samples
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            # Index on the tensor's own device so GPU-resident data stays there.
            yield tuple(t[idx.to(t.device)] for t in self.tensors)


def make_dataloader(
    *tensors: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Build a DataLoader over a TensorDataset (for accelerate / DeepSpeed).

    Batches are tuples of (B, ...) slices of ``tensors``; shuffling uses a
    generator seeded with ``seed``.
    """
    return DataLoader(
        TensorDataset(*tensors),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
