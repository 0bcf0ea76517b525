"""Continual ImageNet (paper App. H; Dohare et al. 2024): 2000 binary tasks on 32x32 ImageNet.

Each seed draws a permutation of the 1000 classes; task t is the pair at positions 2t and 2t+1 of that order
(the first is label 0; the order wraps around after 500 tasks). A task trains for --epochs (250, Table 3)
shuffled passes over its 1,200 training images (600 per class) in minibatches of 100, SGD with momentum 0.9 and
no learning-rate schedule, then is scored on its 200 held-out images (100 per class). The network is Dohare et
al.'s ConvNet with VALID padding: conv5x5-32, conv3x3-64, conv3x3-128 (each ReLU + 2x2 max-pool), flatten 512,
dense 128, dense 128, dense 2; the output layer is kept between tasks (App. H.1).

Agents (`AGENT_DEFAULTS`: Table 4's best values; a flag overrides one, a flag that does not apply is an error):
bp lr 1e-4; l2 + weight decay 1e-3 (coupled: added to the gradient before momentum); er + ER lr 1e-5; l2-er
lr 1e-3, ER lr 1e-4, weight decay 1e-3; cbp replacement rate 1e-5, decay 0.99, maturity 100; snp noise 1e-5;
snp-l2 noise 1e-5 + weight decay 1e-3. Seeds (--seeds) and swept values (--lr, --weight-decay, --er-lr) are
members trained together (vmapped, or one after another: --seed-batching); one jitted call trains one task.

Choices where the paper is silent or the sources disagree:
- Input (the authors' code, on which Table 4's learning rates were tuned): --input-norm center (default) takes
  pixels to [0, 1] and subtracts the per-channel mean of all cached images, without dividing by the std: the
  authors fed Dohare et al.'s per-class arrays, which are centred but not rescaled (pixel std ~0.26). The mean
  is kept beside the cache (continual_imagenet32_700_mean.json; rebuilding the cache removes it) and printed at
  start. --input-norm imagenet: ImageNet's channel mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225);
  unit: [0, 1] only.
- Init (the authors' code): every conv and dense layer LeCun-normal (flax's default, which their ConvNet kept:
  a normal truncated at 2 std, rescaled to variance exactly 1 / fan_in), zero biases.
- L2-ER's lr is Table 4's 1e-3; the authors' run lists mostly used 1e-4. `--lr 1e-4 1e-3` trains both.
- ER (App. D; the authors' runs): a plain gradient-ascent step on the mean effective rank of the two dense
  hidden layers' features, outside the optimizer, once per epoch on that epoch's 1,200 images. --er-every K:
  every K minibatches on their images; --er-every 1 (every minibatch, its 100 images) is Table 3's listing.
  It costs about one extra forward/backward pass per epoch: er and l2-er take about twice as long as bp.
- CBP (Dohare et al.) on all five hidden layers, conv layers by channel, with Dohare et al.'s Continual
  ImageNet utility, adaptable_contribution (--cbp-utility contribution for the other). At the conv-to-dense
  boundary a conv3 channel owns 4 rows of fc1 (flatten order h, w, c): replacing it zeroes those rows and
  their momentum. Fresh incoming weights come from the init above.
- Shrink & Perturb is not in Table 4: N(0, 1e-5^2) noise on every parameter after every step (Table 3's and
  Dohare et al.'s scale), Table 4's lr and, for snp-l2, its weight decay.
- --conv-impl auto: patches + matrix multiply (im2col) on CPU, where it measured 9-20x faster; XLA
  convolutions elsewhere. Same math.

Data: downsampled ImageNet 32x32. Put the official Imagenet32_train_npz.zip (image-net.org, "Downsampled
ImageNet 32x32"; the file tensorflow-datasets' imagenet_resized/32x32 is built from; the validation zip is not
needed), or its extracted train_data_batch_1..10.npz, in --data-dir (default data/) or --manual-dir. The first
run reads them with NumPy (channel-first R, G, B planes, 1-based labels, as tfds converts them) and keeps the
first 700 images of every class in file order (batch 1, 2, ..., 10). Without the files it prepares
imagenet_resized/32x32 with tensorflow-datasets in --data-dir (downloads the same zip: network, tensorflow,
~10 GB of disk) and keeps the first 700 per class in tfds's shuffled order: the same classes, different
images. Per class the first 600 are training, the last 100 test images (Dohare et al.'s split). The cache is
one uint8 array [1000, 700, 32, 32, 3], <data-dir>/continual_imagenet32_700.npy (2.1 GB; ~3 GB of memory while
it is built); later runs memory-map it and never import tensorflow. No data: one `error:` line, exit 1.

Outputs (run directory runs/imagenet__<agent>__<UTC time>/ or --out-dir):
- metrics.npz, axes [config, seed, task]: test_acc (the task's 200 test images, after training); train_acc
  (final epoch: mean over its minibatches of the predictions made before each update); dead_units and
  effective_rank [config, seed, task, 2] (the two dense hidden layers, on all 1,400 images of the task, after
  training); param_norm; diverged [config, seed].
- hessian.npz (--hessian-every K; the paper: 10): tasks and init_/end_ nodes and weights [config, seed, K',
  probes, lanczos_iters]: SLQ of the cross-entropy on the task's 1,200 training images, at the task's start
  (the previous task's parameters) and end.
- config.json; checkpoint.pkl (every --checkpoint-minutes and at the end; --resume --out-dir RUN continues).
One progress line per task (mean test/train accuracy, member-steps/s, ETA); at the end the speed after
compilation and the projected time of the full 2000-task x 250-epoch run.

    python imagenet.py --agent l2-er --seeds 10                    # the paper's setting: 2000 tasks x 250 epochs
    python imagenet.py --agent bp --lr 1e-2 1e-3 1e-4              # a sweep: 3 configs trained together
    python imagenet.py --agent l2-er --tasks 10 --epochs 5         # ~20 s per task on 2 CPU cores
"""
import os

