"""Tests for examples/data.py and examples/models.py."""

import io
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import data  # noqa: E402
import models  # noqa: E402

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared/data/mnist"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------- MNIST


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST data not present at {MNIST_DIR}")
def test_load_mnist_real_files():
    train_x, train_y, test_x, test_y = data.load_mnist(MNIST_DIR)
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert train_x.dtype == test_x.dtype == torch.float32
    assert train_y.dtype == test_y.dtype == torch.int64
    assert train_y.min() == 0 and train_y.max() == 9
    assert torch.bincount(train_y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test_y).tolist() == MNIST_TEST_COUNTS
    # Normalisation constants are the training-set statistics.
    assert abs(train_x.mean().item()) < 1e-3
    assert abs(train_x.std().item() - 1.0) < 1e-3
    assert train_x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def _write_mnist_pair(folder: Path, prefix: str, images, labels, gz: bool) -> None:
    suffix = ".gz" if gz else ""
    data.write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    data.write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=3, dtype=np.uint8)
    _write_mnist_pair(tmp_path, "train", images, labels, gz)
    _write_mnist_pair(tmp_path, "t10k", test_images, test_labels, gz)

    train_x, train_y, test_x, test_y = data.load_mnist(tmp_path)
    assert train_x.shape == (7, 1, 28, 28) and test_x.shape == (3, 1, 28, 28)
    pixels = torch.round((train_x * data.MNIST_STD + data.MNIST_MEAN) * 255).to(torch.uint8)
    assert torch.equal(pixels[:, 0], torch.from_numpy(images))
    assert torch.equal(train_y, torch.from_numpy(labels.astype(np.int64)))
    test_pixels = torch.round((test_x * data.MNIST_STD + data.MNIST_MEAN) * 255).to(torch.uint8)
    assert torch.equal(test_pixels[:, 0], torch.from_numpy(test_images))
    assert torch.equal(test_y, torch.from_numpy(test_labels.astype(np.int64)))


def test_idx_bad_magic_and_size(tmp_path):
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    labels = np.zeros(2, dtype=np.uint8)
    _write_mnist_pair(tmp_path, "train", images, labels, gz=False)
    _write_mnist_pair(tmp_path, "t10k", images, labels, gz=False)

    bad = tmp_path / "train-labels-idx1-ubyte"
    raw = bytearray(bad.read_bytes())
    raw[3] = 0x03  # label file now claims to be 3-dimensional
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*magic"):
        data.load_mnist(tmp_path)

    _write_mnist_pair(tmp_path, "train", images, labels, gz=False)
    truncated = tmp_path / "t10k-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*size"):
        data.load_mnist(tmp_path)


def test_mnist_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_mnist(tmp_path)


# ------------------------------------------------------------------------ MNIST-1D


def test_load_mnist1d_shapes():
    train_x, train_y, test_x, test_y = data.load_mnist1d(seed=0, num_samples=1000)
    assert train_x.shape == (800, 40) and test_x.shape == (200, 40)
    assert train_y.shape == (800,) and test_y.shape == (200,)
    assert train_x.dtype == test_x.dtype == torch.float32
    assert train_y.dtype == test_y.dtype == torch.int64
    assert set(train_y.tolist()) == set(range(10))
    again = data.load_mnist1d(seed=0, num_samples=1000)
    assert torch.equal(again[0], train_x) and torch.equal(again[1], train_y)


def test_load_mnist1d_preserves_global_rng():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    data.load_mnist1d(seed=0, num_samples=100)
    assert np.random.rand() == expected


# ------------------------------------------------------------------------ CIFAR-10


