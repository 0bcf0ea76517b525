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

The agents are the table `AGENTS` below (Table 6's fixed-lr best values, Table 5's settings; a flag overrides
one): bp; l2 weight decay 1e-4 (coupled: added to the gradient); er ER lr 1e-4, --er-batch 5; l2-er weight
decay 1e-3, ER lr 1e-3; cbp replacement rate 1e-6, maturity 100, decay 0.99; snp noise 1e-5 (Table 5); snp-l2
noise 1e-5 + L2's weight decay 1e-4 (the paper gives none); reset: a freshly initialized network, BatchNorm
statistics and optimizer at every task. Beyond the paper's table: layernorm-l2 and spectral-reg as the authors'
later runs (their code; lr 1e-2 for both): LayerNorm (scale 1, shift 0, eps 1e-6) before the ReLU of the two
dense layers only (the trunk keeps BatchNorm, the head has none) + coupled L2 1e-4 on every parameter, LayerNorm
and BatchNorm scales included / lambda 1e-2 x (sum over every kernel, convs as (kh*kw*in, out) and the head
included, of (sigma_max^2 - 2)^2 by 10 power iterations from fixed vectors + squared biases and BatchNorm shifts
+ (BatchNorm scale - 1)^2; running statistics not), no weight decay (--spectral-persistent True --power-iters 1:
our cheaper variant); redo: ReDo (Sokar et al. 2023) every 1000 minibatch steps of a task with tau 0.025 (no source
gives values for CIFAR; ours, from our pMNIST sweep) at BP's learning rate. Seeds (--seeds) and swept values
(--lr, --weight-decay, --er-lr) are "members" trained together: --member-batching map (auto's choice on one CPU
device) calls one compiled single-member program per member, vmap (auto's choice elsewhere) batches them in
one program (measured 2.2x slower per seed than one member after another for this ResNet on an H100: pass map
there). Each jitted call runs --call-steps minibatch steps per member, so Ctrl-C stops within one call and
--resume continues.

Choices where the paper is silent or the sources disagree:
- Input (the authors' code, on which Table 6's learning rates were tuned): pixels scaled to [0, 1], nothing
  subtracted or divided (their loader applies ToTensor only).
- Init (the authors' flax ResNet-18, variance_scaling(2.0 | 1.0, "fan_out", "truncated_normal")): convolutions
  (stem, block convs, 1x1 skips) He-normal on fan-out, variance 2 / (kh x kw x c_out); the two dense layers and
  the head variance 1 / fan-out (the output width); each a normal truncated at 2 std, rescaled to exactly that
  variance. Biases 0, BatchNorm scale 1 and shift 0.
- ER (App. D; the authors' code): before every group of --er-batch (5) minibatches of an epoch, one plain ascent
  step params += er_lr * grad(mean effective rank) outside the optimizer, on the post-ReLU features of the two
  dense layers for the group's images (500), then the group's SGD steps (the authors' order). BatchNorm runs in
  training mode on those images' batch statistics, and its running statistics are updated from them as in an
  SGD step (the authors' ER pass writes Flax's batch_stats back). Minibatches at an epoch's end that make no
  whole group get no ER step.
- CBP (--cbp-variant dohare, the default) follows Dohare et al.'s ResNet CBP for this benchmark (their
  res_gnt.py), not their MLP algorithm: units are the channels of every convolution but the 1x1 skips (the
  stem, and both convs of every block: conv a's inner channels and conv b's, i.e. the residual stream, whose
  features are the block's output after the residual sum and ReLU) and, our extension of their rule "every
  weight layer but the output one" to the authors' dense head, the units of dense1 and dense2 (their ResNet
  has only the output layer after the pool; the authors' CBP covers both dense layers too). Utility: mean|w_out|
  x a running sum of 0.01 x mean|h| that is never decayed nor reset (theirs); once any unit is mature, rate x
  #units accumulates and the lowest-utility mature units go. A replaced unit gets a Kaiming-normal filter
  N(0, 2 / fan_in), bias 0, zero outgoing weights in the next weight layer (the next block's conv a, or dense1
  after the last block; the identity and skip paths that also read a residual channel keep it, as theirs),
  and its BatchNorm scale 1, shift 0, running mean 0, variance 1; momentum is not reset (theirs). The paper's
  CBP number (0.37) came from the authors' code, which differs: --cbp-variant paper runs it (`cbp_layers`,
  `cbp_step`): the highest-utility units among the blocks' inner channels and the dense layers (their reach),
  utility |mean h| x mean|w_out| without bias correction (a block without a 1x1 skip feeds its second
  BatchNorm's pre-residual output as h, as their code), incoming and outgoing weights redrawn
  U(+-sqrt(6 / kernel.shape[0])) (sqrt(2) for a 3x3 conv: their code reads an HWIO kernel's height as its
  fan-in; one value shared by the 3 x 3 taps, as their masks broadcast), bias 0, BatchNorm, its statistics and
  the momentum untouched.
- ReDo (Sokar et al. score mean|h_i| / layer mean, on post-ReLU outputs, a conv channel over all positions): on
  the step's minibatch with the updated parameters (BatchNorm on its batch statistics), recycling each block's
  inner channels and the dense units (the authors' CBP's units): fresh incoming weights from the layer's init,
  zero outgoing weights, BatchNorm and running statistics reset, momentum zeroed. A residual-stream channel feeds
  later layers through identity paths as well as kernels, so it has no one outgoing kernel to zero; it is not
  recycled. The head is never recycled.
- --precision default lets GPUs use TF32 tensor cores for float32 convolutions and matmuls (as PyTorch does for
  convolutions); highest forces full float32 products.

Data (data.py): tensorflow-datasets cifar100 the first time (downloads; needs tensorflow), or offline: put the
official cifar-100-python.tar.gz (or cifar-100-binary.tar.gz) in a folder and pass --manual-dir FOLDER (read
directly, no tensorflow). Either way the arrays are cached as <--data-dir>/cifar100.npz (default
$TFDS_DATA_DIR or ~/tensorflow_datasets), and later runs read only that file. --synthetic-data: random images
of the same shapes (timing only).

Outputs (run directory runs/cifar__<agent>__<UTC time>/ or --out-dir):
- metrics.npz, axes [config, seed, task]: test_acc, test_loss (all test images of the seen classes, BatchNorm
  in eval mode); train_acc, train_loss (mean over the last epoch's minibatches, each measured before its
  update; the cross-entropy only, no penalty); param_norm; dead_units and effective_rank [config, seed, task,
  2] (the two dense layers, eval mode, on every test image of the seen classes as the authors' code;
  --feature-samples N: on a random N of them); diverged [config, seed]; class_order [config, seed, 100].
- hessian.npz (--hessian-every K; Fig. 13 used 1): tasks (0-based) and init_/end_ nodes and weights [config,
  seed, K', probes, lanczos_iters (16, the paper's for CIFAR)]: SLQ of the masked cross-entropy (no L2 or ER
  term) on --hessian-samples (2000) training images of the task's newly added classes, BatchNorm in eval mode
  (so the loss is a per-image average). init = the network that starts the task (for reset the fresh one),
  end = after it.
- config.json; checkpoint.pkl (every --checkpoint-minutes, also in the middle of a task, at the end and on
  Ctrl-C / SIGTERM; --resume --out-dir RUN continues it).

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

import math  # noqa: E402 (after the environment is set)
import sys
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import data
import hessian
import runner

# The agents (App. D and I; Table 6 "Fixed LR Best" with lr 0.01, Table 5's settings). An agent is its entry: the
# hyperparameters it uses, with their defaults; a flag overrides one. A key switches its mechanism on:
# weight_decay -> coupled L2, er_lr -> the ER step, replacement_rate -> continual backprop (Dohare et al. 2024),
# perturb_scale -> Shrink & Perturb (Ash & Adams 2020), reset -> a fresh network at every task (no flag),
# layer_norm -> LayerNorm before the two dense layers' ReLU (no flag), spectral_lambda -> the spectral penalty
# (Lewandowski et al. 2024), redo_tau -> ReDo (Sokar et al. 2023).
AGENTS = {
    "bp": {},
    "l2": dict(weight_decay=1e-4),
    "er": dict(er_lr=1e-4, er_batch=5),
    "l2-er": dict(weight_decay=1e-3, er_lr=1e-3, er_batch=5),  # the paper's method (Algorithm 1)
    "cbp": dict(replacement_rate=1e-6, decay_rate=0.99, maturity_threshold=100, cbp_utility="contribution",
                cbp_variant="dohare"),
    "snp": dict(perturb_scale=1e-5),
    "snp-l2": dict(perturb_scale=1e-5, weight_decay=1e-4),  # the paper gives no weight decay for it: L2's
    "reset": dict(reset=True),
    # The authors' later runs (their code; lr 1e-2 for both): LayerNorm in the dense head + L2 on every parameter;
    # the spectral penalty with sigma_max^2 pulled to 2, 10 power iterations from fixed vectors, no weight decay.
    "layernorm-l2": dict(layer_norm=True, weight_decay=1e-4),
    "spectral-reg": dict(spectral_lambda=1e-2, spectral_k=2.0, spectral_target=2.0, power_iters=10,
                         spectral_persistent=False),
    "redo": dict(redo_tau=0.025, redo_every=1000),  # Sokar et al. 2023; no source value: our pMNIST sweep's
}
SWEPT = ("lr", "weight_decay", "er_lr")  # traced hyperparameters: several values train together as configs


@dataclass(frozen=True)
class Args:
    agent: Literal[tuple(AGENTS)] = "bp"
    """algorithm: an entry of AGENTS (its defaults are the paper's Table 6 fixed-lr best values)"""
    seed: int = 0
    """first seed; seeds seed .. seed+seeds-1 train together"""
    seeds: int = 1
    """number of seeds"""
    tasks: int = 20
    """number of tasks (each adds --classes-per-task classes; 20 x 5 = all 100 classes)"""
    classes_per_task: int = 5
    """classes added per task"""
    epochs: int = 200
    """epochs per task over all training images of the seen classes"""
    batch_size: int = 100
    """minibatch size"""
    lr: tuple[float, ...] = (0.01,)
    """SGD learning rate(s) (Table 6); several values sweep"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: tuple[float, ...] | None = None
    """coupled L2 weight decay(s), added to the gradient (agents with weight_decay in AGENTS); several values sweep"""
    er_lr: tuple[float, ...] | None = None
    """effective-rank ascent step size(s) (agents with er_lr); several values sweep"""
    er_batch: int | None = None
    """ER ascent step before every group of this many minibatches of an epoch, on their images (the authors' order; agents with er_lr; Table 5: 5)"""
    replacement_rate: float | None = None
    """CBP (agent cbp): units replaced per step, per unit of the layer once one is mature (dohare, Dohare et al.'s ResNet CBP) or per mature unit (paper) (Table 6: 1e-6)"""
    decay_rate: float | None = None
    """CBP: decay of the running utility (Table 5: 0.99)"""
    maturity_threshold: int | None = None
    """CBP: steps before a unit may be replaced (Table 5: 100)"""
    cbp_utility: Literal[common.CBP_UTILITIES] | None = None
    """CBP utility: contribution (Dohare et al.'s ResNet CBP has no other; not with --cbp-variant paper)"""
    cbp_variant: Literal[common.CBP_VARIANTS] | None = None
    """CBP algorithm: dohare (Dohare et al.'s ResNet CBP: stem, both convs of every block and the dense layers, lowest utility, outgoing weights 0, BatchNorm reset) or paper (the authors' code behind the paper's CBP number: block inner channels and dense layers, highest utility, outgoing weights re-randomized)"""
    perturb_scale: float | None = None
    """std of the Gaussian noise added to every parameter after each step (Shrink & Perturb: snp, snp-l2; Table 5: 1e-5)"""
    spectral_lambda: float | None = None
    """weight of the spectral penalty: sum over kernels of (sigma_max^k - target)^2, plus squared biases and (BatchNorm scale - 1)^2 (Lewandowski et al. 2024; default: the authors' chosen 1e-2)"""
    spectral_k: float | None = None
    """power of sigma_max in the spectral penalty (the authors: 2)"""
    spectral_target: float | None = None
    """target of sigma_max^k (the authors: 2; Lewandowski et al.'s "close to one": 1)"""
    power_iters: int | None = None
    """power iterations per kernel and step for sigma_max, from a fixed start vector (the authors: 10)"""
    spectral_persistent: bool | None = None
    """start each step's power iterations from the last step's vectors (carried in the state) instead of the fixed ones; with --power-iters 1 it costs ~1/10 (our option, not the authors')"""
    redo_tau: float | None = None
    """ReDo: recycle units whose score mean|h_i| / (layer mean of mean|h_k|) is <= tau (our choice, from pMNIST's sweep; no source gives one for CIFAR)"""
    redo_every: int | None = None
    """ReDo: score and recycle every K minibatch steps of a task, on that step's minibatch (our choice, from pMNIST's sweep)"""
    width: int = 64
    """channels of the stem and first stage (stages use 1x, 2x, 4x, 8x); 64 is the paper's ResNet-18"""
    dense_width: int = 512
    """units of each of the two dense layers before the head"""
    feature_samples: int = 0
    """test images of the seen classes on which dead units and effective rank are measured: 0 = all of them (up to 10,000; the authors' code), N = a random N of them (fewer while fewer exist)"""
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
    data_dir: str | None = None
    """folder of the cached arrays (cifar100.npz) and of tensorflow-datasets' files (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"""
    manual_dir: str | None = None
    """folder holding the official cifar-100-python.tar.gz or cifar-100-binary.tar.gz (offline preparation)"""
    synthetic_data: bool = False
    """random images and labels with CIFAR-100's shapes and class sizes instead of the data set (timing only)"""
    out_dir: str | None = None
    """run folder (default runs/cifar__<agent>__<UTC time>); with --resume, the run to continue"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint"""
    checkpoint_minutes: float = 10.0
    """minutes of work between checkpoints (one is also written at the end and on Ctrl-C)"""
    call_steps: int = 200
    """minibatch steps per member in one jitted call: Ctrl-C and checkpoints wait at most one call (results do not depend on it; fixed for a run, as --resume counts calls)"""
    member_batching: Literal[runner.MEMBER_BATCHING] = "auto"
    """how seeds x configs run together: vmap (one batched program) or map (one member after another); auto = map on one CPU device, else vmap"""
    distributed: bool = False
    """join a job of several processes (hosts) that SLURM or Open MPI started (srun, mpirun): the members spread over every process's devices"""
    coordinator: str | None = None
    """HOST:PORT of process 0 of a job of several processes started by hand (with --num-processes and --process-id)"""
    num_processes: int | None = None
    """processes in the job (with --coordinator)"""
    process_id: int | None = None
    """this process's index in the job, 0 .. num-processes - 1 (with --coordinator)"""


# Args that may change between a run and its --resume (speed, memory, paths, more tasks; vmap and map round
# differently, the results stay the same up to float rounding).
RESUME_FREE = ("tasks", "resume", "out_dir", "checkpoint_minutes", "data_dir", "manual_dir", "member_batching",
               "eval_batch", "hessian_batch")
RENAMED = {"--seed-mode": "--member-batching (its sequential is now map)",
           "--chunk-epochs": "--call-steps (minibatch steps per call)"}
NUM_CLASSES = 100
PRINT_SECONDS = 60  # a progress line at the end of every task, and in between at most once a minute


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
    holds the stem's post-ReLU output ("stem"), each block's inner post-ReLU channels ("blocks"), its second
    BatchNorm's output before the residual sum ("pre_residual") and its output ("outputs", after the residual
    sum and ReLU), and the dense features ("dense")."""
    relu = jax.nn.relu
    new_stats = {"blocks": []}
    h, new_stats["stem"] = conv_bn_apply(params["stem"], stats["stem"], x, 1, train)
    h = relu(h)
    stem, inner, pre_residual, outputs = h, [], [], []
    for p, s in zip(params["blocks"], stats["blocks"]):
        stride = 2 if "skip" in p else 1
        ns = {}
        a, ns["a"] = conv_bn_apply(p["a"], s["a"], h, stride, train)
        a = relu(a)
        inner.append(a)
        b, ns["b"] = conv_bn_apply(p["b"], s["b"], a, 1, train)
        pre_residual.append(b)
        skip = h
        if "skip" in p:
            skip, ns["skip"] = conv_bn_apply(p["skip"], s["skip"], h, stride, train)
        h = relu(b + skip)
        outputs.append(h)
        new_stats["blocks"].append(ns)
    dense = []
    h = jnp.mean(h, axis=(1, 2))
    for p in (params["dense1"], params["dense2"]):
        h = h @ p["w"] + p["b"]
        if "scale" in p:  # layernorm-l2: LayerNorm before the ReLU (the authors' CIFAR runs: the dense head only)
            h = common.layer_norm(h, p["scale"], p["shift"])
        h = relu(h)
        dense.append(h)
    logits = h @ params["head"]["w"] + params["head"]["b"]
    return logits, new_stats, {"stem": stem, "blocks": inner, "pre_residual": pre_residual, "outputs": outputs,
                               "dense": dense}


def spectral_key_ids(params):
    """Each kernel's start-vector key (common.spectral_starts), listed in our leaf order, as the authors' counter
    gives it: our leaves sort the blocks (each a, b, skip), dense1, dense2, head, then the stem; the authors'
    Flax names sort BasicBlock_0..7 (each Conv_0, Conv_1, Identity), the stem's Conv_0, then Dense_0..2. So the
    blocks' convs keep their places and the stem takes its key before the dense layers'."""
    n = sum(name in block for block in params["blocks"] for name in ("a", "b", "skip"))
    return list(range(n)) + [n + 1, n + 2, n + 3, n]


def masked_loss_acc(logits, labels, seen):
    """Cross-entropy and correctness per sample with unseen classes' logits replaced by a large negative number."""
    logits = jnp.where(seen, logits, MASKED_LOGIT)
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return loss, (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)



# ----------------------------------------------------------------------------------------------------------
# One member (a config x seed). Its randomness comes from jax.random.key(seed) and its class order from the seed
# alone, never from its position among the members, so a seed run alone reproduces the same member of a sweep.
# ----------------------------------------------------------------------------------------------------------
INIT_STREAM, TRAIN_STREAM, EVAL_STREAM, HESSIAN_STREAM = 1, 2, 3, 4  # folded into the seed's key


def class_order(seed):
    """The seed's order of the 100 classes (numpy's generator, on the host)."""
    return np.random.default_rng(seed).permutation(NUM_CLASSES)


def steps_per_epoch(args, per_class, task):
    """Minibatches in an epoch of task `task` (0-based; the remainder of the seen images is dropped)."""
    return per_class * args.classes_per_task * (task + 1) // args.batch_size


def cbp_layer_sizes(params):
    """Units of ReDo's layers (and of the authors' CBP, --cbp-variant paper): each block's inner channels, then
    the two dense layers."""
    return ([b["a"]["conv"]["w"].shape[-1] for b in params["blocks"]]
            + [params[name]["w"].shape[1] for name in ("dense1", "dense2")])


class UnitLayer(NamedTuple):
    """One layer of CBP's units: paths into params of its incoming layer ({"w", "b"}) and of the kernel that
    reads its units (`out_axis`: their axis there), the path of its BatchNorm in params and stats (None:
    none), and where its features are in `forward`'s activations (key, index or None)."""
    incoming: tuple
    outgoing: tuple
    out_axis: int
    bn: tuple | None
    features: tuple


def cbp_layers(params, variant):
    """CBP's unit layers. dohare (Dohare et al.'s ResNet CBP, their res_gnt.py): every weight layer but the head
    and the 1x1 skips, in the network's order: the stem (features: its post-ReLU output; outgoing: block 0's
    conv a), then per block conv a (its inner channels; outgoing conv b) and conv b (features: the block's
    output after the residual sum and ReLU; outgoing: the next block's conv a, or dense1 after the last block;
    the identity and skip paths that also read the channel are left as they are, as theirs), then dense1 and
    dense2 (outgoing dense2, head). paper (the authors' incremental_cifar/cbp.py): each block's inner channels
    and the two dense layers (`cbp_layer_sizes`); their code feeds a block without a 1x1 skip the block's
    second BatchNorm output (pre-residual) as the inner channels' activation, so those utilities are |its
    batch mean| = |that BatchNorm's shift|; followed here. (Their code also scores the 1x1 skips' input channels,
    but replacing those only resets their own statistics, never a weight: left out.)"""
    blocks = params["blocks"]
    if variant == "paper":
        layers = [UnitLayer(("blocks", i, "a", "conv"), ("blocks", i, "b", "conv", "w"), 2, None,
                            ("blocks" if "skip" in b else "pre_residual", i)) for i, b in enumerate(blocks)]
    else:
        conv_a = [("blocks", i, "a") for i in range(len(blocks))]
        reads = conv_a + [("dense1",)]  # what reads the stem, then each block's output
        layers = [UnitLayer(("stem", "conv"), reads[0] + ("conv", "w"), 2, ("stem",), ("stem", None))]
        for i in range(len(blocks)):
            layers.append(UnitLayer(conv_a[i] + ("conv",), ("blocks", i, "b", "conv", "w"), 2, conv_a[i],
                                    ("blocks", i)))
            nxt = reads[i + 1]
            last = i + 1 == len(blocks)  # the last block's output is pooled into dense1
            layers.append(UnitLayer(("blocks", i, "b", "conv"), nxt + (("w",) if last else ("conv", "w")),
                                    0 if last else 2, ("blocks", i, "b"), ("outputs", i)))
    return layers + [UnitLayer(("dense1",), ("dense2", "w"), 0, None, ("dense", 0)),
                     UnitLayer(("dense2",), ("head", "w"), 0, None, ("dense", 1))]


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def make_train(args, agent, ds):
    """The run's functions of one member (PureJaxRL's make_train). init(seed, task) -> state: a fresh network,
    BatchNorm statistics and optimizer (the run's start, and RESET's every task; `task` picks the init's random
    stream). train(state, hp, seed, classes, data, task, first, count) -> state after the task's minibatch steps
    first .. first + count - 1, counted across its epochs. evaluate(state, seed, classes, data, task) -> metrics.
    spectrum(state, seed, classes, data, task, phase, images) -> SLQ (nodes, weights). On the host: calls(task),
    the (first, count) that make up a task, and hessian_images(seeds, task), each member's Hessian images.
    `classes` [100] is each class's place in the member's class order; `data` holds the device arrays (an
    argument: an array the functions closed over would be compiled into the program as a constant); `ds` the
    same on the host; `agent` is the resolved AGENTS entry."""
    B, cpt, per_class = args.batch_size, args.classes_per_task, len(ds["y_train"]) // NUM_CLASSES
    feature_samples, y_host = min(args.feature_samples, len(ds["y_test"])), np.asarray(ds["y_train"])  # 0: all

    def optimizer(hp):
        return common.sgd(hp["lr"], hp["weight_decay"], args.momentum)

    def init(seed, task):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), INIT_STREAM), task)
        params, stats = init_net(key, args.width, args.dense_width)
        if agent.get("layer_norm"):  # LayerNorm's scale 1 and shift 0 in the two dense layers, none in the head
            n = args.dense_width
            params = {**params, **{name: {**params[name], "scale": jnp.ones(n), "shift": jnp.zeros(n)}
                                   for name in ("dense1", "dense2")}}
        zero = jnp.zeros(())
        state = {"params": params, "stats": stats, "opt": optimizer({"lr": 0.0, "weight_decay": 0.0}).init(params),
                 "train_acc": zero, "train_loss": zero, "acc_sum": zero, "loss_sum": zero}
        if agent.get("spectral_persistent"):
            state["spectral_v"] = common.spectral_starts(params, spectral_key_ids(params))
        if "replacement_rate" in agent:
            state["cbp"] = [common.cbp_init(_at(params, layer.incoming)["b"].shape[0])
                            for layer in cbp_layers(params, agent["cbp_variant"])]
        return state

    def loss_fn(params, stats, x, y, seen, starts):
        """The minibatch's mean masked cross-entropy, plus spectral-reg's penalty; returns (objective, (cross-entropy,
        new BatchNorm statistics, activations, accuracy, the power iterations' last vectors))."""
        logits, new_stats, acts = forward(params, stats, x, True)
        loss, correct = masked_loss_acc(logits, y, seen)
        loss = objective = jnp.mean(loss)
        vectors = None
        if "spectral_lambda" in agent:
            # `params` holds exactly what the penalty covers: kernels "w" (convs as (kh*kw*in, out), the head too),
            # biases "b" and BatchNorm shifts "bias" (squared), BatchNorm scales "scale" (pulled to 1). BatchNorm's
            # running statistics live in `stats`, outside it, so they are not penalized.
            penalty, vectors = common.spectral_penalty(params, agent["spectral_k"], agent["spectral_target"],
                                                       agent["power_iters"], starts, spectral_key_ids(params))
            objective = loss + agent["spectral_lambda"] * penalty
        return objective, (loss, new_stats, acts, jnp.mean(correct), vectors)

    def er_step(params, stats, data, order, b, er_lr):
        """ER ascent (App. D; the authors' code) on the images of the epoch's minibatches b .. b + er_batch - 1,
        before their SGD steps: BatchNorm in training mode on those images' batch statistics, and the running
        statistics updated from them, as the authors' ER pass (Flax's mutable batch_stats, written back).
        Returns (params, stats)."""
        window = jax.lax.dynamic_slice(order, (b * B,), (agent["er_batch"] * B,))
        x = data["x_train"][window].astype(jnp.float32) / 255.0

        def features(p, x):  # (the dense features, the running statistics after this pass)
            _, new_stats, acts = forward(p, stats, x, True)
            return acts["dense"], new_stats

        params, _, stats = common.er_ascent(params, features, x, er_lr, has_aux=True)
        return params, stats

    def sgd_step(state, hp, data, seen, order, epoch_key, b, task_step, steps):
        """Minibatch b of an epoch of `steps` (the task's minibatch step task_step): before every er_batch-th
        minibatch (b = 0, er_batch, ...; a whole group left) the ER step on the group's images (the authors'
        order), then an SGD step (momentum, coupled L2) on the masked cross-entropy (+ the spectral penalty),
        Shrink & Perturb's noise, continual backprop, and after every redo_every-th step of the task ReDo."""
        if "er_lr" in agent:
            er_batch = agent["er_batch"]
            params, stats = jax.lax.cond((b % er_batch == 0) & (b + er_batch <= steps),
                                         lambda p, s: er_step(p, s, data, order, b, hp["er_lr"]),
                                         lambda p, s: (p, s), state["params"], state["stats"])
            state = {**state, "params": params, "stats": stats}
        idx = jax.lax.dynamic_slice(order, (b * B,), (B,))
        x = data["x_train"][idx].astype(jnp.float32) / 255.0
        (_, (loss, stats, acts, acc, vectors)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["stats"], x, data["y_train"][idx], seen, state.get("spectral_v"))
        opt = optimizer(hp)
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        step_key = jax.random.fold_in(epoch_key, b)
        state = {**state, "loss_sum": state["loss_sum"] + loss, "acc_sum": state["acc_sum"] + acc}
        if "spectral_v" in state:  # --spectral-persistent: the next step starts from these vectors
            state["spectral_v"] = vectors
        if "perturb_scale" in agent:
            params = common.shrink_perturb(params, jax.random.fold_in(step_key, 0), agent["perturb_scale"])
        if "replacement_rate" in agent:
            params, stats, opt_state, state["cbp"] = cbp_step(agent, opt, params, stats, opt_state, state["cbp"],
                                                              acts, jax.random.fold_in(step_key, 1))
        if "redo_tau" in agent:  # ReDo on this minibatch's images, scored with the updated parameters
            params, stats, opt_state = jax.lax.cond(
                (task_step + 1) % agent["redo_every"] == 0,
                lambda p, s, o: redo_step(agent, opt, p, s, o, x, jax.random.fold_in(step_key, 2)),
                lambda p, s, o: (p, s, o), params, stats, opt_state)
        return {**state, "params": params, "stats": stats, "opt": opt_state}

    def train_epoch(state, hp, data, seen, epoch_key, lo, hi, steps, first_step):
        """Minibatches lo .. hi - 1 of an epoch whose minibatch 0 is the task's step first_step; at its end, its
        mean training loss and accuracy."""
        # A random order of the seen images: unseen ones get keys above every seen one, so they sort last.
        y = data["y_train"]
        order = jnp.argsort(jnp.where(seen[y], jax.random.uniform(epoch_key, y.shape), 2.0))
        state = {**state, **{k: jnp.where(lo == 0, 0.0, state[k]) for k in ("loss_sum", "acc_sum")}}
        state = jax.lax.fori_loop(lo, hi, lambda b, s: sgd_step(s, hp, data, seen, order, epoch_key, b,
                                                                first_step + b, steps), state)
        done = hi == steps
        return {**state, "train_loss": jnp.where(done, state["loss_sum"] / steps, state["train_loss"]),
                "train_acc": jnp.where(done, state["acc_sum"] / steps, state["train_acc"])}

    def train(state, hp, seed, classes, data, task, first, count):
        seen = classes < (task + 1) * cpt  # [100]
        train_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), TRAIN_STREAM), task)
        steps = steps_per_epoch(args, per_class, task)

        def epoch(e, state):  # the call's steps that fall in epoch e
            lo, hi = jnp.clip(first - e * steps, 0, steps), jnp.clip(first + count - e * steps, 0, steps)
            return train_epoch(state, hp, data, seen, jax.random.fold_in(train_key, e), lo, hi, steps, e * steps)

        return jax.lax.fori_loop(first // steps, (first + count - 1) // steps + 1, epoch, state)

    def evaluate(state, seed, classes, data, task):
        """Test loss and accuracy over every test image of the seen classes (BatchNorm in eval mode); dead units
        and effective rank of the dense layers on all those images (the authors') or on feature_samples of them
        (fewer while fewer exist); the last epoch's training loss and accuracy; parameter norm; finiteness."""
        params, stats = state["params"], state["stats"]
        seen = classes < (task + 1) * cpt
        x_test, y_test = data["x_test"], data["y_test"]
        test_seen = seen[y_test]

        def per_image(xy):
            x, y = xy
            logits, _, acts = forward(params, stats, x[None].astype(jnp.float32) / 255.0, False)
            loss, correct = masked_loss_acc(logits, y[None], seen)
            return loss[0], correct[0], [a[0] for a in acts["dense"]]

        # Every test image in chunks of eval_batch (static shapes whatever the number of seen classes); the
        # features of all of them are kept ([10,000, dense_width] per layer: 20 MB at 512).
        loss, correct, feats = jax.lax.map(per_image, (x_test, y_test), batch_size=args.eval_batch)
        count = jnp.sum(test_seen)
        # Rows of images outside the sample are set to 0, which changes neither the dead-unit test (0 never makes
        # a unit alive) nor the singular values.
        if feature_samples:  # a random subset of the seen test images (--feature-samples N)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), EVAL_STREAM), task)
            pick = jnp.argsort(jnp.where(test_seen, jax.random.uniform(key, y_test.shape), 2.0))[:feature_samples]
            feats = [f[pick] * (jnp.arange(pick.shape[0]) < count)[:, None] for f in feats]
        else:  # every test image of the seen classes (the authors' code)
            feats = [f * test_seen[:, None] for f in feats]
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
        return {"test_acc": jnp.sum(jnp.where(test_seen, correct, 0.0)) / count,
                "test_loss": jnp.sum(jnp.where(test_seen, loss, 0.0)) / count,
                "train_acc": state["train_acc"], "train_loss": state["train_loss"],
                "dead_units": jnp.stack([common.dead_units(f) for f in feats]),
                "effective_rank": common.effective_ranks(feats), "param_norm": common.param_norm(params),
                "finite": finite & jnp.isfinite(state["train_loss"])}

    def spectrum(state, seed, classes, data, task, phase, images):
        """SLQ of the masked cross-entropy (no L2/ER term) on training images `images` of the task's new classes;
        phase 0 = task init, 1 = task end. BatchNorm runs in eval mode (running statistics), so the loss is a
        plain per-image average and does not depend on batching."""
        params, stats = state["params"], state["stats"]
        seen = classes < (task + 1) * cpt
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), HESSIAN_STREAM), 2 * task + phase)

        def loss_fn(p):
            @jax.checkpoint  # recompute in the backward pass: memory grows with hessian_batch, not with the images
            def per_image(xy):
                logits = forward(p, stats, xy[0][None].astype(jnp.float32) / 255.0, False)[0]
                return masked_loss_acc(logits, xy[1][None], seen)[0][0]
            xy = (data["x_train"][images], data["y_train"][images])
            return jnp.mean(jax.lax.map(per_image, xy, batch_size=args.hessian_batch))

        return hessian.slq(loss_fn, params, key, args.lanczos_iters, args.hessian_probes)

    def calls(task):
        total = args.epochs * steps_per_epoch(args, per_class, task)
        return [(first, min(args.call_steps, total - first)) for first in range(0, total, args.call_steps)]

    def hessian_images(seeds, task):
        """[members, n]: hessian_samples training images of the task's new classes per member, drawn from
        (seed, task) on the host."""
        picks = []
        for seed in np.asarray(seeds).tolist():
            pool = np.flatnonzero(np.isin(y_host, class_order(seed)[task * cpt:(task + 1) * cpt]))
            rng = np.random.default_rng([seed, task])
            picks.append(np.sort(rng.choice(pool, min(args.hessian_samples, len(pool)), replace=False)))
        return np.stack(picks)

    return init, train, evaluate, spectrum, calls, hessian_images