# Before jax loads LAPACK (scipy's OpenBLAS): OpenBLAS's threads on top of XLA's oversubscribe the cores
# (two l2-er runs side by side on a 2-core CPU ran 6.8x slower than two bp runs; 1.2x with one thread each).
# A user's own OPENBLAS_NUM_THREADS wins. No effect on GPU runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import io  # noqa: E402 (after the environment is set)
import json
import re
import time
import zipfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import hessian

AGENTS = ("bp", "l2", "er", "l2-er", "cbp", "snp", "snp-l2")
# Table 4 (Continual ImageNet) best values. Shrink & Perturb is not in Table 4: we use Table 4's lr, the
# perturb scale of Table 3 / Dohare et al. (1e-5) and, for snp-l2, Table 4's L2 weight decay.
AGENT_DEFAULTS = {
    "bp": dict(lr=1e-4),
    "l2": dict(lr=1e-4, weight_decay=1e-3),
    "er": dict(lr=1e-4, er_lr=1e-5),
    "l2-er": dict(lr=1e-3, er_lr=1e-4, weight_decay=1e-3),
    "cbp": dict(lr=1e-4, replacement_rate=1e-5),
    "snp": dict(lr=1e-4, perturb_scale=1e-5),
    "snp-l2": dict(lr=1e-4, weight_decay=1e-3, perturb_scale=1e-5),
}

TRAIN_ZIP = "Imagenet32_train_npz.zip"
TFDS_NAME, TFDS_CLASSES = "imagenet_resized/32x32", 1000  # the same images through tensorflow-datasets
BATCH_FILE = re.compile(r"(?:^|/)train_data_batch_(\d+)\.npz$")
IMAGE_SHAPE = (32, 32, 3)
# Per-channel mean / std of ImageNet (RGB, pixels in [0, 1]): `--input-norm imagenet`.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Flax's default for nn.Conv and nn.Dense, which the authors' ConvNet kept: LeCun-normal, i.e. a normal
# truncated at 2 std and rescaled so that the variance is exactly 1 / fan_in (fan_in = kh x kw x c_in for a
# conv). Every layer's weights and CBP's fresh incoming weights; biases start at 0.
KERNEL_INIT = jax.nn.initializers.lecun_normal()


@dataclass
class Args:
    agent: Literal["bp", "l2", "er", "l2-er", "cbp", "snp", "snp-l2"] = "l2-er"
    """algorithm: bp (plain SGD), l2 (weight decay), er (effective-rank ascent), l2-er (both), cbp (continual
    backprop), snp (shrink & perturb noise), snp-l2 (noise + weight decay); defaults from paper Table 4"""
    seed: int = 2024
    """base seed (paper Table 3: 2024); seeds seed .. seed+seeds-1 are trained together"""
    seeds: int = 1
    """number of seeds trained together (the paper used 10)"""
    tasks: int = 2000
    """number of binary tasks (paper: 2000)"""
    epochs: int = 250
    """epochs per task (paper Table 3: 250)"""
    batch_size: int = 100
    """minibatch size (paper: 100); must divide the 2 x train-per-class training images of a task"""
    lr: tuple[float, ...] | None = None
    """SGD learning rate(s); several values sweep (None: the agent's Table 4 value; for l2-er Table 4 lists
    1e-3 while the authors' run lists mostly used 1e-4: `--lr 1e-4 1e-3` trains both together)"""
    weight_decay: tuple[float, ...] | None = None
    """L2 weight decay(s), coupled (added to the gradient); agents l2, l2-er, snp-l2 (None: Table 4's 1e-3)"""
    er_lr: tuple[float, ...] | None = None
    """effective-rank ascent step size(s); agents er, l2-er (None: Table 4's 1e-5 for er, 1e-4 for l2-er)"""
    er_every: int | None = None
    """minibatches between ER steps, each on the images of those minibatches (None: once per epoch, on the
    epoch's 1,200 images, as the authors' runs did; 1: every minibatch on its 100 images, Table 3's listing)"""
    momentum: float = 0.9
    """SGD momentum (paper Table 3: 0.9)"""
    replacement_rate: float | None = None
    """CBP replacement rate per step (None: Table 4's 1e-5)"""
    decay_rate: float = 0.99
    """CBP utility decay rate"""
    maturity_threshold: int = 100
    """CBP maturity threshold (steps before a unit may be replaced)"""
    cbp_utility: str = "adaptable_contribution"
    """CBP utility (Dohare et al.): "contribution" or "adaptable_contribution"; default as Dohare's config for
    this benchmark"""
    perturb_scale: float | None = None
    """shrink & perturb noise std added to every parameter after every step; snp, snp-l2 (None: 1e-5)"""
    input_norm: Literal["center", "imagenet", "unit"] = "center"
    """pixel preprocessing: 'center' = [0, 1] minus the per-channel mean of the cached images, not divided by
    the std (the authors' code fed Dohare et al.'s arrays: centred, pixel std ~0.26); 'imagenet' = [0, 1] then
    ImageNet's per-channel mean/std; 'unit' = [0, 1] only"""
    train_per_class: int = 600
    """training images per class (paper: 600; the next test-per-class images of the class are its test set)"""
    test_per_class: int = 100
    """test images per class (paper: 100)"""
    hessian_every: int = 0
    """Hessian spectra (SLQ on the task's training images) at task init and end every this many tasks,
    from task 0 (0 = off; the paper: 10)"""
    lanczos_iters: int = 100
    """Lanczos iterations per Hessian spectrum (paper: 100)"""
    hessian_probes: int = 1
    """random probe vectors per Hessian spectrum"""
    data_dir: str = "data"
    """folder of the prepared cache (continual_imagenet32_<n>.npy, built on the first run) and of
    tensorflow-datasets' imagenet_resized/32x32 when that route is used"""
    manual_dir: str | None = None
    """folder holding Imagenet32_train_npz.zip (or its extracted train_data_batch_*.npz) (None: --data-dir);
    without these files the cache is built through tensorflow-datasets (downloads once, needs network)"""
    out_dir: str | None = None
    """run folder (None: runs/imagenet__<agent>__<UTC time>); with --resume, the run to continue"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint (--tasks may be raised)"""
    checkpoint_minutes: float = 5.0
    """minutes of work between checkpoints (one is always written at the end)"""
    seed_batching: Literal["vmap", "map"] = "vmap"
    """how configs x seeds run together on one device: vmap (batched kernels) or map (one after another)"""
    conv_impl: Literal["auto", "xla", "im2col"] = "auto"
    """convolution kernels: XLA convolutions, or patch extraction + matrix multiply (same math); auto: im2col
    on CPU (measured 9-20x faster there), xla elsewhere"""


