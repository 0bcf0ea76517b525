"""data.py: MNIST's idx files read with numpy (valid, corrupt, truncated), the cache, the offline fail-fast path,
and the real files (when ../shared/data/mnist exists) against tensorflow-datasets' reading of them."""
import gzip
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"


def write_idx(path, magic, dims, body):
    header = np.asarray([magic, *dims], ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + np.asarray(body, np.uint8).tobytes())


def test_read_idx_valid_files(tmp_path):
    images = np.arange(3 * 784).reshape(3, 784) % 256
    write_idx(tmp_path / "x.gz", 2051, (3, 28, 28), images)
    write_idx(tmp_path / "y.gz", 2049, (3,), [7, 0, 9])
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x.gz", "images", 3), images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "y.gz", "labels", 3), [7, 0, 9])


@pytest.mark.parametrize("case, match", [
    ("magic", "not an MNIST images file"), ("count", "not an MNIST images file"),
    ("short", "truncated or padded"), ("long", "truncated or padded"), ("gzip", "cannot read"),
    ("empty", "not an MNIST images file")])
def test_read_idx_bad_files_fail_in_one_line(tmp_path, case, match):
    path = tmp_path / "x.gz"
    body = np.zeros(3 * 784)
    if case == "magic":
        write_idx(path, 2049, (3, 28, 28), body)
    elif case == "count":
        write_idx(path, 2051, (4, 28, 28), body)
    elif case == "short":
        write_idx(path, 2051, (3, 28, 28), body[:-1])
    elif case == "long":
        write_idx(path, 2051, (3, 28, 28), np.zeros(3 * 784 + 5))
    elif case == "gzip":  # a download cut short: the gzip stream ends early
        write_idx(path, 2051, (3, 28, 28), body)
        path.write_bytes(path.read_bytes()[:30])
    else:
        write_idx(path, 2051, (), [])
    with pytest.raises(SystemExit, match=match) as e:
        data.read_idx(path, "images", 3)
    assert len(str(e.value).splitlines()) == 1


def test_missing_files_and_offline_fail_fast_leaving_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    write_idx(tmp_path / "files" / data.MNIST_FILES[0], 2051, (1, 28, 28), np.zeros(784))
    with pytest.raises(SystemExit, match="lacks train-labels-idx1-ubyte.gz, t10k.*--manual-dir"):
        data.mnist(str(tmp_path / "cache"), str(tmp_path / "files"))
    # No files, no cache, no network: the hint at once, before tensorflow-datasets creates any folder.
    monkeypatch.setattr(data, "online", lambda host, timeout=5.0: False)
    monkeypatch.setattr(data, "tfds_arrays", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(SystemExit, match="offline.*--manual-dir"):
        data.mnist(str(tmp_path / "cache"), None)
    assert not (tmp_path / "cache").exists()


def test_offline_run_fails_within_seconds(tmp_path):
    """The real connectivity check, end to end: CI machines have no network, so this is the offline path
    there (on a machine that is online, the download would start: skip)."""
    if data.online(data.TFDS_HOSTS["mnist"], timeout=2.0):
        pytest.skip("online: the download route would run")
    start = time.time()
    proc = subprocess.run([sys.executable, "pmnist.py", "--data-dir", str(tmp_path / "d"), "--tasks", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--manual-dir" in proc.stderr and time.time() - start < 30
    assert not (tmp_path / "d").exists()


def test_cache_is_used_and_a_corrupt_cache_is_one_line(tmp_path, monkeypatch):
    arrays = {"train_x": np.ones((4, 784), np.uint8), "train_y": np.arange(4, dtype=np.int32),
              "test_x": np.zeros((2, 784), np.uint8), "test_y": np.arange(2, dtype=np.int32)}
    data.runner.save_npz(tmp_path / data.MNIST_CACHE, **arrays)
    monkeypatch.setattr(data, "read_mnist_folder", lambda *a, **k: pytest.fail("cache not used"))
    loaded = data.mnist(str(tmp_path), "/nonexistent")
    assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    (tmp_path / data.MNIST_CACHE).write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match="delete it to rebuild"):
        data.mnist(str(tmp_path), None)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="real MNIST files not present at ../shared/data/mnist")
def test_real_files_read_directly_match_tensorflow_datasets(tmp_path):
    direct = data.read_mnist_folder(MNIST_DIR)
    assert direct["train_x"].shape == (60000, 784) and direct["test_x"].shape == (10000, 784)
    assert np.bincount(direct["train_y"]).tolist()[:2] == [5923, 6742]  # MNIST's known class counts
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    via_tfds = data.tfds_arrays("mnist", str(tmp_path), str(MNIST_DIR), ("train", "test"), "")
    for split in ("train", "test"):
        images, labels = via_tfds[split]
        images = images.reshape(len(images), -1)
        # tfds stores the examples in its own order: compare them as sets of (label, image) rows
        key = lambda x, y: np.lexsort(np.column_stack([x, y]).T[::-1])
        a, b = key(direct[f"{split}_x"], direct[f"{split}_y"]), key(images, labels)
        np.testing.assert_array_equal(direct[f"{split}_x"][a], images[b])
        np.testing.assert_array_equal(direct[f"{split}_y"][a], labels[b])


# ------------------------------------------------------------------------------------------------- CIFAR-100
# (the official archives in both formats: tests/test_cifar.py, which writes small ones)
def test_cifar100_offline_without_archive_or_cache_fails_fast_leaving_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "online", lambda host, timeout=5.0: False)
    monkeypatch.setattr(data, "tfds_arrays", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(SystemExit, match="offline.*cifar-100-python.tar.gz.*--manual-dir") as e:
        data.cifar100(str(tmp_path / "cache"), None)
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / "cache").exists()


