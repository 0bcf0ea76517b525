"""Continual ImageNet (paper App. H; Dohare et al. 2024): 2000 binary tasks on 32x32 ImageNet.

Each seed draws a permutation of the 1000 classes; task t is the pair at positions 2t and 2t+1 of that order
(the first is label 0; the order wraps around after 500 tasks). A task trains for --epochs (250, Table 3)
shuffled passes over its 1,200 training images (600 per class) in minibatches of 100, SGD with momentum 0.9 and
no learning-rate schedule, then is scored on its 200 held-out images (100 per class). The network is Dohare et
al.'s ConvNet with VALID padding: conv5x5-32, conv3x3-64, conv3x3-128 (each ReLU + 2x2 max-pool), flatten 512,
dense 128, dense 128, dense 2; the output layer is kept between tasks (App. H.1). The agents are the table
`AGENTS` below (a flag overrides one of its values, a flag that does not apply is an error): bp, l2, er, l2-er
(the paper's method) and cbp (Dohare et al.) with Table 4's best values; snp and snp-l2 (Ash & Adams 2020);
layernorm-l2 and spectral-reg (the authors' later runs, their chosen values); redo (Sokar et al. 2023, our
values).

Seeds and swept hyperparameters (--lr, --weight-decay, --er-lr) are "members" trained together: vmapped on
accelerators, one after another on one CPU device (--member-batching). Each jitted call trains whole epochs
(about CALL_STEPS minibatch steps); a task is a few such calls, so Ctrl-C stops within seconds and --resume
continues exactly where it stopped.

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
  hidden layers' features, outside the optimizer, once per epoch on that epoch's 1,200 images, before the
  epoch's SGD steps (the authors' order). --er-every K: before every K minibatches, on their images;
  --er-every 1 (every minibatch, its 100 images) is Table 3's listing.
  It costs about one extra forward/backward pass per epoch: er and l2-er take about twice as long as bp.
- CBP (Dohare et al.) on all five hidden layers, conv layers by channel, with Dohare et al.'s Continual
  ImageNet utility, adaptable_contribution (--cbp-utility contribution for the other). At the conv-to-dense
  boundary a conv3 channel owns 4 rows of fc1 (flatten order h, w, c): replacing it zeroes those rows and
  their momentum. Fresh incoming weights come from the init above. --cbp-variant paper: the authors' code
  behind the paper's CBP numbers (common.cbp_select_paper, cbp_replace_paper): the highest-utility units
  (|mean h| x mean|w_out|, no bias correction) of conv1, conv2, the 512 flattened conv3 outputs (as their
  code: a position x channel each, whose only change is a re-randomized fc1 row; conv3's filters are never
  redrawn), fc1 and fc2. Incoming weights U(+-sqrt(6 / kernel.shape[0])), i.e. for a conv sqrt(6 / kh) (their
  code indexes an HWIO kernel as if dense: sqrt(6 / 5) for conv1, sqrt(2) for conv2), independent per tap;
  outgoing weights re-randomized with the consuming kernel's bound (one draw per (in, out) pair shared by a
  conv's taps, as theirs); bias 0; momentum not reset, as theirs.
- Shrink & Perturb is not in Table 4: N(0, 1e-5^2) noise on every parameter after every step (Table 3's and
  Dohare et al.'s scale), Table 4's lr and, for snp-l2, its weight decay.
- Agents beyond Table 4: layernorm-l2 and spectral-reg as the authors' later Continual ImageNet runs.
  layernorm-l2: LayerNorm (learnable scale and shift, eps 1e-6) before the ReLU of each conv (per pixel, over
  its channels) and of the two dense hidden layers, none on the output layer; coupled L2 on every parameter,
  LayerNorm scales and shifts included (lr 1e-3, weight decay 1e-5). spectral-reg: lambda x sum over the six
  kernels (conv kernels as (kh*kw*in, out) matrices, output layer included) of (sigma_max^2 - 2)^2, plus lambda
  x the squared biases, sigma_max by 10 power iterations from fixed start vectors, differentiated through; no
  weight decay (lr 1e-2, lambda 1e-2). --spectral-persistent True --power-iters 1 is our cheaper variant.
- ReDo (Sokar et al. 2023): every --redo-every steps of a task, the hidden units (conv: channels) whose score
  mean|h_i| / (layer mean of mean|h_k|), post-ReLU (conv: after the pool, what the next layer sees) on that
  step's minibatch, is <= --redo-tau get fresh incoming weights (the init above), bias 0, outgoing weights 0
  (conv3 -> fc1: the channel's 4 rows, as CBP) and zeroed momentum; never the output layer. No source gives
  tau or a period for this benchmark: 0.025 and 1000 are our choices (from our Permuted MNIST sweep), with
  the benchmark's BP lr 1e-4.
- --conv-impl auto: patches + matrix multiply (im2col) on CPU, where it measured 9-20x faster; XLA
  convolutions elsewhere. Same math.

Data (read and cached by data.imagenet32): downsampled ImageNet 32x32. Put the official
Imagenet32_train_npz.zip (image-net.org, "Downsampled ImageNet 32x32"; the file tensorflow-datasets'
imagenet_resized/32x32 is built from; the validation zip is not needed), or its extracted
train_data_batch_1..10.npz, in --data-dir (default data/) or --manual-dir. The first run reads them with NumPy
(channel-first R, G, B planes, 1-based labels, as tfds converts them) and keeps the first 700 images of every
class in file order (batch 1, 2, ..., 10). Without the files it prepares imagenet_resized/32x32 with
tensorflow-datasets in --data-dir (downloads the same zip: network, tensorflow, ~10 GB of disk) and keeps the
first 700 per class in tfds's shuffled order: the same classes, different images. Per class the first 600 are
training, the last 100 test images (Dohare et al.'s split). The cache is one uint8 array
[1000, 700, 32, 32, 3], <data-dir>/continual_imagenet32_700.npy (2.1 GB; ~3 GB of memory while it is built);
later runs memory-map it and never import tensorflow. No data: one `error:` line, exit 1 (offline: at once).
--synthetic-data: random images of the real shapes instead (speed tests; nothing to learn).

Outputs (run directory runs/imagenet__<agent>__<UTC time>/ or --out-dir):
- metrics.npz, axes [config, seed, task]: test_acc (the task's 200 test images, after training); train_acc
  (final epoch: mean over its minibatches of the predictions made before each update); dead_units and
  effective_rank [config, seed, task, 2] (the two dense hidden layers, after training, on the task's 200
  held-out images as the authors' code; --feature-images all: on all its 1,400 images); param_norm; diverged [config, seed] (a diverged member's metrics are NaN from then on).
- hessian.npz (--hessian-every K; the paper: 10): tasks and init_/end_ nodes and weights [config, seed, K',
  probes, lanczos_iters]: SLQ of the cross-entropy on the task's 1,200 training images, at the task's start
  (the previous task's parameters) and end.
- config.json; checkpoint.pkl (every --checkpoint-minutes, at the end and on Ctrl-C; --resume --out-dir RUN
  continues). One progress line per task (mean test/train accuracy, member-steps/s, ETA); at the end the speed
  of the training calls after compilation and the projected time of the full 2000-task x 250-epoch run.

    python imagenet.py --agent l2-er --seeds 10                    # the paper's setting: 2000 tasks x 250 epochs
    python imagenet.py --agent bp --lr 1e-2 1e-3 1e-4              # a sweep: 3 configs trained together
    python imagenet.py --agent l2-er --tasks 10 --epochs 5         # ~20 s per task on 2 CPU cores
"""
import os

