"""Datasets: the scripts' one place for fetching, reading and caching their data.

MNIST: the four canonical idx `.gz` files read with numpy from a folder (`--manual-dir`; no TensorFlow
needed), else downloaded once by tensorflow-datasets. Either way the arrays are cached as one `.npz` under
`--data-dir`, which later runs (and machines without tensorflow-datasets) load directly. Offline with
neither files nor cache, a run stops within seconds with one line saying where to put the files.
"""
import gzip
import os
import socket
import zipfile
from pathlib import Path

import numpy as np

import common

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_CACHE = "pmnist_mnist_cache.npz"
# (magic number, leading dimensions) of each idx file: images 0x0803 = ubyte, 3 dims; labels 0x0801, 1 dim.
_IDX_HEADERS = {"images": (2051, (28, 28)), "labels": (2049, ())}
# Where tensorflow-datasets downloads MNIST from; checked before tfds is called, so that an offline machine
# fails at once instead of after minutes of retries (and leaves no empty download folders behind).
TFDS_HOSTS = {"mnist": "storage.googleapis.com"}


def default_data_dir(data_dir):
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def read_idx(path, kind, count):
    """The array stored in one MNIST idx `.gz` file: images [count, 784] or labels [count], uint8.
    A wrong magic number, size or a truncated / corrupt file stops with one line naming the file."""
    magic, dims = _IDX_HEADERS[kind]
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        common.fail(f"cannot read {path}: {e.__class__.__name__} ({e}); replace it with the canonical MNIST file")
    header_len = 4 * (2 + len(dims))
    header = np.frombuffer(raw[:header_len], ">u4") if len(raw) >= header_len else np.zeros(0, ">u4")
    expected = [magic, count, *dims]
    if header.tolist() != expected:
        common.fail(f"{path} is not an MNIST {kind} file of {count} items (header {header.tolist()}, "
                    f"expected {expected})")
    body = np.frombuffer(raw, np.uint8, offset=header_len)
    size = count * int(np.prod(dims, dtype=int))
    if body.size != size:
        common.fail(f"{path} holds {body.size} bytes of data, expected {size} (truncated or padded file)")
    return body.reshape(count, -1) if dims else body


def read_mnist_folder(folder, hint=""):
    """{train_x [60000, 784] uint8, train_y [60000] int32, test_x [10000, 784], test_y} from the four files."""
    folder = Path(folder).expanduser()
    missing = [f for f in MNIST_FILES if not (folder / f).is_file()]
    if missing:
        common.fail(f"{folder} lacks {', '.join(missing)}. {hint}".strip())
    arrays = {}
    for split, prefix, count in (("train", "train", 60000), ("test", "t10k", 10000)):
        arrays[f"{split}_x"] = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", "images", count)
        arrays[f"{split}_y"] = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", "labels", count).astype(np.int32)
    return arrays


def online(host, timeout=5.0):
    """Whether `host` accepts an HTTPS connection within `timeout` seconds."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def mnist(data_dir=None, manual_dir=None):
    """MNIST arrays (see `read_mnist_folder`): from the cache in `data_dir`, else from the files in
    `manual_dir`, else downloaded by tensorflow-datasets; the arrays are cached in `data_dir` for next time."""
    cache = default_data_dir(data_dir) / MNIST_CACHE
    hint = (f"MNIST not found: put {', '.join(MNIST_FILES)} in one folder and pass --manual-dir FOLDER "
            f"(the arrays are then cached in {cache})")
    if cache.exists():
        try:
            with np.load(cache) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            common.fail(f"cannot use the MNIST cache {cache} ({type(e).__name__}); delete it to rebuild it")
        if sorted(arrays) != ["test_x", "test_y", "train_x", "train_y"]:
            common.fail(f"the MNIST cache {cache} has unexpected contents; delete it to rebuild it")
        return arrays
    if manual_dir is not None:
        arrays = read_mnist_folder(manual_dir, hint)
    else:
        arrays = tfds_mnist(cache.parent, hint)
    cache.parent.mkdir(parents=True, exist_ok=True)
    common.save_npz(cache, **arrays)
    return arrays


def tfds_mnist(data_dir, hint):
    """MNIST downloaded and prepared by tensorflow-datasets (needs the network once)."""
    if not online(TFDS_HOSTS["mnist"]):
        common.fail(f"cannot reach {TFDS_HOSTS['mnist']} to download MNIST (offline?). {hint}")
    arrays = common.tfds_arrays("mnist", str(data_dir), None, ("train", "test"), hint)
    out = {}
    for split in ("train", "test"):
        images, labels = arrays[split]
        out[f"{split}_x"] = images.reshape(len(images), -1).astype(np.uint8)
        out[f"{split}_y"] = labels.astype(np.int32)
    return out


def synthetic_mnist():
    """Fixed random stand-in for MNIST with its shapes and dtypes (20% of pixels at 255, random labels):
    speed and regression tests without a dataset; there is nothing to learn in it."""
    rng = np.random.default_rng(0)
    images = lambda n: ((rng.random((n, 784)) < 0.2) * 255).astype(np.uint8)
    return {"train_x": images(60000), "train_y": rng.integers(0, 10, 60000).astype(np.int32),
            "test_x": images(10000), "test_y": rng.integers(0, 10, 10000).astype(np.int32)}