def test_cifar100_offline_run_fails_within_seconds(tmp_path):
    """cifar.py end to end with nothing cached: one line, exit 1, no folder left (skipped where online)."""
    if data.online(data.CIFAR100_HOST, timeout=2.0):
        pytest.skip("online: the download route would run")
    start = time.time()
    proc = subprocess.run([sys.executable, "cifar.py", "--data-dir", str(tmp_path / "d"), "--tasks", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--manual-dir" in proc.stderr and time.time() - start < 30
    assert not (tmp_path / "d").exists()


def test_cifar100_cache_is_used_and_a_bad_cache_is_one_line(tmp_path, monkeypatch):
    arrays = {"x_train": np.zeros((200, 32, 32, 3), np.uint8), "y_train": np.tile(np.arange(100, dtype=np.int32), 2),
              "x_test": np.ones((100, 32, 32, 3), np.uint8), "y_test": np.arange(100, dtype=np.int32)}
    data.runner.save_npz(tmp_path / data.CIFAR100_CACHE, **arrays)
    monkeypatch.setattr(data, "read_cifar100_archive", lambda *a, **k: pytest.fail("cache not used"))
    loaded = data.cifar100(str(tmp_path), "/nonexistent")
    assert sorted(loaded) == sorted(arrays) and all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    data.runner.save_npz(tmp_path / data.CIFAR100_CACHE, **{**arrays, "y_test": np.zeros(100, np.int32)})
    with pytest.raises(SystemExit, match="same number of test images.*delete it to rebuild"):
        data.cifar100(str(tmp_path), None)
    (tmp_path / data.CIFAR100_CACHE).write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match="delete it to rebuild") as e:
        data.cifar100(str(tmp_path), None)
    assert len(str(e.value).splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# ImageNet 32x32 (the readers on files in the real format: tests/test_imagenet.py)
# ---------------------------------------------------------------------------------------------------------
def test_imagenet32_offline_fails_fast_leaving_nothing_behind(tmp_path, monkeypatch):
    """No files, no cache, no network: the hint at once (naming the zip, the folder and --manual-dir), before
    tensorflow-datasets is asked for anything or any folder is made."""
    monkeypatch.setattr(data, "online", lambda host, timeout=5.0: False)
    monkeypatch.setattr(data, "tfds_batches", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(SystemExit, match=f"offline.*{data.IMAGENET32_ZIP}.*{tmp_path / 'm'}.*--manual-dir") as e:
        data.imagenet32(str(tmp_path / "cache"), str(tmp_path / "m"), 700)
    assert len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "cache").exists() and not (tmp_path / "m").exists()


def test_imagenet32_bad_cache_is_one_line(tmp_path):
    cache = data.imagenet32_cache(tmp_path, 3)
    cache.write_bytes(b"not an npy file")
    with pytest.raises(SystemExit, match="cannot read the ImageNet32 cache.*delete it to rebuild"):
        data.imagenet32(str(tmp_path), None, 3)
    np.save(cache, np.zeros((4, 3, 32, 32), np.uint8))  # no channel axis
    with pytest.raises(SystemExit, match=r"expected uint8 \[classes>=2, 3, 32, 32, 3\]; delete it to rebuild"):
        data.imagenet32(str(tmp_path), None, 3)
