"""Datasets: the scripts' one place for fetching, reading and caching their data.

MNIST: the four canonical idx `.gz` files read with numpy from a folder (`--manual-dir`; no TensorFlow
needed), else downloaded once by tensorflow-datasets. Either way the arrays are cached as one `.npz` under
`--data-dir`, which later runs (and machines without tensorflow-datasets) load directly. Offline with
neither files nor cache, a run stops within seconds with one line saying where to put the files.
"""
import gzip
import io
import json
import os
import pickle
import re
import socket
import tarfile
import zipfile
from pathlib import Path

import numpy as np

import runner

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
        runner.fail(f"cannot read {path}: {e.__class__.__name__} ({e}); replace it with the canonical MNIST file")
    header_len = 4 * (2 + len(dims))
    header = np.frombuffer(raw[:header_len], ">u4") if len(raw) >= header_len else np.zeros(0, ">u4")
    expected = [magic, count, *dims]
    if header.tolist() != expected:
        runner.fail(f"{path} is not an MNIST {kind} file of {count} items (header {header.tolist()}, "
                    f"expected {expected})")
    body = np.frombuffer(raw, np.uint8, offset=header_len)
    size = count * int(np.prod(dims, dtype=int))
    if body.size != size:
        runner.fail(f"{path} holds {body.size} bytes of data, expected {size} (truncated or padded file)")
    return body.reshape(count, -1) if dims else body


def read_mnist_folder(folder, hint=""):
    """{train_x [60000, 784] uint8, train_y [60000] int32, test_x [10000, 784], test_y} from the four files."""
    folder = Path(folder).expanduser()
    missing = [f for f in MNIST_FILES if not (folder / f).is_file()]
    if missing:
        runner.fail(f"{folder} lacks {', '.join(missing)}. {hint}".strip())
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


def read_cache(cache, name):
    """{name: array} of a dataset's .npz cache; an unreadable one stops with one line."""
    try:
        with np.load(cache) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        runner.fail(f"cannot use the {name} cache {cache} ({type(e).__name__}); delete it to rebuild it")


def mnist(data_dir=None, manual_dir=None):
    """MNIST arrays (see `read_mnist_folder`): from the cache in `data_dir`, else from the files in
    `manual_dir`, else downloaded by tensorflow-datasets; the arrays are cached in `data_dir` for next time."""
    cache = default_data_dir(data_dir) / MNIST_CACHE
    hint = (f"MNIST not found: put {', '.join(MNIST_FILES)} in one folder and pass --manual-dir FOLDER "
            f"(the arrays are then cached in {cache})")
    if cache.exists():
        arrays = read_cache(cache, "MNIST")
        if sorted(arrays) != ["test_x", "test_y", "train_x", "train_y"]:
            runner.fail(f"the MNIST cache {cache} has unexpected contents; delete it to rebuild it")
        return arrays
    if manual_dir is not None:
        arrays = read_mnist_folder(manual_dir, hint)
    else:
        arrays = tfds_mnist(cache.parent, hint)
    cache.parent.mkdir(parents=True, exist_ok=True)
    runner.save_npz(cache, **arrays)
    return arrays


def tfds_mnist(data_dir, hint):
    """MNIST downloaded and prepared by tensorflow-datasets (needs the network once)."""
    if not online(TFDS_HOSTS["mnist"]):
        runner.fail(f"cannot reach {TFDS_HOSTS['mnist']} to download MNIST (offline?). {hint}")
    arrays = tfds_arrays("mnist", str(data_dir), None, ("train", "test"), hint)
    out = {}
    for split in ("train", "test"):
        images, labels = arrays[split]
        out[f"{split}_x"] = images.reshape(len(images), -1).astype(np.uint8)
        out[f"{split}_y"] = labels.astype(np.int32)
    return out