def _write_fake_cifar(folder: Path, per_file: int = 3, seed: int = 0):
    """Write all six batch files into ``folder``; return the uint8 images/labels written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in data.CIFAR10_TRAIN_FILES + data.CIFAR10_TEST_FILES:
        images = rng.integers(0, 256, size=(per_file, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_file)
        data.write_cifar10_records(folder / name, images, labels)
        written[name] = (images, labels)
    train = [written[n] for n in data.CIFAR10_TRAIN_FILES]
    test = [written[n] for n in data.CIFAR10_TEST_FILES]
    return (
        np.concatenate([t[0] for t in train]),
        np.concatenate([t[1] for t in train]),
        np.concatenate([t[0] for t in test]),
        np.concatenate([t[1] for t in test]),
    )


def _unnormalize_cifar(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    return torch.round((x * std + mean) * 255).to(torch.uint8).numpy()


def _check_cifar(loaded, expected, per_file: int = 3):
    train_x, train_y, test_x, test_y = loaded
    assert train_x.shape == (5 * per_file, 3, 32, 32) and test_x.shape == (per_file, 3, 32, 32)
    assert train_x.dtype == test_x.dtype == torch.float32
    assert train_y.dtype == test_y.dtype == torch.int64
    np.testing.assert_array_equal(_unnormalize_cifar(train_x), expected[0])
    np.testing.assert_array_equal(train_y.numpy(), expected[1])
    np.testing.assert_array_equal(_unnormalize_cifar(test_x), expected[2])
    np.testing.assert_array_equal(test_y.numpy(), expected[3])


def test_cifar10_flat_layout(tmp_path):
    expected = _write_fake_cifar(tmp_path)
    _check_cifar(data.load_cifar10(tmp_path), expected)


def test_cifar10_nested_layout(tmp_path):
    expected = _write_fake_cifar(tmp_path / data.CIFAR10_DIRNAME)
    _check_cifar(data.load_cifar10(tmp_path), expected)


def test_cifar10_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        data.load_cifar10(tmp_path)
    _write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.bin"):
        data.load_cifar10(tmp_path, download=False)


def test_cifar10_bad_record_size(tmp_path):
    _write_fake_cifar(tmp_path)
    bad = tmp_path / "test_batch.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(ValueError, match="test_batch.bin"):
        data.load_cifar10(tmp_path)


def test_cifar10_download_from_local_archive(tmp_path):
    expected = _write_fake_cifar(tmp_path / "src" / data.CIFAR10_DIRNAME)
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / data.CIFAR10_DIRNAME, arcname=data.CIFAR10_DIRNAME)
    dest = tmp_path / "dest"
    folder = data.download_cifar10(dest, url=archive.as_uri())
    assert folder == dest / data.CIFAR10_DIRNAME
    assert not list(dest.glob("*.tar.gz"))  # temporary archive cleaned up
    _check_cifar(data.load_cifar10(dest), expected)


def test_cifar10_download_rejects_path_escape(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(tarfile.TarError):
        data.download_cifar10(tmp_path / "dest", url=archive.as_uri())
    assert not (tmp_path / "escaped.txt").exists()


def test_cifar10_download_offline_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlretrieve", offline)
    with pytest.raises(RuntimeError, match="offline"):
        data.load_cifar10(tmp_path, download=True)


def _reference_augment(images, off_y, off_x, flip, padding):
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    out = torch.empty_like(images)
    h, w = images.shape[-2:]
    for i in range(images.shape[0]):
        crop = padded[i, :, off_y[i] : off_y[i] + h, off_x[i] : off_x[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def test_augment_cifar_matches_reference():
    images = torch.randn(16, 3, 32, 32)
    out = data.augment_cifar(images, torch.Generator().manual_seed(5))
    # Replay the same random draws to build the expected result with plain slicing.
    g = torch.Generator().manual_seed(5)
    off_y = torch.randint(0, 9, (16,), generator=g)
    off_x = torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    assert out.shape == images.shape
    assert torch.equal(out, _reference_augment(images, off_y, off_x, flip, 4))
    assert 0 < int(flip.sum()) < 16


def test_augment_cifar_no_padding_is_flip_or_identity():
    images = torch.randn(32, 3, 32, 32)
    out = data.augment_cifar(images, torch.Generator().manual_seed(0), padding=0)
    for a, b in zip(images, out):
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)


# ------------------------------------------------------------------------ batching


def test_tensor_batches():
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    batches = data.TensorBatches(x, y, batch_size=4, seed=1)
    assert len(batches) == 3
    epoch1 = list(batches)
    assert [b[0].shape[0] for b in epoch1] == [4, 4, 2]
    seen = torch.cat([b[1] for b in epoch1])
    assert sorted(seen.tolist()) == list(range(10))
    for bx, by in epoch1:
        assert torch.equal(bx[:, 0].long(), by)
    epoch2 = torch.cat([b[1] for b in batches])
    assert not torch.equal(seen, epoch2)  # reshuffled each epoch
    replay = torch.cat([b[1] for b in data.TensorBatches(x, y, batch_size=4, seed=1)])
    assert torch.equal(seen, replay)

    assert len(data.TensorBatches(x, batch_size=4, drop_last=True)) == 2
    ordered = torch.cat([b[0] for b in data.TensorBatches(y, batch_size=3, shuffle=False)])
    assert torch.equal(ordered, y)
    with pytest.raises(ValueError):
        data.TensorBatches(x, y[:5], batch_size=2)


def test_make_dataloader():
    x = torch.randn(10, 4)
    y = torch.arange(10)
    loader = data.make_dataloader(x, y, batch_size=4, seed=0)
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert len(loader) == 3
    seen = torch.cat([b[1] for b in loader])
    assert sorted(seen.tolist()) == list(range(10))
    replay = torch.cat([b[1] for b in data.make_dataloader(x, y, batch_size=4, seed=0)])
    assert torch.equal(seen, replay)


# -------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    "name, kwargs, input_shape",
    [
        ("mnist_cnn", {}, (4, 1, 28, 28)),
        ("mlp", {}, (4, 40)),
        ("mlp", {"in_features": 784}, (4, 1, 28, 28)),
        ("resnet32", {}, (4, 3, 32, 32)),
    ],
)
def test_model_forward_shapes(name, kwargs, input_shape):
    torch.manual_seed(0)
    model = models.build_model(name, **kwargs)
    out = model(torch.randn(*input_shape))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet32_structure():
    model = models.resnet32()
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.45e6 < n_params < 0.47e6
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 31  # 1 stem + 3 stages * 5 blocks * 2; plus the fc -> 32 layers
    assert all(c.bias is None for c in convs)
    assert models.resnet32(num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_mlp_custom_hidden():
    model = models.MLP(in_features=8, hidden=(16,), num_classes=3)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(8, 16), (16, 3)]
    assert model(torch.randn(5, 2, 4)).shape == (5, 3)


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="mnist_cnn.*mlp.*resnet32"):
        models.build_model("vgg16")