class Net(NamedTuple):
    """Static settings of every jitted function (a NamedTuple, so that it can key jit's cache)."""
    input_norm: str
    conv_impl: str
    seed_batching: str
    pixel_mean: tuple = ()  # per-channel mean of the cached images in [0, 1] (`--input-norm center`)


class Spec(NamedTuple):
    """Static settings of the training function."""
    net: Net
    epochs: int
    batch_size: int
    er_every: int
    use_er: bool
    use_cbp: bool
    perturb_scale: float
    momentum: float
    replacement_rate: float
    decay_rate: float
    maturity_threshold: int
    max_replace: tuple
    cbp_utility: str


# ----------------------------------------------------------------------------------------------------------
# Data: first `images_per_class` images of every class of the ImageNet32 training files, in file order
# ----------------------------------------------------------------------------------------------------------
def cache_path(data_dir, images_per_class):
    return Path(data_dir) / f"continual_imagenet32_{images_per_class}.npy"


def mean_path(cache):
    """Where the per-channel pixel mean of `cache` is kept (written on first use, removed when it is rebuilt)."""
    return cache.with_name(f"{cache.stem}_mean.json")


def missing_data_message(manual_dir, cache):
    return (f"downsampled ImageNet 32x32 not found: put {TRAIN_ZIP} (image-net.org, 'Downsampled ImageNet "
            f"32x32'; or its extracted train_data_batch_1..10.npz) into {manual_dir} (or pass --manual-dir), "
            f"or the prepared cache at {cache}, or run once with network access so tensorflow-datasets "
            f"downloads {TFDS_NAME}")