def unit_inits(params, key):
    """The init (`predrawn_init`) of the incoming kernel of each unit layer (`cbp_layer_sizes`' order): all ten
    layers' candidates come from one draw of a standard truncated normal, since ten random-number kernels
    compiled ~10 s slower (CPU)."""
    shapes = [b["a"]["conv"]["w"].shape for b in params["blocks"]]
    shapes += [params[name]["w"].shape for name in ("dense1", "dense2")]
    sizes = [math.prod(shape) for shape in shapes]
    standard = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),))
    return [predrawn_init(standard[o:o + n]) for o, n in zip(np.cumsum([0] + sizes), sizes)]


def replace_units(params, stats, masks, i, idx, valid, key, init):
    """Re-initialize units idx[valid] of unit layer i (`cbp_layer_sizes`' order), in place (pass fresh
    containers): incoming weights from `init`, bias 0, outgoing weights 0 (the network's output is unchanged); a
    block's inner channel also gets BatchNorm scale 1, shift 0, running mean 0 and variance 1. `masks`
    (params-shaped, 1 = kept) gets 0 at every replaced entry, to zero their optimizer state."""
    num_blocks = len(params["blocks"])
    if i < num_blocks:
        p, m = params["blocks"][i], masks["blocks"][i]
        (p["a"]["conv"]["w"], p["a"]["conv"]["b"], p["b"]["conv"]["w"], m["a"]["conv"]["w"],
         keep, m["b"]["conv"]["w"]) = common.cbp_replace(key, p["a"]["conv"]["w"], p["a"]["conv"]["b"],
                                                         p["b"]["conv"]["w"], idx, valid, out_unit_axis=2, init=init)
        m["a"]["conv"]["b"] = m["a"]["bn"]["scale"] = m["a"]["bn"]["bias"] = keep
        p["a"]["bn"]["scale"] = p["a"]["bn"]["scale"] * keep + (1 - keep)
        p["a"]["bn"]["bias"] = p["a"]["bn"]["bias"] * keep
        s = stats["blocks"][i]["a"]
        s["mean"], s["var"] = s["mean"] * keep, s["var"] * keep + (1 - keep)
    else:
        name, nxt = ("dense1", "dense2") if i == num_blocks else ("dense2", "head")
        params[name]["w"], params[name]["b"], params[nxt]["w"], keep_in, keep_b, keep_out = common.cbp_replace(
            key, params[name]["w"], params[name]["b"], params[nxt]["w"], idx, valid, init=init)
        # dense2's incoming weights are also dense1's outgoing ones: masks multiply
        masks[name]["w"], masks[name]["b"] = masks[name]["w"] * keep_in, masks[name]["b"] * keep_b
        masks[nxt]["w"] = masks[nxt]["w"] * keep_out