# Before jax loads LAPACK (scipy's OpenBLAS): OpenBLAS's threads on top of XLA's oversubscribe the cores
# (two l2-er runs side by side on a 2-core CPU ran 6.8x slower than two bp runs; 1.2x with one thread each).
# A user's own OPENBLAS_NUM_THREADS wins. No effect on GPU runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys  # noqa: E402 (after the environment is set)
import time
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import data
import hessian
import runner

# The agents (App. D; paper Table 4 "Continual ImageNet" best values, Table 3 defaults). An agent is its entry:
# the hyperparameters it uses, with their defaults; a flag overrides one. A key switches its mechanism on:
# weight_decay -> coupled L2, er_lr -> the ER step (er_every 0 = once per epoch), replacement_rate -> continual
# backprop (Dohare et al. 2024), perturb_scale -> Shrink & Perturb (Ash & Adams 2020; not in Table 4: Table 3's
# and Dohare et al.'s scale, with Table 4's lr and, for snp-l2, its weight decay), layer_norm -> LayerNorm before
# each hidden ReLU, spectral_lambda -> the spectral penalty (Lewandowski et al. 2024, the authors' form),
# redo_tau -> ReDo (Sokar et al. 2023).
AGENTS = {
    "bp": dict(lr=1e-4),
    "l2": dict(lr=1e-4, weight_decay=1e-3),
    "er": dict(lr=1e-4, er_lr=1e-5, er_every=0),
    "l2-er": dict(lr=1e-3, weight_decay=1e-3, er_lr=1e-4, er_every=0),  # the paper's method (Algorithm 1)
    "cbp": dict(lr=1e-4, replacement_rate=1e-5, decay_rate=0.99, maturity_threshold=100,
                cbp_utility="adaptable_contribution", cbp_variant="dohare"),
    "snp": dict(lr=1e-4, perturb_scale=1e-5),
    "snp-l2": dict(lr=1e-4, weight_decay=1e-3, perturb_scale=1e-5),
    "layernorm-l2": dict(lr=1e-3, weight_decay=1e-5, layer_norm=True),  # the authors' chosen run
    "spectral-reg": dict(lr=1e-2, spectral_lambda=1e-2, spectral_k=2.0, spectral_target=2.0, power_iters=10,
                         spectral_persistent=False),  # the authors' chosen run
    "redo": dict(lr=1e-4, redo_tau=0.025, redo_every=1000),  # Sokar et al.; no source value: our pMNIST sweep's
}
SWEPT = ("lr", "weight_decay", "er_lr")  # traced hyperparameters: several values train together as configs


