"""Incremental CIFAR-100 with a ResNet-18 (paper App. I; Dohare et al. 2024 without augmentation or lr annealing).

Each seed draws an order of the 100 classes. Task t (1..20) trains on all 500 training images of each of the
first 5t classes for --epochs (200) epochs: SGD, momentum 0.9, batch 100, lr 0.01, no data augmentation and no
learning-rate annealing (the paper removed both). Logits of classes not seen yet are set to -1e9 before the
softmax (no probability, no gradient). After each task: test accuracy on all test images (100 per class) of the
classes seen so far. Network (App. I.1): 3x3 stride-1 stem, no max-pool, four stages of two BasicBlocks
(--width 64 channels, doubling per stage; stride-2 first blocks with 1x1 conv + BatchNorm skips), global
average pooling, two dense 512 + ReLU layers (--dense-width), a 100-way head. BatchNorm uses batch statistics in
training and running statistics (momentum 0.1, unbiased variance, as PyTorch) in evaluation; the statistics
live beside the parameters, not in them.

Agents (`AGENT_DEFAULTS`: Table 6's fixed-lr best values, Table 5's settings; a flag overrides one): bp; l2
weight decay 1e-4 (coupled: added to the gradient); er ER lr 1e-4, --er-batch 5; l2-er weight decay 1e-3, ER
lr 1e-3; cbp replacement rate 1e-6, maturity 100, decay 0.99; snp noise 1e-5 (Table 5); snp-l2 noise 1e-5 +
L2's weight decay 1e-4 (the paper gives none); reset: a freshly initialized network, BatchNorm statistics and
optimizer at every task. Seeds (--seeds) and swept values (--lr, --weight-decay, --er-lr) train together;
--seed-mode sequential (default) calls one compiled single-member program per member, vmap batches them
(measured 2.2x slower per seed for this ResNet on an H100), map runs them with lax.map in one program.

Choices where the paper is silent or the sources disagree:
- Input (the authors' code, on which Table 6's learning rates were tuned): pixels scaled to [0, 1], nothing
  subtracted or divided (their loader applies ToTensor only).
- Init (the authors' flax ResNet-18, variance_scaling(2.0 | 1.0, "fan_out", "truncated_normal")): convolutions
  (stem, block convs, 1x1 skips) He-normal on fan-out, variance 2 / (kh x kw x c_out); the two dense layers and
  the head variance 1 / fan-out (the output width); each a normal truncated at 2 std, rescaled to exactly that
  variance. Biases 0, BatchNorm scale 1 and shift 0.
- ER (App. D; the authors' code): after every --er-batch-th (5th) minibatch of an epoch, one plain ascent step
  params += er_lr * grad(mean effective rank) outside the optimizer, on the post-ReLU features of the two dense
  layers for the images of those 5 minibatches (500), recomputed with the current parameters, BatchNorm on
  those images' batch statistics (running statistics untouched).
- CBP (Dohare et al.) by channel, with their Incremental CIFAR utility, contribution (--cbp-utility
  adaptable_contribution for the other): the units are the inner channels of every BasicBlock (conv -> BN ->
  ReLU, outgoing weights in the block's second conv) and the two dense layers. A replaced unit gets fresh
  incoming weights from its layer's init, bias 0, zero outgoing weights, BatchNorm scale 1, shift 0, running
  mean 0 and variance 1, and zero optimizer state for all of these. Residual-stream channels (stem, second
  convs, skips) are not replaced.
- --precision default lets GPUs use TF32 tensor cores for float32 convolutions and matmuls (as PyTorch does for
  convolutions); highest forces full float32 products.

Data: tensorflow-datasets cifar100 the first time (downloads; needs tensorflow), or offline: put the official
cifar-100-python.tar.gz (or cifar-100-binary.tar.gz) in a folder and pass --manual-dir FOLDER (read directly,
no tensorflow). Either way the arrays are cached as <--data-dir>/cifar100.npz (default ~/tensorflow_datasets),
and later runs read only that file. --synthetic-data: random images of the same shapes (timing only).

Outputs (run directory runs/cifar__<agent>__<UTC time>/ or --out-dir):
- metrics.npz, axes [config, seed, task]: test_acc, test_loss (all test images of the seen classes, BatchNorm
  in eval mode); train_acc, train_loss (mean over the last epoch's minibatches, each measured before its
  update); param_norm; dead_units and effective_rank [config, seed, task, 2] (the two dense layers, on up to
  --feature-samples 2000 test images of the seen classes, eval mode); diverged [config, seed]; class_order
  [config, seed, 100].
- hessian.npz (--hessian-every K; Fig. 13 used 1): tasks (0-based) and init_/end_ nodes and weights [config,
  seed, K', probes, lanczos_iters (16, the paper's for CIFAR)]: SLQ of the masked cross-entropy (no L2 or ER
  term) on --hessian-samples (2000) training images of the task's newly added classes, BatchNorm in eval mode
  (so the loss is a per-image average). init = the network that starts the task (for reset the fresh one),
  end = after it.
- config.json; checkpoint.pkl (after a chunk of --chunk-epochs epochs once --checkpoint-minutes have passed,
  and at the end; --resume --out-dir RUN continues, also from the middle of a task).

    python cifar.py --agent l2-er --seeds 5                              # the paper's setting, 5 seeds
    python cifar.py --agent reset --seeds 5                              # the RESET baseline
    python cifar.py --agent l2 --lr 0.01 0.001 --weight-decay 1e-3 1e-4  # a 2 x 2 sweep x 1 seed
    python cifar.py --agent bp --hessian-every 1                         # + Hessian spectra every task (Fig. 13)
    python cifar.py --agent l2-er --tasks 2 --epochs 1 --width 4 --dense-width 16 --synthetic-data  # ~2 min, CPU
"""
import os