def cbp_step(agent, opt, params, stats, opt_state, cbp, acts, key):
    """Continual backprop after an SGD step on the units of `cbp_layers`. dohare (default): Dohare et al.'s
    ResNet CBP (common.cbp_select_resnet): the lowest-utility mature units get incoming weights from
    Kaiming-normal N(0, 2 / fan_in) (theirs, fan_in = kh x kw x c_in or the dense input width), bias 0,
    outgoing weights 0, and for a conv channel its BatchNorm scale 1, shift 0, running mean 0 and variance 1;
    the momentum is kept, as theirs. paper: the authors' CBP (common.cbp_select_paper, cbp_replace_paper): the
    highest-utility units get incoming and outgoing weights U(+-sqrt(6 / kernel.shape[0])) (sqrt(2) for a 3x3
    conv: their code reads an HWIO kernel's height as its fan-in), each conv draw shared by the kernel's 3 x 3
    taps as their masks broadcast, bias 0; BatchNorm, its statistics and the momentum are kept, as theirs."""
    paper = agent["cbp_variant"] == "paper"
    layers = cbp_layers(params, agent["cbp_variant"])
    *keys, key_normal = jax.random.split(key, len(layers) + 1)
    if not paper:  # one random-number kernel for every layer's candidates: many compile slower (CPU)
        shapes = [_at(params, layer.incoming)["w"].shape for layer in layers]
        sizes = [math.prod(shape) for shape in shapes]
        standard = jax.random.normal(key_normal, (sum(sizes),))
        offsets = np.cumsum([0] + sizes)
    params = jax.tree.map(lambda x: x, params)  # fresh containers, safe to update in place
    stats = jax.tree.map(lambda x: x, stats)
    hp = dict(replacement_rate=agent["replacement_rate"], decay_rate=agent["decay_rate"],
              maturity_threshold=agent["maturity_threshold"])
    new_cbp = []
    for i, (layer, k) in enumerate(zip(layers, keys)):
        name, index = layer.features
        h = acts[name] if index is None else acts[name][index]
        incoming = _at(params, layer.incoming)
        parent, last = _at(params, layer.outgoing[:-1]), layer.outgoing[-1]
        size = incoming["b"].shape[0]
        select = common.cbp_select_paper if paper else common.cbp_select_resnet
        state, idx, valid = select(cbp[i], h, parent[last], out_unit_axis=layer.out_axis,
                                   max_replace=common.cbp_max_replace(agent["replacement_rate"], size), **hp)
        if paper:
            incoming["w"], incoming["b"], parent[last], *_ = common.cbp_replace_paper(
                k, incoming["w"], incoming["b"], parent[last], idx, valid, out_unit_axis=layer.out_axis,
                tie_in_taps=True, tie_out_taps=True)
        else:
            shape = shapes[i]
            std = math.sqrt(2.0 / math.prod(shape[:-1]))
            init = lambda _k, s, dtype, o=offsets[i], n=sizes[i], std=std: (  # noqa: E731
                standard[o:o + n].reshape(s).astype(dtype) * std)
            incoming["w"], incoming["b"], parent[last], *_ = common.cbp_replace(
                k, incoming["w"], incoming["b"], parent[last], idx, valid, out_unit_axis=layer.out_axis, init=init)
            if layer.bn is not None:  # the channel's BatchNorm starts afresh, as theirs
                keep = jnp.ones(size).at[idx].set(jnp.where(valid, 0.0, 1.0))
                bn, s = _at(params, layer.bn)["bn"], _at(stats, layer.bn)
                bn["scale"], bn["bias"] = bn["scale"] * keep + (1 - keep), bn["bias"] * keep
                s["mean"], s["var"] = s["mean"] * keep, s["var"] * keep + (1 - keep)
        new_cbp.append(state)
    return params, stats, opt_state, new_cbp