def train_batches(manual_dir):
    """The ImageNet32 training files in `manual_dir`, in batch-number order: a list of names and a function
    name -> (data uint8 [N, 3072] channel-first, labels 1-based). From the zip, else extracted files."""
    manual_dir = Path(manual_dir)
    archive = manual_dir / TRAIN_ZIP

    def number(name):
        return int(BATCH_FILE.search(name).group(1))

    def parse(raw, name):
        try:
            with np.load(raw) as npz:
                return np.asarray(npz["data"]), np.asarray(npz["labels"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            common.fail(f"{name} is not an ImageNet32 batch file ({type(e).__name__}: {e})")

    if archive.exists():
        try:
            with zipfile.ZipFile(archive) as zf:
                names = sorted((n for n in zf.namelist() if BATCH_FILE.search(n)), key=number)
        except zipfile.BadZipFile:
            common.fail(f"{archive} is not a valid zip file")

        def read(name):
            with zipfile.ZipFile(archive) as zf:
                return parse(io.BytesIO(zf.read(name)), f"{archive}:{name}")
        return names, read
    names = sorted((str(p) for p in manual_dir.glob("train_data_batch_*.npz") if BATCH_FILE.search(str(p))),
                   key=number)
    return names, lambda name: parse(name, name)


def file_chunks(names, read):
    """(images uint8 [N, 32, 32, 3] HWC, labels 0-based) of each training file, in batch-number order."""
    for name in names:
        print(f"reading {Path(name).name} ...", flush=True)
        data, labels = read(name)
        labels = labels.astype(np.int64).reshape(-1) - 1
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            common.fail(f"{name}: expected uint8 data [N, 3072] and N labels, got {data.dtype} {data.shape} "
                        f"and {labels.shape}")
        if len(labels) and labels.min() < 0:
            common.fail(f"{name}: labels must be 1-based (found {labels.min() + 1})")
        yield data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def build_cache(chunks, path, images_per_class, source, num_classes=None):
    """Keep the first `images_per_class` images of every class, in the order `chunks` yields them
    ((images uint8 [N, 32, 32, 3], labels 0-based) pairs), and save them as one uint8 array
    [classes, images_per_class, 32, 32, 3] (HWC, RGB) at `path`. With `num_classes` known, reading stops as
    soon as every class is full."""
    print(f"building {path} from {source} (once) ...", flush=True)
    mean_path(path).unlink(missing_ok=True)  # it described the old cache
    per_class = {}  # class -> list of [k, 32, 32, 3] chunks, at most images_per_class images in all
    counts = {}
    for images, labels in chunks:
        if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE or labels.shape != images.shape[:1]:
            common.fail(f"{source}: expected uint8 images [N, 32, 32, 3] and N labels, got {images.dtype} "
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
        common.fail(f"{source} holds no training images")
    num_classes = num_classes or int(max(counts)) + 1
    short = [c for c in range(num_classes) if counts.get(c, 0) < images_per_class]
    if short:
        common.fail(f"ImageNet32 class {short[0] + 1} has {counts.get(short[0], 0)} training images in "
                    f"{source}, {images_per_class} are needed")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                    shape=(num_classes, images_per_class) + IMAGE_SHAPE)
    for c in range(num_classes):
        out[c] = np.concatenate(per_class.pop(c))
    out.flush()
    del out
    tmp.replace(path)


def load_images(args):
    """The cached [classes, images_per_class, 32, 32, 3] uint8 array (memory-mapped), built if missing: from
    the ImageNet32 files in --manual-dir when there are any (file order), else through tensorflow-datasets
    `imagenet_resized/32x32` prepared in --data-dir (tfds's order, so a different 700 images per class)."""
    n = args.train_per_class + args.test_per_class
    path = cache_path(args.data_dir, n)
    if not path.exists():
        manual_dir = Path(args.manual_dir or args.data_dir)
        names, read = train_batches(manual_dir)
        if names:
            build_cache(file_chunks(names, read), path, n, manual_dir)
        else:
            chunks = common.tfds_batches(TFDS_NAME, args.data_dir, None, "train",
                                         missing_data_message(manual_dir, path))
            build_cache(chunks, path, n, f"tensorflow-datasets {TFDS_NAME} in {args.data_dir}", TFDS_CLASSES)
    images = np.load(path, mmap_mode="r")
    if images.dtype != np.uint8 or images.shape[1:] != (n,) + IMAGE_SHAPE or images.shape[0] < 2:
        common.fail(f"{path} holds {images.dtype} {images.shape}, expected uint8 [classes>=2, {n}, 32, 32, 3]; "
                    f"delete it to rebuild")
    return images


def channel_mean(images, cache):
    """Per-channel mean (R, G, B) of the pixels, scaled to [0, 1], of every image in the cache `images`
    (uint8 [classes, n, 32, 32, 3]): what `--input-norm center` subtracts, as Dohare et al.'s arrays, which
    the authors' code fed to the network, were centred. Summed class by class (the memory-mapped cache is
    never loaded whole) and kept in `mean_path(cache)`, so only the first run pays for the pass."""
    path = mean_path(cache)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("shape") == list(images.shape):
            return tuple(float(v) for v in stored["channel_mean"])
    total = np.zeros(3, np.uint64)
    for c in range(images.shape[0]):
        total += np.asarray(images[c]).reshape(-1, 3).sum(axis=0, dtype=np.uint64)
    mean = total / (255.0 * (images.size // 3))
    common.save_json(path, {"channel_mean": mean.tolist(), "shape": list(images.shape)})
    return tuple(float(v) for v in mean)


def class_orders(seeds, num_classes):
    """Per seed, the permutation of the classes whose consecutive pairs are the tasks."""
    return np.stack([np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(s), 3), num_classes))
                     for s in seeds])


def task_data(images, orders, task, train_per_class):
    """Training and test images/labels of `task` for every seed: class order[2t] is label 0, order[2t+1]
    label 1 (indices wrap around). Train: the first train_per_class images of each class; test: the rest."""
    num_classes = images.shape[0]
    xs_train, xs_test = [], []
    for order in orders:
        pair = images[[order[(2 * task) % num_classes], order[(2 * task + 1) % num_classes]]]
        xs_train.append(pair[:, :train_per_class].reshape((-1,) + IMAGE_SHAPE))
        xs_test.append(pair[:, train_per_class:].reshape((-1,) + IMAGE_SHAPE))
    test_per_class = images.shape[1] - train_per_class
    y_train = np.repeat(np.arange(2, dtype=np.int32), train_per_class)
    y_test = np.repeat(np.arange(2, dtype=np.int32), test_per_class)
    return np.stack(xs_train), y_train, np.stack(xs_test), y_test


def preprocess(images, net):
    """uint8 images -> float32 network input, as `net.input_norm` says (see Args.input_norm)."""
    x = images.astype(jnp.float32) / 255.0
    if net.input_norm == "center":
        if len(net.pixel_mean) != 3:
            raise ValueError("input_norm 'center' needs the cache's per-channel mean (Net.pixel_mean)")
        x = x - jnp.asarray(net.pixel_mean, jnp.float32)
    elif net.input_norm == "imagenet":
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return x


# ----------------------------------------------------------------------------------------------------------
# Network: Dohare et al.'s ConvNet (App. H.1), VALID padding: 32 -> conv5 28 -> pool 14 -> conv3 12 -> pool 6
# -> conv3 4 -> pool 2; flatten 2*2*128 = 512 -> 128 -> 128 -> 2
# ----------------------------------------------------------------------------------------------------------
CONVS = (("conv1", 5, 3, 32), ("conv2", 3, 32, 64), ("conv3", 3, 64, 128))
DENSES = (("fc1", 512, 128), ("fc2", 128, 128), ("out", 128, 2))
# Hidden layers (in order) and the layer their outputs feed; CBP replaces units of these.
HIDDEN = ("conv1", "conv2", "conv3", "fc1", "fc2")
NEXT = ("conv2", "conv3", "fc1", "fc2", "out")
HIDDEN_UNITS = (32, 64, 128, 128, 128)


def init_params(key):
    """Every conv (HWIO) and dense ([in, out]) layer: `KERNEL_INIT` weights, zero bias."""
    shapes = [(name, (size, size, cin, cout)) for name, size, cin, cout in CONVS]
    shapes += [(name, (fin, fout)) for name, fin, fout in DENSES]
    keys = jax.random.split(key, len(shapes))
    return {name: {"w": KERNEL_INIT(k, shape, jnp.float32), "b": jnp.zeros(shape[-1], jnp.float32)}
            for k, (name, shape) in zip(keys, shapes)}


def conv(x, layer, impl):
    w = layer["w"]
    if impl == "im2col":
        kh, kw, cin, cout = w.shape
        # Patches come out channel-major: feature index = c * kh * kw + i * kw + j.
        patches = jax.lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), "VALID",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return patches @ w.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout) + layer["b"]
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + layer["b"]