# Before jax loads LAPACK (scipy's OpenBLAS): OpenBLAS's threads on top of XLA's oversubscribe the cores
# (two l2-er runs side by side on a 2-core CPU ran 6.8x slower than two bp runs; 1.2x with one thread each).
# A user's own OPENBLAS_NUM_THREADS wins. No effect on GPU runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import functools  # noqa: E402 (after the environment is set)
import math
import pickle
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import hessian

AGENTS = ("bp", "l2", "er", "l2-er", "cbp", "snp", "snp-l2", "reset")


@dataclass
class Args:
    agent: Literal["bp", "l2", "er", "l2-er", "cbp", "snp", "snp-l2", "reset"] = "bp"
    """learning agent: bp, l2, er, l2-er, cbp, snp, snp-l2, or reset (re-initialize the network, its BatchNorm
    statistics and the optimizer at every task)"""
    seed: int = 0
    """first seed; seeds seed .. seed+seeds-1 train together"""
    seeds: int = 1
    """number of seeds"""
    seed_mode: Literal["sequential", "vmap", "map"] = "sequential"
    """how seeds (and configs) share the device: sequential = one compiled single-seed chunk called once per
    member; vmap = one batched program; map = jax.lax.map over members inside one program"""
    lr: tuple[float, ...] | None = None
    """SGD learning rate(s) (default 0.01, Table 6); several values sweep"""
    weight_decay: tuple[float, ...] | None = None
    """L2 weight decay(s) for l2 (1e-4), l2-er (1e-3) and snp-l2 (1e-4); several values sweep"""
    er_lr: tuple[float, ...] | None = None
    """effective-rank ascent step size(s) for er (1e-4) and l2-er (1e-3); several values sweep"""
    er_batch: int = 5
    """ER ascent step after every this many minibatches, on the features of those minibatches' images (Table 5)"""
    replacement_rate: float | None = None
    """cbp: units replaced per eligible unit per step (default 1e-6, Table 6)"""
    maturity_threshold: int = 100
    """cbp: steps before a unit may be replaced (Table 5)"""
    decay_rate: float = 0.99
    """cbp: decay of the running utility (Table 5)"""
    cbp_utility: str = "contribution"
    """CBP utility (Dohare et al.): "contribution" or "adaptable_contribution"; default as Dohare's config for
    this benchmark"""
    perturb_scale: float | None = None
    """snp, snp-l2: std of the Gaussian noise added to every parameter after each step (default 1e-5, Table 5)"""
    tasks: int = 20
    """number of tasks (each adds --classes-per-task classes; 20 x 5 = all 100 classes)"""
    classes_per_task: int = 5
    """classes added per task"""
    epochs: int = 200
    """epochs per task over all training images of the seen classes"""
    batch_size: int = 100
    """minibatch size"""
    momentum: float = 0.9
    """SGD momentum"""
    width: int = 64
    """channels of the stem and first stage (stages use 1x, 2x, 4x, 8x); 64 is the paper's ResNet-18"""
    dense_width: int = 512
    """units of each of the two dense layers before the head"""
    feature_samples: int = 2000
    """test images of the seen classes on which dead units and effective rank are measured"""
    eval_batch: int = 500
    """images per forward pass when evaluating (memory only; results do not depend on it)"""
    hessian_every: int = 0
    """Hessian spectra at the init and end of every this-many-th task (0 = never; the paper's Fig. 13 used 1)"""
    hessian_samples: int = 2000
    """training images of the task's newly added classes in the Hessian's loss"""
    lanczos_iters: int = 16
    """Lanczos iterations per spectrum (16 for CIFAR in the paper)"""
    hessian_probes: int = 1
    """Gaussian probe vectors per spectrum"""
    hessian_batch: int = 250
    """images per forward pass inside a Hessian-vector product (memory only)"""
    precision: Literal["default", "highest"] = "default"
    """matmul/conv precision of float32 work: default lets GPUs use TF32 tensor cores (as PyTorch does for
    convolutions), highest forces full fp32 products"""
    chunk_epochs: int = 25
    """epochs per compiled call (progress line and checkpoint opportunity after each)"""
    checkpoint_minutes: float = 10.0
    """write checkpoint.pkl after a chunk when this many minutes passed since the last one (and at the end)"""
    data_dir: str = "~/tensorflow_datasets"
    """folder of the cached arrays (cifar100.npz) and of tensorflow-datasets' files"""
    manual_dir: str | None = None
    """folder holding the official cifar-100-python.tar.gz or cifar-100-binary.tar.gz (offline preparation)"""
    synthetic_data: bool = False
    """use random images and labels with CIFAR-100's shapes and class sizes instead of the data set (for timing
    only: accuracies mean nothing)"""
    out_dir: str | None = None
    """run folder (default runs/cifar__<agent>__<UTC time>)"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint"""


# Table 6 best values (fixed lr 0.01); snp's noise is Table 5's perturb_scale, snp-l2 takes L2's weight decay.
AGENT_DEFAULTS = {
    "bp": {},
    "l2": {"weight_decay": 1e-4},
    "er": {"er_lr": 1e-4},
    "l2-er": {"er_lr": 1e-3, "weight_decay": 1e-3},
    "cbp": {"replacement_rate": 1e-6},
    "snp": {"perturb_scale": 1e-5},
    "snp-l2": {"perturb_scale": 1e-5, "weight_decay": 1e-4},
    "reset": {},
}
DEFAULT_LR = 0.01
# Flags a resumed run may change (speed, memory, paths, more tasks); all others must match the checkpoint.
RESUME_FREE = ("tasks", "resume", "out_dir", "checkpoint_minutes", "data_dir", "manual_dir", "seed_mode",
               "chunk_epochs", "eval_batch", "hessian_batch")
NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)


# ----------------------------------------------------------------------------------------------------------
# Data: the official CIFAR-100 archive (offline) or tensorflow-datasets, cached as one .npz
# ----------------------------------------------------------------------------------------------------------
ARCHIVES = ("cifar-100-python.tar.gz", "cifar-100-binary.tar.gz")
MISSING_HINT = (f"put {ARCHIVES[0]} (or {ARCHIVES[1]}) from the CIFAR-100 site in a folder and pass it as "
                f"--manual-dir, or run once with network access so tensorflow-datasets downloads cifar100")