def redo_step(agent, opt, params, stats, opt_state, x, key):
    """ReDo (Sokar et al. 2023) on the images x (float [n, 32, 32, 3]): score every unit with `common.dormant_units`
    on its post-ReLU output (a conv channel over all images and positions; BatchNorm on x's batch statistics, as
    in training, running statistics untouched), all layers on one forward pass, then recycle every unit with
    score <= redo_tau by `replace_units`: incoming weights from the layer's init, bias 0, outgoing weights 0 (the
    network's output is unchanged), zero optimizer state (momentum), and for a conv channel BatchNorm scale 1,
    shift 0, running mean 0 and variance 1. The head is never recycled.
    Which units (our choice; ReDo's nets have no residual connections): a channel of the residual stream (stem,
    each block's second conv, the 1x1 skips) is summed with others and reaches later layers through identity
    paths too, so it has no one outgoing kernel to zero. We recycle only units whose outgoing weights are one
    kernel: each block's inner channels (conv a -> BN -> ReLU, read only by the block's conv b: their outgoing
    weights are conv b's input channels) and the units of the two dense layers (rows of dense2's and the head's
    kernels), the units of the authors' CBP (--cbp-variant paper)."""
    acts = forward(params, stats, x, True)[2]
    features = acts["blocks"] + acts["dense"]
    inits = unit_inits(params, key)
    params = jax.tree.map(lambda v: v, params)  # fresh containers, safe to update in place
    stats = jax.tree.map(lambda v: v, stats)
    masks = jax.tree.map(jnp.ones_like, params)
    for i, h in enumerate(features):
        dormant = common.dormant_units(h, agent["redo_tau"])
        replace_units(params, stats, masks, i, jnp.arange(dormant.shape[0]), dormant, key, inits[i])
    return params, stats, common.mask_opt_state(opt, opt_state, masks)