@dataclass(frozen=True)
class Args:
    agent: Literal[tuple(AGENTS)] = "l2-er"
    """algorithm: an entry of AGENTS (its defaults are the paper's Table 4 best values)"""
    seed: int = 2024
    """first seed (paper Table 3: 2024)"""
    seeds: int = 1
    """number of seeds, seed .. seed+seeds-1, trained together (the paper: 10)"""
    tasks: int = 2000
    """number of binary tasks (paper: 2000)"""
    epochs: int = 250
    """epochs per task (paper Table 3: 250)"""
    batch_size: int = 100
    """minibatch size (paper: 100); must divide the 2 x train-per-class training images of a task"""
    lr: tuple[float, ...] | None = None
    """SGD learning rate(s); several values are swept together (l2-er: Table 4's 1e-3; the authors' runs mostly 1e-4)"""
    weight_decay: tuple[float, ...] | None = None
    """coupled L2 weight decay(s), added to the gradient before momentum (agents with weight_decay in AGENTS)"""
    er_lr: tuple[float, ...] | None = None
    """effective-rank ascent step size(s) (agents with er_lr)"""
    er_every: int | None = None
    """minibatches between ER steps, each taken before those minibatches' SGD steps, on their images (the authors' order); 0 = once per epoch, on all its images (the authors' runs); 1 = Table 3's listing (agents with er_lr)"""
    replacement_rate: float | None = None
    """CBP units replaced per eligible unit per step"""
    decay_rate: float | None = None
    """CBP utility running-average decay"""
    maturity_threshold: int | None = None
    """CBP steps before a unit may be replaced"""
    cbp_utility: Literal[common.CBP_UTILITIES] | None = None
    """CBP utility (Dohare et al.): contribution, or adaptable_contribution (their Continual ImageNet config); not with --cbp-variant paper"""
    cbp_variant: Literal[common.CBP_VARIANTS] | None = None
    """CBP algorithm: dohare (Dohare et al.'s, lowest utility, outgoing weights 0) or paper (the authors' code behind the paper's CBP numbers: highest utility, outgoing weights re-randomized)"""
    perturb_scale: float | None = None
    """std of the Gaussian noise added to every parameter after each step (Shrink & Perturb)"""
    spectral_lambda: float | None = None
    """weight of the spectral penalty: sum over kernels of (sigma_max^k - target)^2, plus squared biases (Lewandowski et al. 2024; default: the authors' chosen 1e-2)"""
    spectral_k: float | None = None
    """power of sigma_max in the spectral penalty (the authors: 2)"""
    spectral_target: float | None = None
    """target of sigma_max^k (the authors: 2; Lewandowski et al.'s "close to one": 1)"""
    power_iters: int | None = None
    """power iterations per kernel and step for sigma_max, from a fixed start vector (the authors: 10)"""
    spectral_persistent: bool | None = None
    """start each step's power iterations from the last step's vectors (carried in the state) instead of the fixed ones; with --power-iters 1 it costs ~1/10 (our option, not the authors')"""
    layer_norm: bool | None = None
    """LayerNorm (learnable scale and shift, eps 1e-6) before each hidden ReLU, conv layers per pixel over channels (agents with layer_norm)"""
    redo_tau: float | None = None
    """ReDo: recycle hidden units (conv: channels) whose score mean|h_i| / (layer mean of mean|h_k|) is <= tau (our choice 0.025, from our Permuted MNIST sweep; no source gives one for ImageNet)"""
    redo_every: int | None = None
    """ReDo: score and recycle every K minibatch steps of a task, on that step's minibatch (our choice 1000, from our Permuted MNIST sweep; no source gives one for ImageNet)"""
    momentum: float = 0.9
    """SGD momentum (paper Table 3: 0.9)"""
    input_norm: Literal["center", "imagenet", "unit"] = "center"
    """pixels: center = [0, 1] minus the cached images' channel mean, not divided by the std (the authors' input); imagenet = ImageNet's channel mean/std; unit = [0, 1]"""
    train_per_class: int = 600
    """training images per class (paper: 600; the next test-per-class images of the class are its test set)"""
    test_per_class: int = 100
    """test images per class (paper: 100)"""
    feature_images: Literal["test", "all"] = "test"
    """images on which dead units and effective rank are measured after each task: test = the task's held-out images (2 x 100, the authors' code), all = all its images (train + test: 1,400)"""
    hessian_every: int = 0
    """Hessian spectra (SLQ on the task's training images) at the start and end of every K-th task (tasks 0, K, 2K, ...; the paper: 10); 0 = off"""
    lanczos_iters: int = 100
    """Lanczos iterations per spectrum (paper: 100)"""
    hessian_probes: int = 1
    """Gaussian probe vectors per spectrum"""
    data_dir: str = "data"
    """folder of the cache (continual_imagenet32_<n>.npy, built on the first run) and of tensorflow-datasets' imagenet_resized/32x32 when that route is used"""
    manual_dir: str | None = None
    """folder holding Imagenet32_train_npz.zip or its extracted train_data_batch_*.npz (default: --data-dir); without them tensorflow-datasets downloads the zip"""
    synthetic_data: bool = False
    """random images of the real shapes instead of ImageNet (speed and regression tests; nothing to learn)"""
    out_dir: str | None = None
    """run directory (default: runs/imagenet__<agent>__<UTC stamp>/); with --resume, the run to continue"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint (--tasks may be raised)"""
    checkpoint_minutes: float = 5.0
    """minutes of work between checkpoints (one is also written at the end and on Ctrl-C)"""
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
    conv_impl: Literal["auto", "xla", "im2col"] = "auto"
    """convolutions: XLA's, or patches + matrix multiply (im2col; same math); auto = im2col on CPU (measured 9-20x faster there), else xla"""