def max_pool(x):
    """2x2 max-pool, stride 2 (reshape + max: cheaper on GPUs than reduce_window's gradient)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def forward(params, x, impl):
    """Logits [n, 2] and the hidden activations (post-ReLU; conv layers after pooling) of HIDDEN."""
    acts = []
    h = x
    for name, *_ in CONVS:
        h = max_pool(jax.nn.relu(conv(h, params[name], impl)))
        acts.append(h)
    h = h.reshape(h.shape[0], -1)
    for name in ("fc1", "fc2"):
        h = jax.nn.relu(h @ params[name]["w"] + params[name]["b"])
        acts.append(h)
    return h @ params["out"]["w"] + params["out"]["b"], acts


def cross_entropy(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def dense_features(params, x, impl):
    """Features of the last two dense hidden layers: what ER acts on (the authors' code) and what is measured."""
    return forward(params, x, impl)[1][3:]


# ----------------------------------------------------------------------------------------------------------
# One member (config x seed): optimizer, CBP, one task of training, evaluation, Hessian spectra
# ----------------------------------------------------------------------------------------------------------
def optimizer(spec, hp):
    return common.sgd(hp["lr"], hp["weight_decay"], spec.momentum)


def init_member(key, momentum, use_cbp):
    params = init_params(key)
    member = {"params": params, "opt_state": common.sgd(0.0, 0.0, momentum).init(params)}
    if use_cbp:
        member["cbp"] = [common.cbp_init(units) for units in HIDDEN_UNITS]
    return member


def cbp_update(spec, opt, member, acts, key):
    """Continual backprop after an SGD step (Dohare et al.): per hidden layer, by unit (conv: by channel),
    update utilities with this step's activations and replace the chosen units. conv3's outgoing weights are
    fc1's rows; fc1 is viewed as [2, 2, 128, 128] (flatten order h, w, c) so channel c owns 4 rows."""
    params = dict(member["params"])
    keep = jax.tree.map(jnp.ones_like, params)
    states = []
    for layer, (name, nxt, key_l) in enumerate(zip(HIDDEN, NEXT, jax.random.split(key, len(HIDDEN)))):
        w_out = params[nxt]["w"]
        if name == "conv3":
            w_out = w_out.reshape(acts[layer].shape[1:] + (w_out.shape[-1],))
        axis = 2 if name.startswith("conv") else 0
        state, idx, valid = common.cbp_select(
            member["cbp"][layer], acts[layer], w_out, w_in=params[name]["w"], utility=spec.cbp_utility,
            replacement_rate=spec.replacement_rate, decay_rate=spec.decay_rate,
            maturity_threshold=spec.maturity_threshold, max_replace=spec.max_replace[layer], out_unit_axis=axis)
        w_in, b_in, w_out, keep_in, keep_b, keep_out = common.cbp_replace(
            key_l, params[name]["w"], params[name]["b"], w_out, idx, valid, out_unit_axis=axis, init=KERNEL_INIT)
        shape_out = params[nxt]["w"].shape
        params[name] = {"w": w_in, "b": b_in}
        params[nxt] = {"w": w_out.reshape(shape_out), "b": params[nxt]["b"]}
        keep[name] = {"w": keep[name]["w"] * keep_in, "b": keep[name]["b"] * keep_b}
        keep[nxt] = {"w": keep[nxt]["w"] * keep_out.reshape(shape_out), "b": keep[nxt]["b"]}
        states.append(state)
    opt_state = common.mask_opt_state(opt, member["opt_state"], keep)
    return dict(member, params=params, opt_state=opt_state, cbp=states)


def train_task(spec, member, hp, x_train, y_train, key):
    """Train one member on one task: `spec.epochs` shuffled passes, an ER step after every `er_every`
    minibatches (ER agents). Returns the member and the final epoch's training accuracy (mean over its
    minibatches of the predictions made before each update)."""
    x = preprocess(x_train, spec.net)
    n = x.shape[0]
    steps = n // spec.batch_size
    groups = steps // spec.er_every
    opt = optimizer(spec, hp)

    def loss_fn(params, xb, yb):
        logits, acts = forward(params, xb, spec.net.conv_impl)
        return cross_entropy(logits, yb), (logits, acts)

    def sgd_step(member, batch):
        idx, step_key = batch
        xb, yb = x[idx], y_train[idx]
        (_, (logits, acts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(member["params"], xb, yb)
        updates, opt_state = opt.update(grads, member["opt_state"], member["params"])
        params = optax.apply_updates(member["params"], updates)
        if spec.perturb_scale:
            params = common.shrink_perturb(params, step_key, spec.perturb_scale)
        member = dict(member, params=params, opt_state=opt_state)
        if spec.use_cbp:
            member = cbp_update(spec, opt, member, acts, step_key)
        return member, jnp.mean(jnp.argmax(logits, axis=-1) == yb)

    def group(member, batches):
        member, accs = jax.lax.scan(sgd_step, member, batches)
        if spec.use_er:
            images = x[batches[0].reshape(-1)]
            params, _ = common.er_ascent(member["params"], partial(dense_features, impl=spec.net.conv_impl),
                                         images, hp["er_lr"])
            member = dict(member, params=params)
        return member, accs

    def epoch(member, e):
        order_key, steps_key = jax.random.split(jax.random.fold_in(key, e))
        order = jax.random.permutation(order_key, n)[:steps * spec.batch_size]
        batches = (order.reshape(groups, spec.er_every, spec.batch_size),
                   jax.random.split(steps_key, steps).reshape(groups, spec.er_every))
        member, accs = jax.lax.scan(group, member, batches)
        return member, jnp.mean(accs)

    member, epoch_accs = jax.lax.scan(epoch, member, jnp.arange(spec.epochs))
    return member, epoch_accs[-1]


def evaluate(net, params, x_train, x_test, y_test):
    """Test accuracy on the task's held-out images; dead units and effective rank of the dense hidden layers
    on all of the task's images (train + test); parameter norm."""
    logits, acts_test = forward(params, preprocess(x_test, net), net.conv_impl)
    acts_train = dense_features(params, preprocess(x_train, net), net.conv_impl)
    feats = [jnp.concatenate([a, b]) for a, b in zip(acts_train, acts_test[3:])]
    return {"test_acc": jnp.mean(jnp.argmax(logits, axis=-1) == y_test),
            "dead_units": jnp.stack([common.dead_units(f) for f in feats]).astype(jnp.float32),
            "effective_rank": common.effective_ranks(feats),
            "param_norm": common.param_norm(params)}


def spectrum(net, params, x_train, y_train, key, num_iters, num_probes):
    """Hessian spectrum (SLQ nodes, weights) of the cross-entropy on the task's training images (App. F.1)."""
    x = preprocess(x_train, net)
    loss = lambda p: cross_entropy(forward(p, x, net.conv_impl)[0], y_train)  # noqa: E731
    return hessian.slq(loss, params, key, num_iters, num_probes)


def over_members(fn, how):
    """Run `fn` on every member (leading axis of every argument): vmap, or lax.map one after another."""
    if how == "vmap":
        return jax.vmap(fn)
    return lambda *args: jax.lax.map(lambda a: fn(*a), args)


def member_key(seed, stream, task):
    """A member's key for one purpose (`stream`) and task: depends on its seed only, not its position."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), task)


@partial(jax.jit, static_argnums=(0, 1))
def init_members(momentum, use_cbp, seeds):
    # One member after another: runs once, and compiles much faster than a vmap over PRNG keys.
    return jax.lax.map(lambda s: init_member(member_key(s, 0, 0), momentum, use_cbp), seeds)


@partial(jax.jit, static_argnums=0)
def train_members(spec, members, hp, x_train, y_train, seeds, task):
    def one(member, hp, x, seed):
        return train_task(spec, member, hp, x, y_train, member_key(seed, 1, task))
    return over_members(one, spec.net.seed_batching)(members, hp, x_train, seeds)


@partial(jax.jit, static_argnums=0)
def evaluate_members(net, params, x_train, x_test, y_test):
    return over_members(lambda p, a, b: evaluate(net, p, a, b, y_test), net.seed_batching)(params, x_train, x_test)


@partial(jax.jit, static_argnums=(0, 7, 8))
def spectrum_members(net, params, x_train, y_train, seeds, task, phase, num_iters, num_probes):
    def one(p, x, seed):
        key = jax.random.fold_in(member_key(seed, 2, task), phase)
        return spectrum(net, p, x, y_train, key, num_iters, num_probes)
    return over_members(one, net.seed_batching)(params, x_train, seeds)


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------
METRICS = {"test_acc": (), "train_acc": (), "dead_units": (2,), "effective_rank": (2,), "param_norm": ()}
# Flags that may differ when a run is resumed.
RESUME_FREE = {"tasks", "resume", "out_dir", "checkpoint_minutes", "data_dir", "manual_dir"}


def resolve(args):
    """Validate the flags; return (configs, spec, steps per task)."""
    common.check_agent(args.agent, AGENTS)
    defaults = AGENT_DEFAULTS[args.agent]
    for flag in ("weight_decay", "er_lr", "replacement_rate", "perturb_scale"):
        if getattr(args, flag) is not None and flag not in defaults:
            common.fail(f"--{flag.replace('_', '-')} does not apply to agent {args.agent}")
    for flag in ("tasks", "epochs", "seeds", "batch_size", "train_per_class", "test_per_class", "lanczos_iters",
                 "hessian_probes"):
        if getattr(args, flag) < 1:
            common.fail(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.cbp_utility not in common.CBP_UTILITIES:
        common.fail(f"--cbp-utility must be one of {', '.join(common.CBP_UTILITIES)}, got {args.cbp_utility!r}")
    if args.hessian_every < 0 or args.maturity_threshold < 0 or not 0 <= args.momentum < 1:
        common.fail("--hessian-every and --maturity-threshold must be >= 0 and --momentum in [0, 1)")
    n_train = 2 * args.train_per_class
    if n_train % args.batch_size:
        common.fail(f"--batch-size {args.batch_size} must divide the {n_train} training images of a task")
    steps = n_train // args.batch_size
    use_er, use_cbp = args.agent in ("er", "l2-er"), args.agent == "cbp"
    if args.er_every is not None and not use_er:
        common.fail(f"--er-every does not apply to agent {args.agent}")
    er_every = steps if args.er_every is None else args.er_every
    if er_every < 1 or steps % er_every:
        common.fail(f"--er-every {er_every} must divide the {steps} minibatches of an epoch")
    sweep = {"lr": args.lr or (defaults["lr"],)}
    for flag in ("weight_decay", "er_lr"):
        if flag in defaults:
            sweep[flag] = getattr(args, flag) or (defaults[flag],)
    replacement_rate = args.replacement_rate
    if replacement_rate is None:
        replacement_rate = defaults.get("replacement_rate", 0.0)
    perturb_scale = defaults.get("perturb_scale", 0.0) if args.perturb_scale is None else args.perturb_scale
    if not 0 <= replacement_rate <= 1 or perturb_scale < 0 or not 0 < args.decay_rate < 1:
        common.fail("--replacement-rate must be in [0, 1], --perturb-scale >= 0, --decay-rate in (0, 1)")
    conv_impl = args.conv_impl
    if conv_impl == "auto":
        conv_impl = "im2col" if jax.default_backend() == "cpu" else "xla"
    spec = Spec(
        net=Net(args.input_norm, conv_impl, args.seed_batching), epochs=args.epochs, batch_size=args.batch_size,
        er_every=er_every, use_er=use_er, use_cbp=use_cbp, perturb_scale=float(perturb_scale),
        momentum=float(args.momentum),
        # CBP settings only enter the compiled code of agent cbp; fixed otherwise so compilations are shared.
        replacement_rate=float(replacement_rate) if use_cbp else 0.0,
        decay_rate=float(args.decay_rate) if use_cbp else 0.0,
        maturity_threshold=int(args.maturity_threshold) if use_cbp else 0,
        max_replace=tuple(common.cbp_max_replace(replacement_rate, u) for u in HIDDEN_UNITS) if use_cbp else (),
        cbp_utility=args.cbp_utility if use_cbp else "")
    return common.sweep(**sweep), spec, args.epochs * steps


def member_hparams(configs, config_index):
    """Per-member traced hyperparameters: lr, weight_decay (0 if the agent has none), er_lr (0 likewise)."""
    return {k: jnp.asarray([configs[c].get(k, 0.0) for c in config_index], jnp.float32)
            for k in ("lr", "weight_decay", "er_lr")}


def mean_over_members(values):
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def main(args):
    configs, spec, steps_per_task = resolve(args)
    seeds = [args.seed + i for i in range(args.seeds)]
    C, S = len(configs), len(seeds)
    config_index, member_seeds = common.stack_members(configs, seeds)
    member_seeds = jnp.asarray(member_seeds, jnp.int32)
    hp = common.shard_members(member_hparams(configs, config_index))
    images = load_images(args)
    if args.input_norm == "center":
        spec = spec._replace(net=spec.net._replace(pixel_mean=channel_mean(
            images, cache_path(args.data_dir, args.train_per_class + args.test_per_class))))
    run_dir, checkpoint = common.open_run("imagenet", args, RESUME_FREE)
    if checkpoint is not None and checkpoint["next_task"] > args.tasks:
        common.fail(f"--resume: the run already has {checkpoint['next_task']} tasks, --tasks is {args.tasks}")
    common.save_config(run_dir, args, configs, seeds)
    orders = class_orders(seeds, images.shape[0])

    metrics = {k: np.full((C, S, args.tasks) + shape, np.nan, np.float32) for k, shape in METRICS.items()}
    spectra = {"tasks": [], "init_nodes": [], "init_weights": [], "end_nodes": [], "end_weights": []}
    if args.resume:
        start = int(checkpoint["next_task"])
        members = common.shard_members(checkpoint["members"])
        for k in metrics:
            metrics[k][:, :, :start] = np.asarray(checkpoint["metrics"][k])
        spectra = {k: [np.asarray(v) for v in vals] for k, vals in checkpoint["spectra"].items()}
        diverged = np.asarray(checkpoint["diverged"], bool)
        print(f"resuming {run_dir} at task {start}", flush=True)
    else:
        start = 0
        members = common.shard_members(init_members(spec.momentum, spec.use_cbp, member_seeds))
        diverged = np.zeros((C, S), bool)

    def save(next_task):
        common.save_npz(run_dir / "metrics.npz", diverged=diverged,
                        **{k: v[:, :, :next_task] for k, v in metrics.items()})
        if spectra["tasks"]:
            common.save_npz(run_dir / "hessian.npz", tasks=np.asarray(spectra["tasks"]),
                            **{k: np.stack(v, axis=2) for k, v in spectra.items() if k != "tasks"})

    def checkpoint_now(next_task, members):
        common.save_checkpoint(run_dir, {
            "next_task": next_task, "members": members, "args": asdict(args), "diverged": diverged,
            "metrics": {k: v[:, :, :next_task] for k, v in metrics.items()},
            "spectra": {k: list(v) for k, v in spectra.items()}})

    def to_cs(x):
        return np.asarray(x).reshape((C, S) + np.shape(x)[1:])

    print(f"imagenet: agent {args.agent}, {C} config(s) x {S} seed(s), {images.shape[0]} classes, "
          f"{args.tasks} tasks x {args.epochs} epochs x {steps_per_task // args.epochs} steps -> {run_dir}",
          flush=True)
    if spec.net.pixel_mean:
        print(f"input: [0, 1] pixels minus the cache's channel mean "
              f"({', '.join(f'{m:.4f}' for m in spec.net.pixel_mean)})", flush=True)
    progress = common.Progress(args.tasks, "task", start_units=start)
    last_checkpoint = time.perf_counter()
    timed_from = None  # (time, task) once the first task (compilation) is done
    for task in range(start, args.tasks):
        x_train, y_train, x_test, y_test = task_data(images, orders, task, args.train_per_class)
        seed_slot = np.asarray(member_seeds) - args.seed  # members of one seed share its task data
        x_train, x_test = common.shard_members((jnp.asarray(x_train[seed_slot]), jnp.asarray(x_test[seed_slot])))
        measure = args.hessian_every > 0 and task % args.hessian_every == 0
        if measure:
            init_spectrum = spectrum_members(spec.net, members["params"], x_train, y_train, member_seeds, task, 0,
                                             args.lanczos_iters, args.hessian_probes)
        members, train_acc = train_members(spec, members, hp, x_train, y_train, member_seeds, task)
        result = evaluate_members(spec.net, members["params"], x_train, x_test, y_test)
        result["train_acc"] = train_acc
        if measure:
            end_spectrum = spectrum_members(spec.net, members["params"], x_train, y_train, member_seeds, task, 1,
                                            args.lanczos_iters, args.hessian_probes)
            spectra["tasks"].append(task)
            for phase, (nodes, weights) in (("init", init_spectrum), ("end", end_spectrum)):
                spectra[f"{phase}_nodes"].append(to_cs(nodes))
                spectra[f"{phase}_weights"].append(to_cs(weights))
        result = {k: to_cs(v) for k, v in result.items()}
        finite = np.isfinite(result["param_norm"]) & ~diverged
        diverged = common.report_diverged(finite, configs, seeds, f"task {task}", known=diverged)
        for k, v in result.items():
            metrics[k][:, :, task] = np.where(diverged.reshape((C, S) + (1,) * (v.ndim - 2)), np.nan, v)
        save(task + 1)
        if timed_from is None:
            timed_from = (time.perf_counter(), task + 1)
        progress.update(task + 1, steps_per_task * C * S,
                        test_acc=mean_over_members(metrics["test_acc"][:, :, task]),
                        train_acc=mean_over_members(metrics["train_acc"][:, :, task]))
        if time.perf_counter() - last_checkpoint > 60 * args.checkpoint_minutes:
            checkpoint_now(task + 1, members)
            last_checkpoint = time.perf_counter()
    checkpoint_now(args.tasks, members)
    save(args.tasks)
    if timed_from is not None and args.tasks > timed_from[1]:
        seconds = time.perf_counter() - timed_from[0]
        steps = (args.tasks - timed_from[1]) * steps_per_task
        per_member_step = seconds / (steps * C * S)
        full = per_member_step * C * S * 2000 * 250 * (steps_per_task // args.epochs)
        print(f"timing (tasks {timed_from[1]}..{args.tasks - 1}, after compilation): {steps / seconds:,.1f} steps/s "
              f"x {C * S} member(s) = {steps * C * S / seconds:,.1f} member-steps/s; {1e6 * seconds / steps:,.0f} us "
              f"per step, {1e6 * per_member_step:,.0f} us per member-step; the full 2000-task x 250-epoch run "
              f"with {C * S} member(s) at this speed: {full / 3600:.1f} h", flush=True)
    return run_dir


if __name__ == "__main__":
    main(common.cli(Args))