# ----------------------------------------------------------------------------------------------------------
# Settings (no need to modify to fork)
# ----------------------------------------------------------------------------------------------------------
def resolve(args):
    """The agent's hyperparameters (its AGENTS entry overridden by the flags given) and the configs to sweep;
    stops with one line on a setting that would silently give wrong science, before any data is read."""
    agent = runner.agent_settings(args, AGENTS)
    for name in ("seeds", "tasks", "classes_per_task", "epochs", "batch_size", "width", "dense_width", "eval_batch",
                 "lanczos_iters", "hessian_probes", "hessian_samples", "hessian_batch", "call_steps"):
        if getattr(args, name) < 1:
            runner.fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    checks = [(args.tasks * args.classes_per_task <= NUM_CLASSES,
               f"--tasks x --classes-per-task must be <= 100, got {args.tasks} x {args.classes_per_task}"),
              (agent.get("er_batch", 1) >= 1, f"--er-batch must be >= 1, got {agent.get('er_batch')}"),
              (args.feature_samples >= 0, f"--feature-samples must be >= 0 (0: all), got {args.feature_samples}"),
              (args.hessian_every >= 0 and agent.get("maturity_threshold", 0) >= 0
               and 0 <= agent.get("decay_rate", 0) < 1,
               "--hessian-every and --maturity-threshold must be >= 0, --decay-rate in [0, 1)"),
              (0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}"),
              (agent.get("cbp_utility", common.CBP_UTILITIES[0]) in common.CBP_UTILITIES,
               f"--cbp-utility must be one of {', '.join(common.CBP_UTILITIES)}, got {agent.get('cbp_utility')!r}"),
              (args.cbp_utility in (None, "contribution") and (args.cbp_utility is None or
                                                                agent.get("cbp_variant") != "paper"),
               "--cbp-utility: this benchmark's CBP has one utility (Dohare et al.'s ResNet CBP: contribution; "
               "--cbp-variant paper: the authors' |mean h| x mean|w_out|)"),
              (0 <= agent.get("replacement_rate", 0) < 1 and agent.get("perturb_scale", 0) >= 0,
               "--replacement-rate must be in [0, 1) and --perturb-scale >= 0"),
              (agent.get("power_iters", 1) >= 1 and agent.get("spectral_lambda", 0) >= 0,
               "--power-iters must be >= 1 and --spectral-lambda >= 0"),
              (agent.get("redo_every", 1) >= 1 and agent.get("redo_tau", 0) >= 0,
               "--redo-every must be >= 1 and --redo-tau >= 0")]
    return agent, runner.agent_configs(agent, checks, SWEPT, args.lr)