CALL_STEPS = 24  # about this many minibatch steps (whole epochs, at least one) per jitted call: Ctrl-C waits one
# Args that may change between a run and its --resume (the results stay the same up to float rounding).
RESUME_FREE = ("tasks", "resume", "out_dir", "data_dir", "manual_dir", "checkpoint_minutes", "member_batching")
# Per-channel mean / std of ImageNet (RGB, pixels in [0, 1]): `--input-norm imagenet`.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Flax's default for nn.Conv and nn.Dense, which the authors' ConvNet kept: LeCun-normal, i.e. a normal
# truncated at 2 std and rescaled so that the variance is exactly 1 / fan_in (fan_in = kh x kw x c_in for a
# conv). Every layer's weights and CBP's fresh incoming weights; biases start at 0.
KERNEL_INIT = jax.nn.initializers.lecun_normal()


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
FLAT = (2, 2, 128)  # conv3's pooled output [h, w, c]: fc1's input, flattened in this order (channels last)
# The authors' CBP (--cbp-variant paper): its units are conv3's flattened outputs instead of its channels.
PAPER_UNITS = (32, 64, 2 * 2 * 128, 128, 128)


def init_params(key, layer_norm=False):
    """Every conv (HWIO) and dense ([in, out]) layer: `KERNEL_INIT` weights, zero bias; with `layer_norm`, each
    hidden layer also has a LayerNorm scale (1) and shift (0) per unit (conv: per channel)."""
    shapes = [(name, (size, size, cin, cout)) for name, size, cin, cout in CONVS]
    shapes += [(name, (fin, fout)) for name, fin, fout in DENSES]
    keys = jax.random.split(key, len(shapes))
    params = {name: {"w": KERNEL_INIT(k, shape, jnp.float32), "b": jnp.zeros(shape[-1], jnp.float32)}
              for k, (name, shape) in zip(keys, shapes)}
    if layer_norm:
        for name, units in zip(HIDDEN, HIDDEN_UNITS):
            params[name] |= {"scale": jnp.ones(units, jnp.float32), "shift": jnp.zeros(units, jnp.float32)}
    return params


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


def activate(h, layer):
    """ReLU, after LayerNorm over the last axis (conv: each pixel's channels) when the layer has one
    (agents with layer_norm: the authors' layernorm-l2 runs normalize before the ReLU)."""
    if "scale" in layer:
        h = common.layer_norm(h, layer["scale"], layer["shift"])
    return jax.nn.relu(h)


def forward(params, x, impl):
    """Logits [n, 2] and the hidden activations (post-ReLU; conv layers after pooling) of HIDDEN."""
    acts = []
    h = x
    for name, *_ in CONVS:
        h = max_pool(activate(conv(h, params[name], impl), params[name]))
        acts.append(h)
    h = h.reshape(h.shape[0], -1)
    for name in ("fc1", "fc2"):
        h = activate(h @ params[name]["w"] + params[name]["b"], params[name])
        acts.append(h)
    return h @ params["out"]["w"] + params["out"]["b"], acts