def read_python_archive(tar):
    """cifar-100-python.tar.gz: pickled dicts with b'data' uint8 [N, 3072] (channel-first rows) and b'fine_labels'."""
    out = {}
    for split in ("train", "test"):
        with tar.extractfile(f"cifar-100-python/{split}") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], np.uint8)
        out[f"x_{split}"] = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out[f"y_{split}"] = np.asarray(batch[b"fine_labels"], np.int32)
    return out


def read_binary_archive(tar):
    """cifar-100-binary.tar.gz: records of (coarse label byte, fine label byte, 3072 channel-first pixel bytes)."""
    out = {}
    for split in ("train", "test"):
        with tar.extractfile(f"cifar-100-binary/{split}.bin") as f:
            records = np.frombuffer(f.read(), np.uint8)
        if records.size % 3074:
            raise ValueError(f"{split}.bin is not a whole number of 3074-byte records")
        records = records.reshape(-1, 3074)
        out[f"y_{split}"] = records[:, 1].astype(np.int32)
        out[f"x_{split}"] = records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return out


def read_manual_archive(manual_dir):
    """Arrays from the first official archive found in `manual_dir`."""
    for name, reader in zip(ARCHIVES, (read_python_archive, read_binary_archive)):
        path = Path(manual_dir).expanduser() / name
        if path.exists():
            try:
                with tarfile.open(path, "r:gz") as tar:
                    return reader(tar)
            except (OSError, KeyError, EOFError, ValueError, tarfile.TarError, pickle.UnpicklingError) as e:
                common.fail(f"could not read {path}: {type(e).__name__}: {str(e)[:150]}")
    common.fail(f"CIFAR-100 not found in {manual_dir}: {MISSING_HINT}")


def tfds_cifar100(data_dir):
    arrays = common.tfds_arrays("cifar100", data_dir, None, ["train", "test"], MISSING_HINT)
    return {f"{k}_{split}": np.asarray(v, np.uint8 if k == "x" else np.int32)
            for split, pair in arrays.items() for k, v in zip(("x", "y"), pair)}


def synthetic_cifar100():
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (50000,) + IMAGE_SHAPE, np.uint8),
            "y_train": np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), 500),
            "x_test": rng.integers(0, 256, (10000,) + IMAGE_SHAPE, np.uint8),
            "y_test": np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), 100)}


def checked(data, source, hint=""):
    """Stop with one line unless `data` holds uint8 [N, 32, 32, 3] images and N labels in 0..99, balanced."""
    for split in ("train", "test"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if x.shape[1:] != IMAGE_SHAPE or x.dtype != np.uint8 or y.shape != x.shape[:1]:
            common.fail(f"{source}: {split} images must be uint8 [N, 32, 32, 3] with N labels{hint}")
        if y.size == 0 or y.min() < 0 or y.max() >= NUM_CLASSES:
            common.fail(f"{source}: {split} labels must lie in 0..99{hint}")
        counts = np.bincount(y, minlength=NUM_CLASSES)
        if counts.min() == 0 or counts.min() != counts.max():
            common.fail(f"{source}: every one of the 100 classes needs the same number of {split} images "
                        f"(found {counts.min()}..{counts.max()}){hint}")
    return data


def load_cifar100(data_dir, manual_dir):
    """{x_train, y_train, x_test, y_test}: uint8 NHWC images, int32 fine labels. Cached as <data_dir>/cifar100.npz."""
    data_dir = Path(data_dir).expanduser()
    cache = data_dir / "cifar100.npz"

    def build():
        if manual_dir:
            return checked(read_manual_archive(manual_dir), Path(manual_dir).expanduser())
        return checked(tfds_cifar100(str(data_dir)), "tensorflow-datasets cifar100")

    return checked(common.load_cached(cache, build), cache, "; delete it to rebuild")


# ----------------------------------------------------------------------------------------------------------
# ResNet-18 (App. I.1): 3x3 stride-1 stem, no max-pool, 4 stages x 2 BasicBlocks, global average pool,
# two dense ReLU layers and a 100-way head. Conv biases as in the paper's listing. BatchNorm keeps running
# statistics (PyTorch's rule: momentum 0.1, unbiased variance) in a separate `stats` tree, not in params.
# ----------------------------------------------------------------------------------------------------------
STAGES = ((1, 1), (2, 2), (4, 2), (8, 2))  # (channel multiple of --width, stride of the stage's first block)
BN_MOMENTUM, BN_EPS = 0.1, 1e-5
MASKED_LOGIT = -1e9  # logit of a class not seen yet: no probability, no gradient
# The authors' init (their flax ResNet-18): variance_scaling(scale, "fan_out", "truncated_normal"), i.e. a
# standard normal truncated at +-2, divided by its std (TRUNCATED_STD) and scaled to variance scale / fan_out;
# scale 2 (He) for convolutions, 1 for the dense layers and the head. fan_out = kh x kw x c_out for a conv
# (HWIO), the output width for a dense layer ([in, out]).
TRUNCATED_STD = 0.87962566103423978  # std of a standard normal truncated at +-2


def init_std(shape):
    """Std of the truncated normal behind the init of a conv (4-d HWIO) or dense (2-d) kernel of `shape`."""
    scale = 2.0 if len(shape) == 4 else 1.0
    return math.sqrt(scale * shape[-2] / math.prod(shape)) / TRUNCATED_STD


def predrawn_init(standard):
    """The init of a conv or dense kernel as an initializer (jax.nn.initializers style) that scales given
    draws of a standard normal truncated at +-2 (`standard`, as many as the requested shape holds) by
    `init_std` instead of drawing, so that several layers share one random-number kernel; its key is unused.
    With standard = jax.random.truncated_normal(key, -2, 2, shape) it returns the numbers of
    jax.nn.initializers.variance_scaling(2.0 | 1.0, "fan_out", "truncated_normal")(key, shape)."""
    def init(key, shape, dtype=jnp.float32):
        return standard.reshape(shape).astype(dtype) * jnp.asarray(init_std(shape), dtype)
    return init


def init_net(key, width, dense_width):
    """Returns (params, stats). A block with a "skip" entry downsamples (stride 2, 1x1 conv + BN skip).
    Kernels have the authors' init (`predrawn_init`), biases are 0; all kernels come from one draw of a
    standard truncated normal, scaled per layer: one random-number kernel compiles ~9x faster than 24 (CPU:
    2 s against 19 s)."""
    def conv_bn(k, cin, cout):
        return ({"conv": {"w": jnp.zeros((k, k, cin, cout)), "b": jnp.zeros(cout)},
                 "bn": {"scale": jnp.ones(cout), "bias": jnp.zeros(cout)}},
                {"mean": jnp.zeros(cout), "var": jnp.ones(cout)})

    def dense(fan_in, fan_out):
        return {"w": jnp.zeros((fan_in, fan_out)), "b": jnp.zeros(fan_out)}

    params, stats = {}, {}
    params["stem"], stats["stem"] = conv_bn(3, 3, width)
    params["blocks"], stats["blocks"] = [], []
    cin = width
    for multiple, stride in STAGES:
        cout = width * multiple
        for first in (True, False):
            p, s = {}, {}
            p["a"], s["a"] = conv_bn(3, cin, cout)
            p["b"], s["b"] = conv_bn(3, cout, cout)
            if first and stride != 1:
                p["skip"], s["skip"] = conv_bn(1, cin, cout)
            params["blocks"].append(p)
            stats["blocks"].append(s)
            cin = cout
    params["dense1"], params["dense2"] = dense(cin, dense_width), dense(dense_width, dense_width)
    params["head"] = dense(dense_width, NUM_CLASSES)

    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    sizes = [x.size if path[-1].key == "w" else 0 for path, x in paths]
    standard = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0] + sizes)
    leaves = [predrawn_init(standard[o:o + n])(None, x.shape) if n else x
              for (_, x), o, n in zip(paths, offsets, sizes)]
    return jax.tree.unflatten(treedef, leaves), stats