def load_data(args, agent, dataset=None):
    """CIFAR-100 (`dataset` if given, the synthetic stand-in with --synthetic-data), after the checks that need
    its size."""
    if dataset is None:
        dataset = data.synthetic_cifar100() if args.synthetic_data else data.cifar100(args.data_dir, args.manual_dir)
    first = len(dataset["y_train"]) // NUM_CLASSES * args.classes_per_task
    if first < args.batch_size:
        runner.fail(f"--batch-size {args.batch_size} exceeds the {first} training images of the first task")
    if agent.get("er_batch", 0) > first // args.batch_size:
        runner.fail(f"--er-batch {agent['er_batch']} exceeds the {first // args.batch_size} minibatches of an "
                    f"epoch of task 1")
    return dataset


def class_ranks(seeds):
    """[members, 100] int32: each class's place in each member's class order."""
    return jnp.asarray(np.stack([np.argsort(class_order(s)) for s in np.asarray(seeds).tolist()]), jnp.int32)


def progress_from(args, calls, cursor):
    """runner.Progress over the run's minibatch steps per member, from the cursor's place."""
    done = sum(c for t in range(cursor["unit"]) for _, c in calls(t)) + sum(
        c for _, c in calls(cursor["unit"])[:cursor["call"]])
    return runner.Progress(sum(c for t in range(args.tasks) for _, c in calls(t)), "step", done)