def cross_entropy(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def preprocess(images, input_norm, pixel_mean=()):
    """uint8 images -> float32 network input, as `input_norm` says (see Args.input_norm); `pixel_mean` is the
    cache's per-channel mean in [0, 1] (`center`)."""
    x = images.astype(jnp.float32) / 255.0
    if input_norm == "center":
        if len(pixel_mean) != 3:
            raise ValueError("input_norm 'center' needs the cache's per-channel mean (pixel_mean)")
        x = x - jnp.asarray(pixel_mean, jnp.float32)
    elif input_norm == "imagenet":
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return x


# ----------------------------------------------------------------------------------------------------------
# One member (a config x seed). Its randomness depends only on (seed, task), never on its position among the
# members, so a seed run alone reproduces the same member of a multi-seed run.
# ----------------------------------------------------------------------------------------------------------
def member_key(seed, stream, task):
    """A member's key for one purpose (`stream`: 0 init, 1 training, 2 Hessian probes) and task."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), task)


def make_train(args, agent, ds):
    """The run's functions of one member (PureJaxRL's make_train): init(seed) -> state; task_data(seeds, task) ->
    (x_train, x_test) uint8 images of every member's task (host); train(state, hp, seed, task, x_train, first,
    count) -> (state, training accuracy of the last epoch) over the task's epochs first .. first + count - 1
    (count static); evaluate(params, x_train, x_test) -> metrics; spectrum(params, seed, task, x_train, phase)
    -> SLQ (nodes, weights); and `calls`, the (first, count) that make up one task. `agent` is the resolved
    AGENTS entry; `ds` holds the class images [classes, per class, 32, 32, 3] and their channel mean."""
    images, impl = ds["images"], args.conv_impl
    impl = ("im2col" if jax.default_backend() == "cpu" else "xla") if impl == "auto" else impl
    steps = 2 * args.train_per_class // args.batch_size  # minibatches per epoch
    er_every = agent.get("er_every") or steps  # 0: one ER step per epoch, on its images
    y_train = jnp.repeat(jnp.arange(2, dtype=jnp.int32), args.train_per_class)
    y_test = jnp.repeat(jnp.arange(2, dtype=jnp.int32), args.test_per_class)
    prepare = lambda x: preprocess(x, args.input_norm, ds["pixel_mean"])  # noqa: E731
    dense_features = lambda params, x: forward(params, x, impl)[1][3:]  # what ER acts on and what is measured
    orders = {}  # seed -> its class order

    def optimizer(hp):
        return common.sgd(hp["lr"], hp.get("weight_decay", 0.0), args.momentum)

    def init(seed):
        params = init_params(member_key(seed, 0, 0), agent.get("layer_norm", False))
        state = {"params": params, "opt": optimizer({"lr": 0.0}).init(params)}
        if agent.get("spectral_persistent"):
            state["spectral_v"] = common.spectral_starts(params)
        if "replacement_rate" in agent:
            units = PAPER_UNITS if agent["cbp_variant"] == "paper" else HIDDEN_UNITS
            state["cbp"] = [common.cbp_init(n) for n in units]
        return state

    def task_data(seeds, task):
        """Class order[2t] is label 0, order[2t+1] label 1 (wrapping around); train: the first train_per_class
        images of each class, test: the rest. Members of one seed share its images."""
        xs_train, xs_test = [], []
        for seed in np.asarray(seeds).tolist():
            if seed not in orders:  # the seed's permutation of the classes, from its key's stream 3
                key = jax.random.fold_in(jax.random.key(seed), 3)
                orders[seed] = np.asarray(jax.random.permutation(key, images.shape[0]))
            order = orders[seed]
            pair = images[[order[(2 * task) % len(order)], order[(2 * task + 1) % len(order)]]]
            xs_train.append(pair[:, :args.train_per_class].reshape((-1,) + data.IMAGENET32_SHAPE))
            xs_test.append(pair[:, args.train_per_class:].reshape((-1,) + data.IMAGENET32_SHAPE))
        return np.stack(xs_train), np.stack(xs_test)

    def train(state, hp, seed, task, x_train, first, count):
        x, opt, key = prepare(x_train), optimizer(hp), member_key(seed, 1, task)

        def loss_fn(params, xb, yb, starts):
            logits, acts = forward(params, xb, impl)
            loss, vectors = cross_entropy(logits, yb), None
            if "spectral_lambda" in agent:  # spectral regularization, in the loss
                # Start keys 0..5 count the kernels in leaf order (conv1..3, fc1, fc2, out), the authors' order
                # (their layer_0..5).
                penalty, vectors = common.spectral_penalty(params, agent["spectral_k"], agent["spectral_target"],
                                                           agent["power_iters"], starts)
                loss = loss + agent["spectral_lambda"] * penalty
            return loss, (logits, acts, vectors)

        def step(state, batch):
            """One minibatch: predict (counted for training accuracy), update, then S&P, CBP or ReDo."""
            idx, step_key, number = batch  # number: the step's index within the task
            xb, yb = x[idx], y_train[idx]
            (_, (logits, acts, vectors)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"], xb, yb, state.get("spectral_v"))
            updates, opt_state = opt.update(grads, state["opt"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            if "perturb_scale" in agent:
                params = common.shrink_perturb(params, step_key, agent["perturb_scale"])
            state = {**state, "params": params, "opt": opt_state}
            if "spectral_v" in state:
                state["spectral_v"] = vectors
            if "replacement_rate" in agent:
                state = cbp_step(agent, opt, state, acts, step_key)
            if "redo_tau" in agent:  # after every redo_every-th step of the task, scored on its minibatch
                # A cond, not a mask: the scoring forward pass runs only when due (`number` is the same for
                # every member, so the cond stays one under vmap).
                state = jax.lax.cond((number + 1) % agent["redo_every"] == 0,
                                     lambda s: redo_step(agent, opt, s, xb, step_key, impl), lambda s: s, state)
            return state, jnp.mean(jnp.argmax(logits, axis=-1) == yb)

        def group(state, batches):
            if "er_lr" in agent:  # ER ascent on the images of these er_every minibatches, before their SGD steps
                # (the authors' train_imagenet.py: the ER step opens each group of minibatches)
                params, _ = common.er_ascent(state["params"], dense_features, x[batches[0].reshape(-1)], hp["er_lr"])
                state = {**state, "params": params}
            return jax.lax.scan(step, state, batches)

        def epoch(state, e):
            order_key, steps_key = jax.random.split(jax.random.fold_in(key, e))
            order = jax.random.permutation(order_key, x.shape[0])[:steps * args.batch_size]
            batches = (order.reshape(steps // er_every, er_every, args.batch_size),
                       jax.random.split(steps_key, steps).reshape(steps // er_every, er_every),
                       (e * steps + jnp.arange(steps)).reshape(steps // er_every, er_every))
            state, accs = jax.lax.scan(group, state, batches)
            return state, jnp.mean(accs)

        state, accs = jax.lax.scan(epoch, state, first + jnp.arange(count))
        return state, accs[-1]

    def evaluate(params, x_train, x_test):
        """Test accuracy on the task's held-out images; dead units and effective rank of the dense hidden
        layers on its held-out images (--feature-images test, the authors') or on all its images (all: train
        + test); parameter norm. NaN for a non-finite member."""
        logits, acts_test = forward(params, prepare(x_test), impl)
        feats = acts_test[3:]
        if args.feature_images == "all":
            feats = [jnp.concatenate([a, b]) for a, b in zip(dense_features(params, prepare(x_train)), feats)]
        metrics = {"test_acc": jnp.mean(jnp.argmax(logits, axis=-1) == y_test),
                   "dead_units": jnp.stack([common.dead_units(f) for f in feats]).astype(jnp.float32),
                   "effective_rank": common.effective_ranks(feats), "param_norm": common.param_norm(params)}
        finite = jnp.isfinite(metrics["param_norm"])
        return {**{k: jnp.where(finite, v, jnp.nan) for k, v in metrics.items()}, "finite": finite}

    def spectrum(params, seed, task, x_train, phase):
        """SLQ spectrum of the cross-entropy on the task's training images (App. F.1); phase 0 = task init,
        1 = task end."""
        x = prepare(x_train)
        loss_fn = lambda p: cross_entropy(forward(p, x, impl)[0], y_train)  # noqa: E731
        key = jax.random.fold_in(member_key(seed, 2, task), phase)
        return hessian.slq(loss_fn, params, key, args.lanczos_iters, args.hessian_probes)

    per_call = max(1, CALL_STEPS // steps)
    calls = [(f, min(per_call, args.epochs - f)) for f in range(0, args.epochs, per_call)]
    return init, task_data, train, evaluate, spectrum, calls


def outgoing(params, layer):
    """(outgoing weights of hidden layer `layer`, their unit axis): conv -> conv: the next kernel's input
    channels (HWIO axis 2); conv3 -> fc1: fc1 viewed as [2, 2, 128, 128] (flatten order h, w, c), so channel c
    owns the 4 rows h * 256 + w * 128 + c, one per spatial position; dense -> dense: rows (axis 0)."""
    w_out = params[NEXT[layer]]["w"]
    if HIDDEN[layer] == "conv3":
        w_out = w_out.reshape(FLAT + (w_out.shape[-1],))
    return w_out, 2 if HIDDEN[layer].startswith("conv") else 0


def reinit_units(params, keep, layer, key, idx, valid):
    """Units idx[valid] of hidden layer `layer` (conv: channels): fresh incoming weights from KERNEL_INIT,
    bias 0, outgoing weights 0 (common.cbp_replace); `keep` (params-shaped 0/1 masks) marks those entries
    for zeroing their optimizer state. Returns the new (params, keep) dicts."""
    name, nxt = HIDDEN[layer], NEXT[layer]
    w_out, axis = outgoing(params, layer)
    w_in, b_in, w_out, keep_in, keep_b, keep_out = common.cbp_replace(
        key, params[name]["w"], params[name]["b"], w_out, idx, valid, out_unit_axis=axis, init=KERNEL_INIT)
    shape_out = params[nxt]["w"].shape
    params = {**params, name: {**params[name], "w": w_in, "b": b_in},
              nxt: {**params[nxt], "w": w_out.reshape(shape_out)}}
    keep = {**keep, name: {**keep[name], "w": keep[name]["w"] * keep_in, "b": keep[name]["b"] * keep_b},
            nxt: {**keep[nxt], "w": keep[nxt]["w"] * keep_out.reshape(shape_out)}}
    return params, keep


def cbp_step(agent, opt, state, acts, key):
    """Continual backprop after an SGD step (Dohare et al.): per hidden layer, by unit (conv: by channel),
    update utilities with this step's activations and replace the chosen units (conv3's outgoing weights:
    `outgoing`). cbp_variant paper: `cbp_step_paper`."""
    if agent["cbp_variant"] == "paper":
        return cbp_step_paper(agent, state, acts, key)
    params = state["params"]
    keep = jax.tree.map(jnp.ones_like, params)
    cbp_states = []
    for layer, key_l in enumerate(jax.random.split(key, len(HIDDEN))):
        w_out, axis = outgoing(params, layer)
        cbp_state, idx, valid = common.cbp_select(
            state["cbp"][layer], acts[layer], w_out, w_in=params[HIDDEN[layer]]["w"], utility=agent["cbp_utility"],
            replacement_rate=agent["replacement_rate"], decay_rate=agent["decay_rate"],
            maturity_threshold=agent["maturity_threshold"], out_unit_axis=axis,
            max_replace=common.cbp_max_replace(agent["replacement_rate"], HIDDEN_UNITS[layer]))
        params, keep = reinit_units(params, keep, layer, key_l, idx, valid)
        cbp_states.append(cbp_state)
    return {**state, "params": params, "cbp": cbp_states, "opt": common.mask_opt_state(opt, state["opt"], keep)}


def cbp_step_paper(agent, state, acts, key):
    """The authors' CBP (their imagenet/cbp.py) after an SGD step: the highest-utility units of conv1, conv2
    (channels), conv3's flattened outputs (PAPER_UNITS; only their fc1 rows change), fc1 and fc2 get incoming
    weights and outgoing weights re-randomized (common.cbp_replace_paper; conv outgoing draws shared over the
    taps), bias 0. The momentum is kept, as theirs (they reset only Adam's state)."""
    params = dict(state["params"])
    cbp_states = []
    for layer, key_l in enumerate(jax.random.split(key, len(HIDDEN))):
        name, nxt = HIDDEN[layer], NEXT[layer]
        h = acts[layer].reshape(acts[layer].shape[0], -1) if name == "conv3" else acts[layer]
        axis = 2 if nxt.startswith("conv") else 0
        cbp_state, idx, valid = common.cbp_select_paper(
            state["cbp"][layer], h, params[nxt]["w"], replacement_rate=agent["replacement_rate"],
            decay_rate=agent["decay_rate"], maturity_threshold=agent["maturity_threshold"], out_unit_axis=axis,
            max_replace=common.cbp_max_replace(agent["replacement_rate"], PAPER_UNITS[layer]))
        own = name != "conv3"  # their code never redraws conv3's filters
        w_in, b_in, w_out, *_ = common.cbp_replace_paper(
            key_l, params[name]["w"] if own else None, params[name]["b"] if own else None, params[nxt]["w"], idx,
            valid, out_unit_axis=axis, tie_out_taps=nxt.startswith("conv"))
        if own:
            params[name] = {**params[name], "w": w_in, "b": b_in}
        params[nxt] = {**params[nxt], "w": w_out}
        cbp_states.append(cbp_state)
    return {**state, "params": params, "cbp": cbp_states}


def redo_step(agent, opt, state, x, key, impl):
    """ReDo (Sokar et al. 2023): per hidden layer, the units (conv: channels) dormant on the images x
    (common.dormant_units on the post-ReLU activations, conv layers after the pool; all scored before any
    change) get fresh incoming weights (the layer's init), bias 0, outgoing weights 0 (conv3's: `outgoing`)
    and zeroed optimizer state; the output layer is never recycled. A unit that was exactly 0 on every input
    leaves the network's outputs unchanged."""
    params = state["params"]
    _, acts = forward(params, x, impl)
    keep = jax.tree.map(jnp.ones_like, params)
    for layer, key_l in enumerate(jax.random.split(key, len(HIDDEN))):
        dormant = common.dormant_units(acts[layer], agent["redo_tau"])
        params, keep = reinit_units(params, keep, layer, key_l, jnp.arange(dormant.shape[0]), dormant)
    return {**state, "params": params, "opt": common.mask_opt_state(opt, state["opt"], keep)}


# ----------------------------------------------------------------------------------------------------------
# Settings (no need to modify to fork)
# ----------------------------------------------------------------------------------------------------------
def resolve(args):
    """The agent's hyperparameters (its AGENTS entry overridden by the flags given) and the configs to sweep;
    stops with one line on a setting that would silently give wrong science."""
    runner.check_agent(args, AGENTS, SWEPT)
    agent = runner.agent_settings(args, AGENTS)
    for name in ("tasks", "epochs", "seeds", "batch_size", "train_per_class", "test_per_class", "lanczos_iters",
                 "hessian_probes"):
        if getattr(args, name) < 1:
            runner.fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    n_train = 2 * args.train_per_class
    steps = n_train // args.batch_size
    checks = [(agent.get("cbp_utility", common.CBP_UTILITIES[0]) in common.CBP_UTILITIES,
               f"--cbp-utility must be one of {', '.join(common.CBP_UTILITIES)}, got {agent.get('cbp_utility')!r}"),
              (args.hessian_every >= 0 and agent.get("maturity_threshold", 0) >= 0 and 0 <= args.momentum < 1
               and args.checkpoint_minutes >= 0,
               "--hessian-every, --maturity-threshold and --checkpoint-minutes must be >= 0 and --momentum in [0, 1)"),
              (n_train % args.batch_size == 0,
               f"--batch-size {args.batch_size} must divide the {n_train} training images of a task"),
              (agent.get("er_every", 0) >= 0 and steps % (agent.get("er_every") or steps or 1) == 0,
               f"--er-every {agent.get('er_every')} must divide the {steps} minibatches of an epoch"),
              (0 <= agent.get("replacement_rate", 0) <= 1 and agent.get("perturb_scale", 0) >= 0
               and 0 < agent.get("decay_rate", 0.5) < 1,
               "--replacement-rate must be in [0, 1], --perturb-scale >= 0, --decay-rate in (0, 1)"),
              (agent.get("cbp_variant") != "paper" or args.cbp_utility is None,
               "--cbp-utility does not apply to --cbp-variant paper (the authors' utility: |mean h| x mean|w_out|)"),
              (agent.get("power_iters", 1) >= 1 and agent.get("redo_every", 1) >= 1 and agent.get("redo_tau", 0) >= 0,
               "--power-iters and --redo-every must be >= 1 and --redo-tau >= 0")]
    return agent, runner.agent_configs(agent, checks, SWEPT, args.lr)


def load_data(args):
    """{"images": uint8 [classes, per class, 32, 32, 3], "pixel_mean": the channel mean `center` subtracts}."""
    n = args.train_per_class + args.test_per_class
    if args.synthetic_data:  # uniform random pixels: mean 0.5
        return {"images": data.synthetic_imagenet32(n), "pixel_mean": (0.5, 0.5, 0.5)}
    images = data.imagenet32(args.data_dir, args.manual_dir, n)
    center = args.input_norm == "center"
    return {"images": images, "pixel_mean": data.imagenet32_channel_mean(images, args.data_dir) if center else ()}


# ----------------------------------------------------------------------------------------------------------
# Driver: data, init or resume, then for each task: train (in calls of whole epochs), measure, record, checkpoint
# ----------------------------------------------------------------------------------------------------------
def main(args):
    """Run the experiment; returns the run directory."""
    runner.init_processes(args)
    agent, configs = resolve(args)
    ds = load_data(args)
    members = runner.Members(configs, [args.seed + i for i in range(args.seeds)], args.member_batching)
    init, task_data, train, evaluate, spectrum, calls = make_train(args, agent, ds)
    measured = list(range(0, args.tasks, args.hessian_every)) if args.hessian_every else []
    run = runner.Run("imagenet", args, RESUME_FREE, members, args.tasks, METRICS, spectra_shapes(args), len(measured))
    state = members.run(init, (0,), batching="map")(members.seeds) if run.state is None else run.state
    hp, seeds, state = runner.shard_members((members.hyperparameters(SWEPT), members.seeds, state))
    train_calls = {n: members.run(lambda s, h, sd, t, x, f, n=n: train(s, h, sd, t, x, f, n), (0, 0, 0, None, 0, None))
                   for n in {count for _, count in calls}}
    evaluate, spectrum = members.run(evaluate, (0, 0, 0)), members.run(spectrum, (0, 0, None, 0, None))
    stop, start, steps = runner.StopRequests(), run.cursor["unit"], 2 * args.train_per_class // args.batch_size
    progress, timer, last_checkpoint = runner.Progress(args.tasks, "task", start), runner.StepTimer(), time.time()
    print(f"{runner.script_name(args)} {args.agent}: {members}, {ds['images'].shape[0]} classes, {args.tasks} tasks x "
          f"{args.epochs} epochs x {steps} steps, out {run.dir}", flush=True)
    if ds["pixel_mean"] and args.input_norm == "center":
        print(f"input: [0, 1] pixels minus the channel mean {tuple(round(m, 4) for m in ds['pixel_mean'])}", flush=True)
    for task in range(start, args.tasks):
        x_train, x_test = runner.shard_members(task_data(members.seeds, task))
        k = measured.index(task) if task in measured else None
        if k is not None and run.cursor["call"] == 0:  # "init": the last task's final params on this task's data
            run.spectra["init_nodes"][:, k], run.spectra["init_weights"][:, k] = members.host(spectrum(
                state["params"], seeds, task, x_train, 0))
        for i in range(run.cursor["call"], len(calls)):
            with timer.timing(task > start):  # the first task compiles
                state, train_acc = train_calls[calls[i][1]](state, hp, seeds, task, x_train, calls[i][0])
                train_acc = members.host(train_acc)  # the last epoch's: the task's when this is its last call
            timer.steps += members.count * calls[i][1] * steps * (task > start)
            run.accumulate(i + 1)
            if i + 1 < len(calls) and stop.due(last_checkpoint, args.checkpoint_minutes):
                run.checkpoint(state)
                last_checkpoint = time.time()
                if stop.requested:
                    epochs_done = sum(c[1] for c in calls[:i + 1])
                    stop.exit(f"task {task + 1}/{args.tasks} (epoch {epochs_done} of {args.epochs})",
                              runner.resume_command(args, run.dir))
        metrics = members.host(evaluate(state["params"], x_train, x_test))
        if k is not None:
            run.spectra["end_nodes"][:, k], run.spectra["end_weights"][:, k] = members.host(spectrum(
                state["params"], seeds, task, x_train, 1))
        run.record(task, {**metrics, "train_acc": train_acc}, f"task {task}")
        progress.update(task + 1, args.epochs * steps * members.count,
                        test_acc=runner.finite_mean(run.metrics["test_acc"][:, task]),
                        train_acc=runner.finite_mean(run.metrics["train_acc"][:, task]))
        run.save(measured[:sum(t <= task for t in measured)])
        if stop.due(last_checkpoint, args.checkpoint_minutes) or task + 1 == args.tasks:
            run.checkpoint(state)
            last_checkpoint = time.time()
            if stop.requested and task + 1 < args.tasks:
                stop.exit(f"task {task + 1}/{args.tasks}", runner.resume_command(args, run.dir))
    stop.close()
    print(speed_line(timer, members.count, steps), flush=True)
    print(f"done: {run.dir}", flush=True)
    return run.dir


def speed_line(timer, members, steps_per_epoch):
    """Throughput of the timed training calls and the projected time of the paper's run at that speed."""
    if not timer.steps:
        return "speed: not measured (only one task ran in this process; the first compiles)"
    per_step = timer.seconds / timer.steps
    full = per_step * members * 2000 * 250 * steps_per_epoch
    return (f"speed of the training calls after the first task: {per_step * 1e3:,.1f} ms per member-step "
            f"({1 / per_step:,.1f} member-steps/s); the paper's run (2000 tasks x 250 epochs x {steps_per_epoch} "
            f"steps) of {members} member(s) at this speed: {full / 3600:,.1f} h")


METRICS = {"test_acc": ((), np.float32), "train_acc": ((), np.float32), "dead_units": ((2,), np.float32),
           "effective_rank": ((2,), np.float32), "param_norm": ((), np.float32)}


def spectra_shapes(args):
    shape = ((args.hessian_probes, args.lanczos_iters), np.float32)
    return {f"{phase}_{part}": shape for phase in ("init", "end") for part in ("nodes", "weights")}


if __name__ == "__main__":
    if any(a == "--seed-batching" or a.startswith("--seed-batching=") for a in sys.argv[1:]):
        runner.fail("--seed-batching is now --member-batching {auto,vmap,map} (auto: map on one CPU device, else vmap)")
    with runner.quiet_on_closed_pipe():
        main(runner.cli(Args, AGENTS))