def batch_norm(p, s, x, train):
    """Normalize by the batch's statistics (train) or the running ones (eval). Returns (y, new running stats)."""
    if train:
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        n = x.shape[0] * x.shape[1] * x.shape[2]
        s = jax.lax.stop_gradient({"mean": (1 - BN_MOMENTUM) * s["mean"] + BN_MOMENTUM * mean,
                                   "var": (1 - BN_MOMENTUM) * s["var"] + BN_MOMENTUM * var * n / max(n - 1, 1)})
    else:
        mean, var = s["mean"], s["var"]
    return (x - mean) * jax.lax.rsqrt(var + BN_EPS) * p["scale"] + p["bias"], s


def conv_bn_apply(p, s, x, stride, train):
    k = p["conv"]["w"].shape[0]
    padding = ((k // 2, k // 2), (k // 2, k // 2))
    y = jax.lax.conv_general_dilated(x, p["conv"]["w"], (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["b"]
    return batch_norm(p["bn"], s, y, train)


def forward(params, stats, x, train):
    """x: float [N, 32, 32, 3] in [0, 1]. Returns (logits [N, 100], new stats, activations) where activations
    holds each block's inner post-ReLU channels ("blocks", CBP's conv units) and the dense features ("dense")."""
    relu = jax.nn.relu
    new_stats = {"blocks": []}
    h, new_stats["stem"] = conv_bn_apply(params["stem"], stats["stem"], x, 1, train)
    h = relu(h)
    inner = []
    for p, s in zip(params["blocks"], stats["blocks"]):
        stride = 2 if "skip" in p else 1
        ns = {}
        a, ns["a"] = conv_bn_apply(p["a"], s["a"], h, stride, train)
        a = relu(a)
        inner.append(a)
        b, ns["b"] = conv_bn_apply(p["b"], s["b"], a, 1, train)
        skip = h
        if "skip" in p:
            skip, ns["skip"] = conv_bn_apply(p["skip"], s["skip"], h, stride, train)
        h = relu(b + skip)
        new_stats["blocks"].append(ns)
    h = jnp.mean(h, axis=(1, 2))
    d1 = relu(h @ params["dense1"]["w"] + params["dense1"]["b"])
    d2 = relu(d1 @ params["dense2"]["w"] + params["dense2"]["b"])
    logits = d2 @ params["head"]["w"] + params["head"]["b"]
    return logits, new_stats, {"blocks": inner, "dense": [d1, d2]}


def masked_loss_acc(logits, labels, seen):
    """Cross-entropy and correctness per sample with unseen classes' logits replaced by a large negative number."""
    logits = jnp.where(seen, logits, MASKED_LOGIT)
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return loss, (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Training: one member (config x seed) at a time; the seed modes below batch or loop these functions
# ----------------------------------------------------------------------------------------------------------
class Static(NamedTuple):
    """Everything that shapes the compiled programs (hashable: a jit static argument)."""
    width: int
    dense_width: int
    batch_size: int
    momentum: float
    classes_per_task: int
    use_er: bool
    er_batch: int
    use_cbp: bool
    replacement_rate: float
    decay_rate: float
    maturity_threshold: int
    cbp_utility: str
    use_snp: bool
    feature_samples: int
    eval_batch: int


class Member(NamedTuple):
    """Per-member inputs (leading member axis when stacked)."""
    seed: jax.Array        # int32: the member's seed; all its randomness derives from jax.random.key(seed)
    class_rank: jax.Array  # int32 [100]: position of each class in the seed's class order
    lr: jax.Array
    weight_decay: jax.Array
    er_lr: jax.Array
    perturb_scale: jax.Array


# Streams of randomness, folded into jax.random.key(seed): independent of the member's position in a batch.
INIT_STREAM, TRAIN_STREAM, EVAL_STREAM, HESSIAN_STREAM = 1, 2, 3, 4


def optimizer(static, lr=DEFAULT_LR, weight_decay=0.0):
    return common.sgd(lr, weight_decay, static.momentum)


def cbp_layer_sizes(static):
    return [static.width * multiple for multiple, _ in STAGES for _ in range(2)] + [static.dense_width] * 2


def init_member(member, task, static):
    """Fresh network, BatchNorm statistics, optimizer state and CBP state; task = index of the init stream."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(member.seed), INIT_STREAM), task)
    params, stats = init_net(key, static.width, static.dense_width)
    cbp = [common.cbp_init(n) for n in cbp_layer_sizes(static)] if static.use_cbp else None
    return {"params": params, "stats": stats, "opt": optimizer(static).init(params), "cbp": cbp,
            "train_acc": jnp.zeros(()), "train_loss": jnp.zeros(())}


def begin_task(state, member, task, static):
    """A fresh network, BatchNorm statistics and optimizer state (`state` is ignored): the start of a run, and
    RESET's every task."""
    return init_member(member, task, static)


def cbp_step(params, stats, opt_state, cbp, acts, key, static):
    """Continual backprop by channel (Dohare et al.): each block's inner conv channels (conv a -> BN -> ReLU,
    outgoing weights in conv b) and both dense layers. A replaced channel also gets its BatchNorm scale 1,
    shift 0, running mean 0 and variance 1; the optimizer state of every replaced entry is zeroed. Fresh
    incoming weights have the layer's init distribution (`predrawn_init`): all ten layers' candidates come
    from one draw of a standard truncated normal, since ten random-number kernels compiled ~10 s slower (CPU)."""
    num_blocks = len(params["blocks"])
    shapes = [b["a"]["conv"]["w"].shape for b in params["blocks"]]
    shapes += [params[name]["w"].shape for name in ("dense1", "dense2")]
    sizes = [math.prod(shape) for shape in shapes]
    standard = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),))
    inits = [predrawn_init(standard[o:o + n]) for o, n in zip(np.cumsum([0] + sizes), sizes)]
    params = jax.tree.map(lambda x: x, params)  # fresh containers, safe to update in place
    stats = jax.tree.map(lambda x: x, stats)
    masks = jax.tree.map(jnp.ones_like, params)
    hp = dict(replacement_rate=static.replacement_rate, decay_rate=static.decay_rate,
              maturity_threshold=static.maturity_threshold, utility=static.cbp_utility)
    new_cbp = []
    for i, size in enumerate(cbp_layer_sizes(static)):
        max_replace = common.cbp_max_replace(static.replacement_rate, size)
        if i < num_blocks:
            p, m = params["blocks"][i], masks["blocks"][i]
            state, idx, valid = common.cbp_select(cbp[i], acts["blocks"][i], p["b"]["conv"]["w"],
                                                  w_in=p["a"]["conv"]["w"], max_replace=max_replace,
                                                  out_unit_axis=2, **hp)
            (p["a"]["conv"]["w"], p["a"]["conv"]["b"], p["b"]["conv"]["w"], m["a"]["conv"]["w"],
             keep, m["b"]["conv"]["w"]) = common.cbp_replace(key, p["a"]["conv"]["w"], p["a"]["conv"]["b"],
                                                             p["b"]["conv"]["w"], idx, valid, out_unit_axis=2,
                                                             init=inits[i])
            m["a"]["conv"]["b"] = m["a"]["bn"]["scale"] = m["a"]["bn"]["bias"] = keep
            p["a"]["bn"]["scale"] = p["a"]["bn"]["scale"] * keep + (1 - keep)
            p["a"]["bn"]["bias"] = p["a"]["bn"]["bias"] * keep
            s = stats["blocks"][i]["a"]
            s["mean"], s["var"] = s["mean"] * keep, s["var"] * keep + (1 - keep)
        else:
            name, nxt = ("dense1", "dense2") if i == num_blocks else ("dense2", "head")
            state, idx, valid = common.cbp_select(cbp[i], acts["dense"][i - num_blocks], params[nxt]["w"],
                                                  w_in=params[name]["w"], max_replace=max_replace, **hp)
            params[name]["w"], params[name]["b"], params[nxt]["w"], keep_in, keep_b, keep_out = common.cbp_replace(
                key, params[name]["w"], params[name]["b"], params[nxt]["w"], idx, valid, init=inits[i])
            # dense2's incoming weights are also dense1's outgoing ones: masks multiply
            masks[name]["w"], masks[name]["b"] = masks[name]["w"] * keep_in, masks[name]["b"] * keep_b
            masks[nxt]["w"] = masks[nxt]["w"] * keep_out
        new_cbp.append(state)
    opt_state = common.mask_opt_state(optimizer(static), opt_state, masks)
    return params, stats, opt_state, new_cbp


def train_chunk(state, member, data, task, first_epoch, num_epochs, steps_per_epoch, static):
    """Epochs [first_epoch, first_epoch + num_epochs) of task `task` (0-based). Each epoch visits the seen
    classes' training images in a fresh random order, `steps_per_epoch` minibatches (the remainder is dropped)."""
    B = static.batch_size
    seen = member.class_rank < (task + 1) * static.classes_per_task  # [100]
    x_train, y_train = data["x_train"], data["y_train"]
    train_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(member.seed), TRAIN_STREAM), task)

    def images(idx):
        return x_train[idx].astype(jnp.float32) / 255.0

    def loss_fn(params, stats, x, y):
        logits, new_stats, acts = forward(params, stats, x, True)
        loss, correct = masked_loss_acc(logits, y, seen)
        return jnp.mean(loss), (new_stats, acts, jnp.mean(correct))

    def epoch(e, state):
        epoch_key = jax.random.fold_in(train_key, e)
        # A random order of the seen images: unseen ones get keys above every seen one, so they sort last.
        order = jnp.argsort(jnp.where(seen[y_train], jax.random.uniform(epoch_key, y_train.shape), 2.0))

        def step(b, carry):
            state, loss_sum, acc_sum = carry
            step_key = jax.random.fold_in(epoch_key, b)
            idx = jax.lax.dynamic_slice(order, (b * B,), (B,))
            (loss, (stats, acts, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"], state["stats"], images(idx), y_train[idx])
            opt = optimizer(static, member.lr, member.weight_decay)
            updates, opt_state = opt.update(grads, state["opt"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            if static.use_snp:
                params = common.shrink_perturb(params, jax.random.fold_in(step_key, 0), member.perturb_scale)
            cbp = state["cbp"]
            if static.use_cbp:
                params, stats, opt_state, cbp = cbp_step(params, stats, opt_state, cbp, acts,
                                                         jax.random.fold_in(step_key, 1), static)
            if static.use_er:
                # ER ascent (App. D; the authors' code) after every er_batch-th minibatch of the epoch, on the
                # images of the last er_batch minibatches, re-featurized with the current parameters.
                def er(params):
                    window = jax.lax.dynamic_slice(order, ((b + 1 - static.er_batch) * B,), (static.er_batch * B,))
                    return common.er_ascent(params, lambda p, x: forward(p, stats, x, True)[2]["dense"],
                                            images(window), member.er_lr)[0]
                params = jax.lax.cond((b + 1) % static.er_batch == 0, er, lambda p: p, params)
            state = dict(state, params=params, stats=stats, opt=opt_state, cbp=cbp)
            return state, loss_sum + loss, acc_sum + acc

        state, loss_sum, acc_sum = jax.lax.fori_loop(0, steps_per_epoch, step, (state, 0.0, 0.0))
        return dict(state, train_loss=loss_sum / steps_per_epoch, train_acc=acc_sum / steps_per_epoch)

    return jax.lax.fori_loop(first_epoch, first_epoch + num_epochs, epoch, state)


# ----------------------------------------------------------------------------------------------------------
# Evaluation (BatchNorm in eval mode: running statistics)
# ----------------------------------------------------------------------------------------------------------
def evaluate(state, member, data, task, static):
    """Test loss/accuracy over every test image of the seen classes; dead units and effective rank of the
    dense layers on `feature_samples` of those images (fewer while fewer exist); parameter norm; finiteness."""
    params, stats = state["params"], state["stats"]
    seen = member.class_rank < (task + 1) * static.classes_per_task
    x_test, y_test = data["x_test"], data["y_test"]
    test_seen = seen[y_test]

    def per_image(xy):
        x, y = xy
        logits, _, acts = forward(params, stats, x[None].astype(jnp.float32) / 255.0, False)
        loss, correct = masked_loss_acc(logits, y[None], seen)
        return loss[0], correct[0], [a[0] for a in acts["dense"]]

    loss, correct, feats = jax.lax.map(per_image, (x_test, y_test), batch_size=static.eval_batch)
    count = jnp.sum(test_seen)
    test_loss = jnp.sum(jnp.where(test_seen, loss, 0.0)) / count
    test_acc = jnp.sum(jnp.where(test_seen, correct, 0.0)) / count

    # A random subset of the seen test images; rows beyond the seen count are masked to 0, which changes
    # neither the dead-unit test (0 never makes a unit alive) nor the singular values.
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(member.seed), EVAL_STREAM), task)
    pick = jnp.argsort(jnp.where(test_seen, jax.random.uniform(key, y_test.shape), 2.0))[:static.feature_samples]
    valid = (jnp.arange(pick.shape[0]) < count)[:, None]
    feats = [f[pick] * valid for f in feats]
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
    return {"test_acc": test_acc, "test_loss": test_loss,
            "dead_units": jnp.stack([common.dead_units(f) for f in feats]),
            "effective_rank": common.effective_ranks(feats),
            "param_norm": common.param_norm(params),
            "finite": finite & jnp.isfinite(state["train_loss"])}


def hessian_spectrum(params, stats, member, task, x, y, key, static, num_iters, num_probes, batch):
    """SLQ of the masked cross-entropy (no L2/ER term) on images x of the task's new classes. BatchNorm runs in
    eval mode (running statistics), so the loss is a plain per-image average and does not depend on batching."""
    seen = member.class_rank < (task + 1) * static.classes_per_task

    def loss_fn(p):
        @jax.checkpoint  # recompute in the backward pass: memory grows with `batch`, not with len(x)
        def per_image(xy):
            logits = forward(p, stats, xy[0][None].astype(jnp.float32) / 255.0, False)[0]
            return masked_loss_acc(logits, xy[1][None], seen)[0][0]
        return jnp.mean(jax.lax.map(per_image, (x, y), batch_size=batch))

    return hessian.slq(loss_fn, params, key, num_iters, num_probes)


HESSIAN = jax.jit(hessian_spectrum, static_argnames=("static", "num_iters", "num_probes", "batch"))


# ----------------------------------------------------------------------------------------------------------
# Seed modes: run a single-member function for every member (leading axis of `state` and `member`)
# ----------------------------------------------------------------------------------------------------------
@jax.jit
def unstack(tree):
    """Split the leading (member) axis into a list of trees (one compiled program, not one op per leaf)."""
    return [jax.tree.map(lambda x: x[i], tree) for i in range(jax.tree.leaves(tree)[0].shape[0])]


@jax.jit
def stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.lru_cache(maxsize=None)
def member_runner(fn, mode, **static_kwargs):
    """fn(state, member, *shared, **static_kwargs) for every member, compiled once per (fn, mode, statics)."""
    one = functools.partial(fn, **static_kwargs)
    if mode == "vmap":
        return jax.jit(lambda s, m, *shared: jax.vmap(lambda s, m: one(s, m, *shared))(s, m))
    if mode == "map":
        return jax.jit(lambda s, m, *shared: jax.lax.map(lambda sm: one(sm[0], sm[1], *shared), (s, m)))
    single = jax.jit(one)

    def sequential(s, m, *shared):
        members = unstack(m)
        states = unstack(s) if s is not None else [None] * len(members)
        return stack([single(si, mi, *shared) for si, mi in zip(states, members)])
    return sequential


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def resolve_hyperparameters(args):
    """Configs (the sweep axis) and the scalar agent settings, with the agent's defaults filled in."""
    defaults = AGENT_DEFAULTS[args.agent]
    for field in ("weight_decay", "er_lr", "replacement_rate", "perturb_scale"):
        if getattr(args, field) is not None and field not in defaults:
            common.fail(f"--{field.replace('_', '-')} does not apply to agent {args.agent}")
    sweep = {"lr": args.lr or (DEFAULT_LR,)}
    for field in ("weight_decay", "er_lr"):
        if field in defaults:
            sweep[field] = getattr(args, field) or (defaults[field],)
    replacement_rate, perturb_scale = (getattr(args, k) if getattr(args, k) is not None else defaults.get(k, 0.0)
                                       for k in ("replacement_rate", "perturb_scale"))
    if not 0 <= replacement_rate < 1 or perturb_scale < 0:
        common.fail("--replacement-rate must be in [0, 1) and --perturb-scale >= 0")
    return common.sweep(**sweep), replacement_rate, perturb_scale


def validate(args):
    common.check_agent(args.agent, AGENTS)
    positive = ("seeds", "tasks", "classes_per_task", "epochs", "batch_size", "width", "dense_width", "er_batch",
                "feature_samples", "eval_batch", "lanczos_iters", "hessian_probes", "hessian_samples",
                "hessian_batch", "chunk_epochs")
    for field in positive:
        if getattr(args, field) < 1:
            common.fail(f"--{field.replace('_', '-')} must be >= 1, got {getattr(args, field)}")
    if args.tasks * args.classes_per_task > NUM_CLASSES:
        common.fail(f"--tasks x --classes-per-task must be <= 100, got {args.tasks} x {args.classes_per_task}")
    if args.hessian_every < 0 or args.maturity_threshold < 0 or not 0 <= args.decay_rate < 1:
        common.fail("--hessian-every and --maturity-threshold must be >= 0, --decay-rate in [0, 1)")
    if not 0 <= args.momentum < 1:
        common.fail(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.cbp_utility not in common.CBP_UTILITIES:
        common.fail(f"--cbp-utility must be one of {', '.join(common.CBP_UTILITIES)}, got {args.cbp_utility!r}")


def main(args):
    validate(args)
    configs, replacement_rate, perturb_scale = resolve_hyperparameters(args)
    jax.config.update("jax_default_matmul_precision", None if args.precision == "default" else "highest")
    seeds = list(range(args.seed, args.seed + args.seeds))
    C, S, T = len(configs), len(seeds), args.tasks
    data_np = synthetic_cifar100() if args.synthetic_data else load_cifar100(args.data_dir, args.manual_dir)
    train_per_class = len(data_np["y_train"]) // NUM_CLASSES
    steps_per_epoch = [train_per_class * args.classes_per_task * (t + 1) // args.batch_size for t in range(T)]
    if steps_per_epoch[0] < 1:
        common.fail(f"--batch-size {args.batch_size} exceeds the {train_per_class * args.classes_per_task} "
                    f"training images of the first task")
    if args.agent in ("er", "l2-er") and steps_per_epoch[0] < args.er_batch:
        common.fail(f"--er-batch {args.er_batch} exceeds the {steps_per_epoch[0]} minibatches of an epoch of task 1")

    # Members: config-major (member m = config m // S, seed m % S); class order drawn from the seed alone.
    config_index, member_seed = common.stack_members(configs, seeds)
    class_order = np.stack([np.random.default_rng(s).permutation(NUM_CLASSES) for s in seeds])
    class_rank = np.argsort(class_order, axis=1)
    member = Member(
        seed=jnp.asarray(member_seed, jnp.int32),
        class_rank=jnp.asarray(class_rank[np.asarray(member_seed) - args.seed], jnp.int32),
        lr=jnp.asarray([configs[c]["lr"] for c in config_index], jnp.float32),
        weight_decay=jnp.asarray([configs[c].get("weight_decay", 0.0) for c in config_index], jnp.float32),
        er_lr=jnp.asarray([configs[c].get("er_lr", 0.0) for c in config_index], jnp.float32),
        perturb_scale=jnp.full(len(config_index), perturb_scale, jnp.float32))
    static = Static(width=args.width, dense_width=args.dense_width, batch_size=args.batch_size,
                    momentum=float(args.momentum), classes_per_task=args.classes_per_task,
                    use_er=args.agent in ("er", "l2-er"), er_batch=args.er_batch, use_cbp=args.agent == "cbp",
                    replacement_rate=float(replacement_rate), decay_rate=float(args.decay_rate),
                    maturity_threshold=args.maturity_threshold, cbp_utility=args.cbp_utility,
                    use_snp=args.agent in ("snp", "snp-l2"),
                    feature_samples=min(args.feature_samples, len(data_np["y_test"])),
                    eval_batch=args.eval_batch)
    data = {k: jnp.asarray(v) for k, v in data_np.items()}
    # The seed mode matters for training; initialization and evaluation (once per task) run member by member,
    # compiled without the update rule's settings so that agents share them.
    run = functools.partial(member_runner, mode=args.seed_mode, static=static)
    rule_free = static._replace(use_er=False, er_batch=0, use_snp=False, replacement_rate=0.0, decay_rate=0.0,
                                maturity_threshold=0, cbp_utility="contribution")
    run_alone = functools.partial(member_runner, mode="sequential", static=rule_free)
    hessian_tasks = [t for t in range(T) if args.hessian_every and t % args.hessian_every == 0]
    hessian_n = min(args.hessian_samples, train_per_class * args.classes_per_task)

    run_dir, checkpoint = common.open_run("cifar", args, RESUME_FREE)
    layers = 2
    metrics = {k: np.full((C, S, T), np.nan, np.float32) for k in
               ("test_acc", "test_loss", "train_acc", "train_loss", "param_norm")}
    metrics.update({k: np.full((C, S, T, layers), np.nan, np.float32) for k in ("dead_units", "effective_rank")})
    spectra = {f"{phase}_{part}": np.full((C, S, len(hessian_tasks), args.hessian_probes, args.lanczos_iters),
                                          np.nan, np.float32)
               for phase in ("init", "end") for part in ("nodes", "weights")}
    diverged = np.zeros((C, S), bool)
    start_task, start_epoch = 0, 0
    if checkpoint is not None:
        state, start_task, start_epoch = checkpoint["state"], checkpoint["task"], checkpoint["epoch"]
        if start_task > T:
            common.fail(f"--resume: the run already has {start_task} tasks, more than --tasks {T}")
        for k, v in checkpoint["metrics"].items():
            metrics[k][:, :, :v.shape[2]] = np.asarray(v)[:, :, :T]
        for k, v in checkpoint["spectra"].items():
            spectra[k][:, :, :v.shape[2]] = np.asarray(v)[:, :, :len(hessian_tasks)]
        diverged = np.asarray(checkpoint["diverged"])
    else:
        state = run_alone(begin_task)(None, member, jnp.int32(0))
    common.save_config(run_dir, args, configs, seeds)

    def save_outputs(done_tasks):
        common.save_npz(run_dir / "metrics.npz", **{k: v[:, :, :done_tasks] for k, v in metrics.items()},
                        diverged=diverged, class_order=np.broadcast_to(class_order, (C, S, NUM_CLASSES)))
        if hessian_tasks:
            k = sum(t < done_tasks for t in hessian_tasks)
            common.save_npz(run_dir / "hessian.npz", tasks=np.asarray(hessian_tasks[:k]),
                            **{name: v[:, :, :k] for name, v in spectra.items()})

    def checkpoint_now(task, epoch):
        common.save_checkpoint(run_dir, {"args": asdict(args), "state": state,
                                         "task": task, "epoch": epoch, "metrics": metrics, "spectra": spectra,
                                         "diverged": diverged})

    def measure_spectra(phase, task):
        slot = hessian_tasks.index(task)
        states, members = unstack(state), unstack(member)
        for m in range(len(member_seed)):
            seed = int(member_seed[m])
            new = class_order[seed - args.seed][task * args.classes_per_task:(task + 1) * args.classes_per_task]
            pool = np.flatnonzero(np.isin(data_np["y_train"], new))
            pick = np.sort(np.random.default_rng([seed, task]).choice(pool, hessian_n, replace=False))
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), HESSIAN_STREAM),
                                     2 * task + (phase == "end"))
            nodes, weights = HESSIAN(states[m]["params"], states[m]["stats"], members[m],
                                     jnp.int32(task), data["x_train"][pick], data["y_train"][pick], key,
                                     static=rule_free, num_iters=args.lanczos_iters,
                                     num_probes=args.hessian_probes, batch=args.hessian_batch)
            c, s = divmod(m, S)
            spectra[f"{phase}_nodes"][c, s, slot] = np.asarray(nodes)
            spectra[f"{phase}_weights"][c, s, slot] = np.asarray(weights)

    def steps_done(task, epoch):  # per member
        return args.epochs * sum(steps_per_epoch[:task]) + epoch * steps_per_epoch[min(task, T - 1)]

    print(f"cifar {args.agent}: {len(member_seed)} members ({C} configs x {S} seeds, --seed-mode {args.seed_mode}) "
          f"on {jax.devices()[0].device_kind}; steps/s below counts the steps of all members", flush=True)
    progress = common.Progress(steps_done(T, 0), "step", start_units=steps_done(start_task, start_epoch))
    last_save = time.monotonic()
    for task in range(start_task, T):
        if start_epoch == 0:
            if args.agent == "reset" and task > 0:
                state = run_alone(begin_task)(None, member, jnp.int32(task))
            if task in hessian_tasks:
                measure_spectra("init", task)
        epoch = start_epoch
        while epoch < args.epochs:
            n = min(args.chunk_epochs, args.epochs - epoch)
            state = run(train_chunk)(state, member, data, jnp.int32(task), jnp.int32(epoch), jnp.int32(n),
                                     jnp.int32(steps_per_epoch[task]))
            jax.block_until_ready(state)
            epoch += n
            progress.update(steps_done(task, epoch), n * steps_per_epoch[task] * len(member_seed),
                            task=f"{task + 1}/{T}", epoch=f"{epoch}/{args.epochs}",
                            train_acc=float(jnp.nanmean(state["train_acc"])))
            if epoch < args.epochs and time.monotonic() - last_save >= 60 * args.checkpoint_minutes:
                checkpoint_now(task, epoch)
                last_save = time.monotonic()
        start_epoch = 0
        result = jax.device_get(run_alone(evaluate)(state, member, data, jnp.int32(task)))
        for k in metrics:
            source = state if k in ("train_acc", "train_loss") else result
            metrics[k][:, :, task] = np.asarray(source[k]).reshape((C, S) + metrics[k].shape[3:])
        diverged = common.report_diverged(np.asarray(result["finite"]).reshape(C, S), configs, seeds,
                                          f"task {task + 1}", known=diverged)
        if task in hessian_tasks:
            measure_spectra("end", task)
        save_outputs(task + 1)
        print(f"task {task + 1}/{T} done | test_acc {np.nanmean(metrics['test_acc'][:, :, task]):.4f} | "
              f"train_acc {np.nanmean(metrics['train_acc'][:, :, task]):.4f} | "
              f"dead_units {np.nanmean(metrics['dead_units'][:, :, task], axis=(0, 1))} | "
              f"effective_rank {np.nanmean(metrics['effective_rank'][:, :, task], axis=(0, 1)).round(1)}",
              flush=True)
        if time.monotonic() - last_save >= 60 * args.checkpoint_minutes:
            checkpoint_now(task + 1, 0)
            last_save = time.monotonic()
    checkpoint_now(T, 0)
    save_outputs(T)
    print(f"wrote {run_dir}", flush=True)
    return run_dir


if __name__ == "__main__":
    main(common.cli(Args))