def save(run, measured):
    """Run.save, then each seed's class order (class_order [configs, seeds, 100]) added to metrics.npz."""
    run.save(measured)
    with np.load(run.dir / "metrics.npz") as f:  # in a job, another process may have added class_order already
        arrays = {k: f[k] for k in f.files if k != "class_order"}
    order = np.stack([class_order(s) for s in run.members.seed_list])
    runner.save_npz(run.dir / "metrics.npz", **arrays,
                    class_order=np.broadcast_to(order, run.members.grid + (NUM_CLASSES,)))


# ----------------------------------------------------------------------------------------------------------
# Driver: data, init or resume, then for each task: train (in calls), measure, record, checkpoint
# ----------------------------------------------------------------------------------------------------------
def main(args, dataset=None):
    """Run the experiment. `dataset` (tests) replaces CIFAR-100: a dict of x_train [N, 32, 32, 3] uint8,
    y_train [N] int, x_test [M, 32, 32, 3] uint8, y_test [M] int, every class equally often."""
    runner.init_processes(args)
    runner.check_agent(args, AGENTS, SWEPT)
    agent, configs = resolve(args)
    ds = load_data(args, agent, dataset)
    jax.config.update("jax_default_matmul_precision", None if args.precision == "default" else "highest")
    members = runner.Members(configs, [args.seed + i for i in range(args.seeds)], args.member_batching)
    init, train, evaluate, spectrum, calls, hessian_images = make_train(args, agent, ds)
    measured = list(range(0, args.tasks, args.hessian_every)) if args.hessian_every else []
    run = runner.Run("cifar", args, RESUME_FREE, members, args.tasks, METRICS, spectra_shapes(args), len(measured))
    init = members.run(init, (0, None), batching="map")
    state = init(members.seeds, 0) if run.state is None else run.state
    hp, seeds, classes, state = runner.shard_members(
        (members.hyperparameters(SWEPT), members.seeds, class_ranks(members.seeds), state))
    dev = {k: jnp.asarray(v) for k, v in ds.items()}
    train = members.run(train, (0, 0, 0, 0, None, None, None, None))
    evaluate = members.run(evaluate, (0, 0, 0, None, None))
    spectrum = members.run(spectrum, (0, 0, 0, None, None, None, 0), batching="map")  # a Lanczos basis per member
    stop, start, start_call = runner.StopRequests(), run.cursor["unit"], run.cursor["call"]
    progress, timer, last_checkpoint = progress_from(args, calls, run.cursor), runner.StepTimer(), time.time()
    done = progress.done  # minibatch steps per member
    print(f"{runner.script_name(args)} {args.agent}: {members}, out {run.dir}", flush=True)
    for task in range(start, args.tasks):
        k, task_calls, fresh = measured.index(task) if task in measured else None, calls(task), run.cursor["call"] == 0
        if fresh and task > 0 and "reset" in agent:  # RESET: a fresh network, statistics and optimizer
            state = init(seeds, task)
        if fresh and k is not None:  # "init": the network that starts the task, on its new classes
            run.spectra["init_nodes"][:, k], run.spectra["init_weights"][:, k] = members.host(spectrum(
                state, seeds, classes, dev, task, 0, hessian_images(members.seeds, task)))
        for i in range(run.cursor["call"], len(task_calls)):
            first, count = task_calls[i]
            with timer.timing(timed := (task, i) != (start, start_call)):  # the first call compiles
                state = jax.block_until_ready(train(state, hp, seeds, classes, dev, task, first, count))
            timer.steps, done = timer.steps + timed * count * members.count, done + count
            run.accumulate(i + 1)
            if i + 1 == len(task_calls):  # the task's end: measured, saved and checkpointed below
                break
            if time.perf_counter() - progress.last_time >= PRINT_SECONDS:
                progress.update(done, (done - progress.done) * members.count, task=f"{task + 1}/{args.tasks}")
            if stop.due(last_checkpoint, args.checkpoint_minutes):
                run.checkpoint(state)
                last_checkpoint = time.time()
                if stop.requested:
                    task_steps = task_calls[-1][0] + task_calls[-1][1]
                    stop.exit(f"task {task + 1}/{args.tasks} (step {first + count:,} of {task_steps:,})",
                              runner.resume_command(args, run.dir))
        metrics = members.host(evaluate(state, seeds, classes, dev, task))
        if k is not None:
            run.spectra["end_nodes"][:, k], run.spectra["end_weights"][:, k] = members.host(spectrum(
                state, seeds, classes, dev, task, 1, hessian_images(members.seeds, task)))
        run.record(task, metrics, f"task {task + 1}")
        progress.update(done, (done - progress.done) * members.count, task=f"{task + 1}/{args.tasks}",
                        test_acc=runner.finite_mean(metrics["test_acc"]),
                        train_acc=runner.finite_mean(metrics["train_acc"]))
        save(run, measured[:sum(t <= task for t in measured)])
        if stop.due(last_checkpoint, args.checkpoint_minutes) or task + 1 == args.tasks:
            run.checkpoint(state)
            last_checkpoint = time.time()
            if stop.requested and task + 1 < args.tasks:
                stop.exit(f"task {task + 1}/{args.tasks}", runner.resume_command(args, run.dir))
    stop.close()
    print(speed_line(args, timer, members.count), flush=True)
    print(f"done: {run.dir}", flush=True)
    return run.dir