def tfds_batches(name, data_dir, manual_dir, split, missing_hint, batch_size=10_000):
    """Prepare tfds dataset `name` (offline from `manual_dir` when given) and yield its `split` in tfds's order
    as (images uint8, labels int64) batches. Any failure stops with `missing_hint` on one line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        runner.fail(f"tensorflow-datasets is needed to prepare {name} (pip install -r requirements.txt); "
                    f"{missing_hint}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        config = tfds.download.DownloadConfig(manual_dir=str(manual_dir)) if manual_dir else None
        builder.download_and_prepare(download_config=config)
        for batch in tfds.as_numpy(builder.as_dataset(split=split).batch(batch_size)):
            yield batch["image"], batch["label"].astype(np.int64)
    except Exception as e:  # tfds raises many kinds (network, missing manual files, corrupt archives)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        runner.fail(f"could not prepare {name}: {reason[:200]}. {missing_hint}")


def tfds_arrays(name, data_dir, manual_dir, splits, missing_hint):
    """{split: (images uint8, labels int64)}: whole splits of tfds dataset `name` (see tfds_batches)."""
    arrays = {}
    for split in splits:
        images, labels = zip(*tfds_batches(name, data_dir, manual_dir, split, missing_hint))
        arrays[split] = (np.concatenate(images), np.concatenate(labels))
    return arrays


def synthetic_mnist():
    """Fixed random stand-in for MNIST with its shapes and dtypes (20% of pixels at 255, random labels):
    speed and regression tests without a dataset; there is nothing to learn in it."""
    rng = np.random.default_rng(0)

    def images(n):  # rng.random((n, 784)) < 0.2, drawn in blocks: the same numbers without a 0.4 GB float array
        out, block = np.empty((n, 784), np.uint8), np.empty((5000, 784))
        for start in range(0, n, len(block)):
            drawn = rng.random(out=block[:n - start])
            np.multiply(drawn < 0.2, 255, out=out[start:start + len(drawn)], dtype=np.uint8, casting="unsafe")
        return out

    return {"train_x": images(60000), "train_y": rng.integers(0, 10, 60000).astype(np.int32),
            "test_x": images(10000), "test_y": rng.integers(0, 10, 10000).astype(np.int32)}


# ----------------------------------------------------------------------------------------------------------
# ImageNet 32x32 (imagenet.py): the first images of every class of the official training files, one cache
# ----------------------------------------------------------------------------------------------------------
IMAGENET32_ZIP = "Imagenet32_train_npz.zip"  # image-net.org, "Downsampled ImageNet 32x32"
IMAGENET32_TFDS, IMAGENET32_CLASSES = "imagenet_resized/32x32", 1000  # the same images through tensorflow-datasets
# Where tensorflow-datasets downloads that zip from; checked first, as for MNIST (fail at once when offline).
IMAGENET32_HOST = "www.image-net.org"
IMAGENET32_SHAPE = (32, 32, 3)
_IMAGENET32_BATCH = re.compile(r"(?:^|/)train_data_batch_(\d+)\.npz$")


def imagenet32_cache(data_dir, images_per_class):
    return Path(data_dir) / f"continual_imagenet32_{images_per_class}.npy"


def imagenet32_mean_path(cache):
    """Where the per-channel pixel mean of `cache` is kept (written on first use, removed when it is rebuilt)."""
    return cache.with_name(f"{cache.stem}_mean.json")


def imagenet32(data_dir, manual_dir, images_per_class):
    """The cached uint8 [classes, images_per_class, 32, 32, 3] (HWC, RGB) array, memory-mapped, built if missing:
    from the ImageNet32 training files in `manual_dir` (default `data_dir`) when there are any (the first images
    of every class in file order), else through tensorflow-datasets' imagenet_resized/32x32 prepared in
    `data_dir` (tfds's order: the same classes, other images). No files and offline: one line, at once."""
    path = imagenet32_cache(data_dir, images_per_class)
    if not path.exists():
        manual_dir = Path(manual_dir or data_dir)
        names, read = imagenet32_files(manual_dir)
        if names:
            _imagenet32_build(_imagenet32_chunks(names, read), path, images_per_class, manual_dir)
        else:
            hint = (f"downsampled ImageNet 32x32 not found: put {IMAGENET32_ZIP} (image-net.org, 'Downsampled "
                    f"ImageNet 32x32'; or its extracted train_data_batch_1..10.npz) into {manual_dir} (or pass "
                    f"--manual-dir), or the prepared cache at {path}, or run once with network access so "
                    f"tensorflow-datasets downloads {IMAGENET32_TFDS}")
            if not online(IMAGENET32_HOST):
                runner.fail(f"cannot reach {IMAGENET32_HOST} (offline?); {hint}")
            chunks = tfds_batches(IMAGENET32_TFDS, str(data_dir), None, "train", hint)
            _imagenet32_build(chunks, path, images_per_class, f"tensorflow-datasets {IMAGENET32_TFDS} in {data_dir}",
                              IMAGENET32_CLASSES)
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        runner.fail(f"cannot read the ImageNet32 cache {path} ({type(e).__name__}); delete it to rebuild it")
    if images.dtype != np.uint8 or images.shape[1:] != (images_per_class,) + IMAGENET32_SHAPE or images.shape[0] < 2:
        runner.fail(f"{path} holds {images.dtype} {images.shape}, expected uint8 [classes>=2, {images_per_class}, "
                    f"32, 32, 3]; delete it to rebuild")
    return images


def imagenet32_files(manual_dir):
    """The ImageNet32 training files in `manual_dir`, in batch-number order: a list of names and a function
    name -> (data uint8 [N, 3072] channel-first, labels 1-based). From the zip, else extracted files."""
    manual_dir = Path(manual_dir)
    archive = manual_dir / IMAGENET32_ZIP

    def number(name):
        return int(_IMAGENET32_BATCH.search(name).group(1))

    def parse(raw, name):
        try:
            with np.load(raw) as npz:
                return np.asarray(npz["data"]), np.asarray(npz["labels"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            runner.fail(f"{name} is not an ImageNet32 batch file ({type(e).__name__}: {e})")

    if archive.exists():
        try:
            with zipfile.ZipFile(archive) as zf:
                names = sorted((n for n in zf.namelist() if _IMAGENET32_BATCH.search(n)), key=number)
        except zipfile.BadZipFile:
            runner.fail(f"{archive} is not a valid zip file")

        def read(name):
            with zipfile.ZipFile(archive) as zf:
                return parse(io.BytesIO(zf.read(name)), f"{archive}:{name}")
        return names, read
    names = sorted((str(p) for p in manual_dir.glob("train_data_batch_*.npz") if _IMAGENET32_BATCH.search(str(p))),
                   key=number)
    return names, lambda name: parse(name, name)


def _imagenet32_chunks(names, read):
    """(images uint8 [N, 32, 32, 3] HWC, labels 0-based) of each training file, in batch-number order."""
    for name in names:
        print(f"reading {Path(name).name} ...", flush=True)
        data, labels = read(name)
        labels = labels.astype(np.int64).reshape(-1) - 1
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            runner.fail(f"{name}: expected uint8 data [N, 3072] and N labels, got {data.dtype} {data.shape} "
                        f"and {labels.shape}")
        if len(labels) and labels.min() < 0:
            runner.fail(f"{name}: labels must be 1-based (found {labels.min() + 1})")
        yield data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _imagenet32_build(chunks, path, images_per_class, source, num_classes=None):
    """Keep the first `images_per_class` images of every class, in the order `chunks` yields them
    ((images uint8 [N, 32, 32, 3], labels 0-based) pairs), and save them as one uint8 array
    [classes, images_per_class, 32, 32, 3] (HWC, RGB) at `path`. With `num_classes` known, reading stops as
    soon as every class is full."""
    print(f"building {path} from {source} (once) ...", flush=True)
    imagenet32_mean_path(path).unlink(missing_ok=True)  # it described the old cache
    per_class = {}  # class -> list of [k, 32, 32, 3] chunks, at most images_per_class images in all
    counts = {}
    for images, labels in chunks:
        if images.dtype != np.uint8 or images.shape[1:] != IMAGENET32_SHAPE or labels.shape != images.shape[:1]:
            runner.fail(f"{source}: expected uint8 images [N, 32, 32, 3] and N labels, got {images.dtype} "
                        f"{images.shape} and {labels.shape}")
        order = np.argsort(labels, kind="stable")  # stable: source order within each class
        classes, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
        for c, start, size in zip(classes, starts, sizes):
            take = min(size, images_per_class - counts.get(c, 0))
            if take > 0:
                per_class.setdefault(c, []).append(images[order[start:start + take]])
                counts[c] = counts.get(c, 0) + take
        if num_classes and len(counts) == num_classes and min(counts.values()) == images_per_class:
            break
    if not counts:
        runner.fail(f"{source} holds no training images")
    num_classes = num_classes or int(max(counts)) + 1
    short = [c for c in range(num_classes) if counts.get(c, 0) < images_per_class]
    if short:
        runner.fail(f"ImageNet32 class {short[0] + 1} has {counts.get(short[0], 0)} training images in "
                    f"{source}, {images_per_class} are needed")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                    shape=(num_classes, images_per_class) + IMAGENET32_SHAPE)
    for c in range(num_classes):
        out[c] = np.concatenate(per_class.pop(c))
    out.flush()
    del out
    tmp.replace(path)


def imagenet32_channel_mean(images, data_dir):
    """Per-channel mean (R, G, B) of the pixels, scaled to [0, 1], of every image in the cache `images`
    (uint8 [classes, n, 32, 32, 3], from `imagenet32(data_dir, ...)`): what imagenet.py's `--input-norm center`
    subtracts. Summed class by class (the memory-mapped cache is never loaded whole) and kept beside the
    cache, so only the first run pays for the pass."""
    path = imagenet32_mean_path(imagenet32_cache(data_dir, images.shape[1]))
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("shape") == list(images.shape):
            return tuple(float(v) for v in stored["channel_mean"])
    total = np.zeros(3, np.uint64)
    for c in range(images.shape[0]):
        total += np.asarray(images[c]).reshape(-1, 3).sum(axis=0, dtype=np.uint64)
    mean = total / (255.0 * (images.size // 3))
    runner.save_json(path, {"channel_mean": mean.tolist(), "shape": list(images.shape)})
    return tuple(float(v) for v in mean)


class _RandomClasses:
    """Indexable like the cache (`[class]`, `[[classes]]`), each class's images drawn from its own seed on
    demand: the whole array at the real size would take 2.1 GB."""

    def __init__(self, images_per_class, classes):
        self.shape, self.dtype = (classes, images_per_class) + IMAGENET32_SHAPE, np.dtype(np.uint8)
        self.size = int(np.prod(self.shape))

    def __getitem__(self, index):
        draw = lambda c: np.random.default_rng(int(c)).integers(0, 256, self.shape[1:], np.uint8)
        return draw(index) if np.ndim(index) == 0 else np.stack([draw(c) for c in index])


def synthetic_imagenet32(images_per_class, classes=IMAGENET32_CLASSES):
    """Random uint8 images of the cache's shape [classes, images_per_class, 32, 32, 3] (uniform pixels, so the
    channel mean is 0.5): speed and regression tests without the data set; there is nothing to learn in it."""
    return _RandomClasses(images_per_class, classes)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-100 (cifar.py): the official archive read with numpy, else tensorflow-datasets; one cache either way
# ----------------------------------------------------------------------------------------------------------
CIFAR100_ARCHIVES = ("cifar-100-python.tar.gz", "cifar-100-binary.tar.gz")  # cs.toronto.edu/~kriz
CIFAR100_CACHE = "cifar100.npz"
CIFAR100_CLASSES, CIFAR100_SHAPE = 100, (32, 32, 3)
# Where tensorflow-datasets downloads cifar100 from; checked first, as for MNIST (fail at once when offline).
CIFAR100_HOST = "www.cs.toronto.edu"


def cifar100(data_dir=None, manual_dir=None):
    """{x_train, y_train, x_test, y_test}: uint8 [N, 32, 32, 3] images (HWC, RGB) and int32 fine labels, each
    class equally often. From the cache <data_dir>/cifar100.npz, else from the official archive in `manual_dir`,
    else downloaded by tensorflow-datasets; then cached. No archive, no cache and offline: one line, at once."""
    cache = default_data_dir(data_dir) / CIFAR100_CACHE
    hint = (f"put {CIFAR100_ARCHIVES[0]} (or {CIFAR100_ARCHIVES[1]}) from the CIFAR-100 site in a folder and pass "
            f"it as --manual-dir, or run once with network access so tensorflow-datasets downloads cifar100")
    if cache.exists():
        arrays = read_cache(cache, "CIFAR-100")
        return check_cifar100(arrays, cache, "; delete it to rebuild it")
    if manual_dir is not None:
        arrays = check_cifar100(read_cifar100_archive(manual_dir, hint), Path(manual_dir).expanduser())
    elif not online(CIFAR100_HOST):
        runner.fail(f"cannot reach {CIFAR100_HOST} to download CIFAR-100 (offline?); {hint}")
    else:
        pairs = tfds_arrays("cifar100", str(cache.parent), None, ("train", "test"), hint)
        arrays = check_cifar100({f"{k}_{split}": np.asarray(v, np.uint8 if k == "x" else np.int32)
                                 for split, pair in pairs.items() for k, v in zip(("x", "y"), pair)},
                                "tensorflow-datasets cifar100")
    cache.parent.mkdir(parents=True, exist_ok=True)
    runner.save_npz(cache, **arrays)
    return arrays


def read_cifar100_archive(manual_dir, hint):
    """The arrays of the first official archive found in `manual_dir` (python or binary format)."""
    for name, reader in zip(CIFAR100_ARCHIVES, (_cifar100_python, _cifar100_binary)):
        path = Path(manual_dir).expanduser() / name
        if path.exists():
            try:
                with tarfile.open(path, "r:gz") as tar:
                    return {f"{k}_{split}": v for split in ("train", "test") for k, v in zip("xy", reader(tar, split))}
            except (OSError, KeyError, EOFError, ValueError, tarfile.TarError, pickle.UnpicklingError) as e:
                runner.fail(f"could not read {path}: {type(e).__name__}: {str(e)[:150]}")
    runner.fail(f"CIFAR-100 not found in {manual_dir}: {hint}")


def _cifar100_python(tar, split):
    """cifar-100-python: a pickled dict with b'data' uint8 [N, 3072] (channel-first rows) and b'fine_labels'."""
    with tar.extractfile(f"cifar-100-python/{split}") as f:
        batch = pickle.load(f, encoding="bytes")
    images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch[b"fine_labels"], np.int32)


def _cifar100_binary(tar, split):
    """cifar-100-binary: records of (coarse label byte, fine label byte, 3072 channel-first pixel bytes)."""
    with tar.extractfile(f"cifar-100-binary/{split}.bin") as f:
        records = np.frombuffer(f.read(), np.uint8)
    if records.size % 3074:
        raise ValueError(f"{split}.bin is not a whole number of 3074-byte records")
    records = records.reshape(-1, 3074)
    return records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), records[:, 1].astype(np.int32)


def check_cifar100(arrays, source, hint=""):
    """`arrays`, after stopping with one line unless they hold uint8 [N, 32, 32, 3] images and N labels in 0..99
    per split, every class equally often."""
    if sorted(arrays) != ["x_test", "x_train", "y_test", "y_train"]:
        runner.fail(f"{source}: expected arrays x_train, y_train, x_test, y_test, found {', '.join(sorted(arrays))}"
                    f"{hint}")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape[1:] != CIFAR100_SHAPE or x.dtype != np.uint8 or y.shape != x.shape[:1]:
            runner.fail(f"{source}: {split} images must be uint8 [N, 32, 32, 3] with N labels{hint}")
        if y.size == 0 or y.min() < 0 or y.max() >= CIFAR100_CLASSES:
            runner.fail(f"{source}: {split} labels must lie in 0..99{hint}")
        counts = np.bincount(y, minlength=CIFAR100_CLASSES)
        if counts.min() == 0 or counts.min() != counts.max():
            runner.fail(f"{source}: every one of the 100 classes needs the same number of {split} images "
                        f"(found {counts.min()}..{counts.max()}){hint}")
    return arrays


def synthetic_cifar100():
    """Fixed random stand-in for CIFAR-100 with its shapes, dtypes and class sizes (500 training and 100 test
    images per class): speed tests without the data set; there is nothing to learn in it."""
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (50000,) + CIFAR100_SHAPE, np.uint8),
            "y_train": np.repeat(np.arange(CIFAR100_CLASSES, dtype=np.int32), 500),
            "x_test": rng.integers(0, 256, (10000,) + CIFAR100_SHAPE, np.uint8),
            "y_test": np.repeat(np.arange(CIFAR100_CLASSES, dtype=np.int32), 100)}