PAPER_STEPS = 200 * sum(500 * 5 * t // 100 for t in range(1, 21))  # per member: 20 tasks x 200 epochs


def speed_line(args, timer, members):
    """Throughput of the timed calls; the paper-scale projection only from a run of the paper's network."""
    if not timer.steps:
        return "speed: not measured (only one call ran in this process; the first compiles)"
    per_step = timer.seconds / timer.steps
    line = f"speed at width {args.width}: {per_step * 1e3:.2f} ms per member-step ({1 / per_step:,.1f} member-steps/s)"
    if (args.width, args.dense_width, args.batch_size) == (64, 512, 100):
        line += (f"; the paper's run ({PAPER_STEPS:,} steps per member) of {members} members takes "
                 f"{per_step * PAPER_STEPS * members / 3600:.1f} h")
    return line


METRICS = {**{k: ((), np.float32) for k in ("test_acc", "test_loss", "train_acc", "train_loss", "param_norm")},
           "dead_units": ((2,), np.float32), "effective_rank": ((2,), np.float32)}  # the two dense layers


def spectra_shapes(args):
    shape = ((args.hessian_probes, args.lanczos_iters), np.float32)
    return {f"{phase}_{part}": shape for phase in ("init", "end") for part in ("nodes", "weights")}


if __name__ == "__main__":
    for old, new in RENAMED.items():  # flags of earlier versions: one line naming the replacement
        if any(a == old or a.startswith(old + "=") for a in sys.argv[1:]):
            runner.fail(f"{old} was replaced by {new}")
    with runner.quiet_on_closed_pipe():
        main(runner.cli(Args, AGENTS))
