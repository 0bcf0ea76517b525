"""Permuted MNIST (paper Sec. 6 and App. G; Dohare et al. 2024): online continual classification.

Each task draws a fresh random pixel permutation and trains on one pass over the 60,000 MNIST training
images in a fresh random order, one image per step (batch 1), plain SGD, MLP 784-1000x3-10 (ReLU,
Kaiming-uniform init; App. G.1). The headline metric is the online accuracy: the mean, over a task's steps,
of whether the prediction made *before* each update was right. Agents (App. D, Table 2 fixed-LR values):

    bp      plain SGD
    l2      SGD + coupled weight decay (added to the gradient)
    er      SGD + an effective-rank ascent step every er_batch steps (App. D.1)
    l2-er   both (App. D.2, Algorithm 1; the paper's method)
    cbp     continual backprop (Dohare et al. 2024): lowest-utility mature units re-initialized
    snp     Shrink & Perturb: Gaussian noise added to all parameters after every step
    snp-l2  Shrink & Perturb with weight decay (the shrink)

Seeds and swept hyperparameters (--lr, --er-lr, --weight-decay) are "members" trained together: one jitted
call per task runs a lax.scan over chunks of er_batch steps (an inner lax.scan of single-image SGD steps,
then the ER step on those images). Members are vmapped on accelerators (and sharded over several devices);
on one CPU device they run one after another through one compiled single-member function (faster there).

    python pmnist.py --agent l2-er --seeds 5          # the paper's run: 800 tasks x 60,000 steps x 5 seeds
    python pmnist.py --agent bp --tasks 5 --steps-per-task 10000 --manual-dir ../shared/data/mnist
"""
import os

# Before jax loads LAPACK (scipy's OpenBLAS): OpenBLAS's threads on top of XLA's oversubscribe the cores
# (two l2-er runs side by side on a 2-core CPU ran 6.8x slower than two bp runs; 1.2x with one thread each).
# A user's own OPENBLAS_NUM_THREADS wins. No effect on GPU runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time
import zipfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import hessian

AGENTS = ("bp", "l2", "er", "l2-er", "cbp", "snp", "snp-l2")
USES_WD = ("l2", "l2-er", "snp-l2")
USES_ER = ("er", "l2-er")
USES_SNP = ("snp", "snp-l2")
# Paper Table 2, "Fixed LR Best" column (lr fixed to 1e-2). The paper sweeps no Shrink & Perturb values for
# pMNIST: perturb_scale is Table 1's default (1e-5), snp-l2's weight decay is Table 1's default (1e-3).
AGENT_DEFAULTS = {
    "bp": {},
    "l2": {"weight_decay": 1e-3},
    "er": {"er_lr": 1e-3},
    "l2-er": {"er_lr": 1e-3, "weight_decay": 1e-3},
    "cbp": {},
    "snp": {},
    "snp-l2": {"weight_decay": 1e-3},
}
ER_BATCH, REPLACEMENT_RATE, DECAY_RATE, MATURITY_THRESHOLD, PERTURB_SCALE = 100, 1e-6, 0.99, 100, 1e-5
CBP_UTILITY = "adaptable_contribution"  # Dohare et al.'s Permuted MNIST config (util_type)
# Matmul precision of the effective-rank and Hessian computations (GPUs may otherwise use TF32, whose 10-bit
# mantissa blurs the small singular values that effective rank counts). The single-image SGD steps keep
# JAX's default precision (fastest).
PRECISE = "highest"
CHUNK = 100  # steps per inner scan for agents without ER (their per-step keys are folded per chunk)
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CACHE_NAME = "pmnist_mnist_cache.npz"
# Args fields that may change between a run and its --resume (results stay the same up to float rounding).
RESUME_FREE = ("tasks", "resume", "out_dir", "data_dir", "manual_dir", "checkpoint_minutes", "member_batching")


@dataclass
class Args:
    agent: Literal["bp", "l2", "er", "l2-er", "cbp", "snp", "snp-l2"] = "l2-er"
    """algorithm (App. D); alone it uses the paper's Table 2 fixed-LR best hyperparameters"""
    seed: int = 2024
    """first seed (paper Table 1: 2024)"""
    seeds: int = 1
    """number of seeds, seed .. seed+seeds-1, trained together"""
    tasks: int = 800
    """number of tasks (permutations)"""
    steps_per_task: int = 60000
    """single-image SGD steps per task: a prefix of a fresh random order of the training images (<= 60,000)"""
    width: int = 1000
    """units in each of the 3 hidden layers"""
    lr: tuple[float, ...] = (0.01,)
    """SGD learning rate(s); several values are swept together"""
    weight_decay: tuple[float, ...] | None = None
    """coupled L2 weight decay(s) (l2, l2-er, snp-l2; default 1e-3, Table 2)"""
    er_lr: tuple[float, ...] | None = None
    """effective-rank ascent step size(s) (er, l2-er; default 1e-3, Table 2)"""
    er_batch: int | None = None
    """ER step every er_batch SGD steps, on those er_batch images' features of all 3 hidden layers (er, l2-er; default 100, Table 1)"""
    replacement_rate: float | None = None
    """CBP units replaced per eligible unit per step (cbp; default 1e-6, Table 2)"""
    decay_rate: float | None = None
    """CBP utility running-average decay (cbp; default 0.99, Table 1)"""
    maturity_threshold: int | None = None
    """CBP steps before a unit may be replaced (cbp; default 100, Table 1)"""
    cbp_utility: str | None = None
    """CBP utility, "contribution" or "adaptable_contribution" (cbp; default adaptable_contribution, Dohare et al.'s pMNIST config)"""
    perturb_scale: float | None = None
    """std of the Gaussian noise added to every parameter after each step (snp, snp-l2; default 1e-5, Table 1's perturb_scale)"""
    max_grad_norm: float = 0.0
    """clip each step's gradient to this global norm before the optimizer; 0 = off (plain SGD, as the authors' runs; Table 1 lists 0.5)"""
    eval_size: int = 2000
    """test images (a fresh random subset per task, under the task's permutation) for test accuracy and, at task end, dead units and effective rank per hidden layer"""
    hessian_every: int = 0
    """Hessian spectra (SLQ) at the start and end of every K-th task (tasks 0, K, 2K, ...); 0 = off"""
    hessian_samples: int = 2000
    """training images of the task (the first of its order) in the Hessian's cross-entropy loss"""
    lanczos_iters: int = 100
    """Lanczos iterations per spectrum"""
    hessian_probes: int = 1
    """Gaussian probe vectors per spectrum"""
    data_dir: str | None = None
    """folder of tensorflow-datasets data and of the MNIST cache (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"""
    manual_dir: str | None = None
    """folder holding the four MNIST .gz files, to prepare the dataset offline"""
    synthetic_data: bool = False
    """random images and labels of MNIST's shapes instead of MNIST (speed and regression tests; nothing to learn)"""
    out_dir: str | None = None
    """run directory (default: runs/pmnist__<agent>__<UTC stamp>/); with --resume, the run to continue"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint"""
    checkpoint_minutes: float = 5.0
    """minutes of work between checkpoints (one is also written at the end)"""
    member_batching: Literal["auto", "vmap", "map"] = "auto"
    """how seeds x configs run together: vmap (one batched program), or map (one after another, one compiled single-member program); auto = map on a single CPU device (~2x faster there), else vmap"""


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def load_mnist(data_dir, manual_dir):
    """MNIST as {train_x [60000, 784] uint8, train_y int32, test_x [10000, 784], test_y}, from the .npz cache
    in data_dir, else prepared by tensorflow-datasets (imported only then) and cached."""
    data_dir = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()
    cache = data_dir / CACHE_NAME
    hint = (f"MNIST not found: put {', '.join(MNIST_FILES)} in one folder and pass --manual-dir FOLDER "
            f"(the prepared arrays are then cached in {cache})")
    if not cache.exists() and manual_dir is not None:
        missing = [f for f in MNIST_FILES if not (Path(manual_dir).expanduser() / f).is_file()]
        if missing:
            common.fail(f"{manual_dir} lacks {', '.join(missing)}. {hint}")

    def build():
        arrays = common.tfds_arrays("mnist", str(data_dir), manual_dir, ("train", "test"), hint)
        flat = {}
        for split, prefix in (("train", "train"), ("test", "test")):
            images, labels = arrays[split]
            flat[f"{prefix}_x"] = images.reshape(len(images), -1).astype(np.uint8)
            flat[f"{prefix}_y"] = labels.astype(np.int32)
        return flat

    try:
        data = common.load_cached(cache, build)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        common.fail(f"cannot use the MNIST cache {cache} ({type(e).__name__}); delete it to rebuild it")
    if set(data) != {"train_x", "train_y", "test_x", "test_y"}:
        common.fail(f"the MNIST cache {cache} has unexpected contents; delete it to rebuild it")
    return data


def synthetic_mnist():
    """Fixed random stand-in for MNIST with its shapes and dtypes (20% of pixels at 255, random labels)."""
    rng = np.random.default_rng(0)
    images = lambda n: ((rng.random((n, 784)) < 0.2) * 255).astype(np.uint8)
    return {"train_x": images(60000), "train_y": rng.integers(0, 10, 60000).astype(np.int32),
            "test_x": images(10000), "test_y": rng.integers(0, 10, 10000).astype(np.int32)}


# ----------------------------------------------------------------------------------------------------------
# Network (App. G.1): 784 -> width x 3 (ReLU) -> 10, Kaiming-uniform weights, zero biases
# ----------------------------------------------------------------------------------------------------------
def init_params(key, in_dim, width):
    sizes = [in_dim, width, width, width, 10]
    keys = jax.random.split(key, len(sizes) - 1)
    return [common.dense_init(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def forward(params, x):
    """Logits and the post-ReLU features of the 3 hidden layers; x is [784] or [n, 784]."""
    features = []
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
        features.append(x)
    return x @ params[-1]["w"] + params[-1]["b"], features


def cross_entropy(logits, labels):
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]


def hidden_features(params, x):
    return forward(params, x)[1]


# ----------------------------------------------------------------------------------------------------------
# One member (a config x seed) on one task. Its randomness depends only on (seed, task), never on its
# position among the members, so a seed run alone reproduces the same member of a multi-seed run.
# ----------------------------------------------------------------------------------------------------------
class Static(NamedTuple):
    """Everything the compiled functions depend on besides array shapes. Agents that differ only in traced
    hyperparameters share compilations (bp = l2 with weight decay 0, er = l2-er with weight decay 0)."""
    er: bool
    cbp: bool
    snp: bool
    width: int
    steps: int
    chunk: int
    eval_size: int
    replacement_rate: float
    decay_rate: float
    maturity_threshold: int
    cbp_utility: str
    perturb_scale: float
    max_grad_norm: float
    batching: str


def task_randomness(seed, task, n_train, n_test, in_dim):
    """The task's pixel permutation, its order of the training images, its eval subset, and the keys of its
    per-step noise (CBP, S&P) and of its Hessian probes."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), task)
    k_perm, k_order, k_eval, k_steps, k_hess = jax.random.split(key, 5)
    return (jax.random.permutation(k_perm, in_dim), jax.random.permutation(k_order, n_train),
            jax.random.permutation(k_eval, n_test), k_steps, k_hess)


def make_optimizer(static, hp):
    opt = common.sgd(hp["lr"], hp["weight_decay"])
    return optax.chain(optax.clip_by_global_norm(static.max_grad_norm), opt) if static.max_grad_norm > 0 else opt


def one_at_a_time(member_fn):
    """Members one after another: one compiled single-member function, called for each member, so one
    executable serves any number of members. Members are split and stacked on the host (numpy), which
    compiles nothing per member count. Args: a tuple of member-batched trees, then shared arrays."""
    def run(batched, *shared):
        batched = jax.device_get(batched)
        size = jax.tree.leaves(batched)[0].shape[0]
        outs = [member_fn(*jax.tree.map(lambda x: x[m], batched), *shared) for m in range(size)]
        return jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(outs))

    return run


@lru_cache(maxsize=None)
def compiled_init(in_dim, width):
    return jax.jit(lambda seed: init_params(jax.random.fold_in(jax.random.key(seed), 0), in_dim, width))


def init_members(static, seeds, in_dim):
    """Initial state of every member (host arrays): parameters, optimizer state, CBP statistics."""
    params = one_at_a_time(compiled_init(in_dim, static.width))((np.asarray(seeds),))
    state = {"params": params, "opt": make_optimizer(static, {"lr": 0.0, "weight_decay": 0.0}).init(params)}
    if static.cbp:
        state["cbp"] = [jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], len(seeds), axis=0),
                                     common.cbp_init(static.width)) for _ in range(3)]
    return state


def sgd_step(static, hp, optimizer, carry, inputs):
    """One single-image step: predict (counted for online accuracy), update, then CBP or S&P."""
    x, y, key = inputs
    state = dict(carry)

    def loss_fn(params):
        logits, features = forward(params, x)
        return cross_entropy(logits, y), (logits, features)

    (loss, (logits, features)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, state["opt"] = optimizer.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if static.cbp:
        max_replace = common.cbp_max_replace(static.replacement_rate, static.width)
        keep = jax.tree.map(jnp.ones_like, params)
        cbp_states = []
        for layer, k in enumerate(jax.random.split(key, 3)):
            cbp_state, idx, valid = common.cbp_select(
                state["cbp"][layer], features[layer], params[layer + 1]["w"], w_in=params[layer]["w"],
                utility=static.cbp_utility, replacement_rate=static.replacement_rate, decay_rate=static.decay_rate,
                maturity_threshold=static.maturity_threshold, max_replace=max_replace)
            cbp_states.append(cbp_state)
            w_in, b_in, w_out, keep_in, keep_b, keep_out = common.cbp_replace(
                k, params[layer]["w"], params[layer]["b"], params[layer + 1]["w"], idx, valid)
            params[layer] = {"w": w_in, "b": b_in}
            params[layer + 1] = {"w": w_out, "b": params[layer + 1]["b"]}
            keep[layer] = {"w": keep[layer]["w"] * keep_in, "b": keep[layer]["b"] * keep_b}
            keep[layer + 1] = {"w": keep[layer + 1]["w"] * keep_out, "b": keep[layer + 1]["b"]}
        state["cbp"] = cbp_states
        state["opt"] = common.mask_opt_state(optimizer, state["opt"], keep)
    if static.snp:
        params = common.shrink_perturb(params, key, static.perturb_scale)
    state["params"] = params
    return state, (jnp.argmax(logits) == y, loss)


def train_member(static, state, hp, seed, task, data):
    """Train one member on task `task`; returns the new state and the task's metrics."""
    train_x, train_y, test_x, test_y = data["train_x"], data["train_y"], data["test_x"], data["test_y"]
    perm, order, eval_order, k_steps, _ = task_randomness(seed, task, train_x.shape[0], test_x.shape[0],
                                                          train_x.shape[1])
    optimizer = make_optimizer(static, hp)
    step = lambda carry, inputs: sgd_step(static, hp, optimizer, carry, inputs)

    def images(idx):
        return train_x[idx][:, perm].astype(jnp.float32) / 255.0, train_y[idx]

    def run_steps(state, idx, chunk_index):
        x, y = images(idx)
        keys = jax.random.split(jax.random.fold_in(k_steps, chunk_index), idx.shape[0])
        state, (correct, loss) = jax.lax.scan(step, state, (x, y, keys))
        return state, x, jnp.sum(correct), jnp.sum(loss)

    def chunk(state, inputs):
        idx, chunk_index = inputs
        state, x, correct, loss = run_steps(state, idx, chunk_index)
        if static.er:  # Algorithm 1: ER ascent on the chunk's images at the current params
            with jax.default_matmul_precision(PRECISE):
                params, _ = common.er_ascent(state["params"], hidden_features, x, hp["er_lr"])
            state = {**state, "params": params}
        return state, (correct, loss)

    num_chunks, tail = divmod(static.steps, static.chunk)
    chunk_idx = order[:num_chunks * static.chunk].reshape(num_chunks, static.chunk)
    state, (correct, loss) = jax.lax.scan(chunk, state, (chunk_idx, jnp.arange(num_chunks)))
    correct, loss = jnp.sum(correct), jnp.sum(loss)
    if tail:  # a last partial chunk: SGD steps only, no ER step (it would need a full er_batch)
        state, _, c, l = run_steps(state, order[num_chunks * static.chunk:static.steps], num_chunks)
        correct, loss = correct + c, loss + l

    params = state["params"]
    eval_idx = eval_order[:static.eval_size]
    with jax.default_matmul_precision(PRECISE):
        logits, features = forward(params, test_x[eval_idx][:, perm].astype(jnp.float32) / 255.0)
        effective_rank = common.effective_ranks(features)
    leaves_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    metrics = {
        "online_acc": correct / static.steps,
        "online_loss": loss / static.steps,
        "test_acc": jnp.mean(jnp.argmax(logits, -1) == test_y[eval_idx]),
        "dead_units": jnp.stack([common.dead_units(f) for f in features]).astype(jnp.int32),
        "effective_rank": effective_rank,
        "param_norm": common.param_norm(params),
        "finite": leaves_finite & jnp.isfinite(loss),
    }
    return state, metrics


def hessian_member(samples, iters, probes, params, seed, task, phase, data):
    """SLQ spectrum of the cross-entropy task loss (no L2/ER term) on the task's first hessian_samples
    training images (paper App. G.4; the authors' code); phase 0 = task init, 1 = task end."""
    train_x, train_y = data["train_x"], data["train_y"]
    perm, order, _, _, k_hess = task_randomness(seed, task, train_x.shape[0], data["test_x"].shape[0],
                                                train_x.shape[1])
    idx = order[:samples]
    x, y = train_x[idx][:, perm].astype(jnp.float32) / 255.0, train_y[idx]
    loss_fn = lambda p: jnp.mean(cross_entropy(forward(p, x)[0], y))
    with jax.default_matmul_precision(PRECISE):
        return hessian.slq(loss_fn, params, jax.random.fold_in(k_hess, phase), iters, probes)


@lru_cache(maxsize=None)
def compiled_train(static):
    """train(state, hp, seeds, task, data) over all members; cached so equal configs share compilation.
    vmap batches the members inside one program (fast on accelerators); "map" runs them one after another,
    which measured ~2x faster per member than vmap on a CPU (BENCHMARKS.md)."""
    member = lambda state, hp, seed, task, data: train_member(static, state, hp, seed, task, data)
    if static.batching == "vmap":
        return jax.jit(jax.vmap(member, in_axes=(0, 0, 0, None, None)), donate_argnums=0)
    member = jax.jit(member)
    train = one_at_a_time(lambda state, hp, seed, task, data: member(state, hp, seed, task, data))
    return lambda state, hp, seeds, task, data: train((state, hp, seeds), task, data)


@lru_cache(maxsize=None)
def compiled_spectra(samples, iters, probes):
    """spectra(params, seeds, task, phase, data) -> (nodes, weights), each [members, probes, iters]: always
    one member at a time, since each Lanczos basis is [lanczos_iters, #params]."""
    member = jax.jit(lambda params, seed, task, phase, data: hessian_member(
        samples, iters, probes, params, seed, task, phase, data))
    spectra = one_at_a_time(lambda params, seed, task, phase, data: member(params, seed, task, phase, data))
    return lambda params, seeds, task, phase, data: spectra((params, seeds), task, phase, data)


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------
def resolve(args):
    """Check the arguments; return (configs, static hyperparameters) with the agent's defaults filled in."""
    agent = args.agent
    common.check_agent(agent, AGENTS)
    overrides = {"weight_decay": USES_WD, "er_lr": USES_ER, "er_batch": USES_ER,
                 "replacement_rate": ("cbp",), "decay_rate": ("cbp",), "maturity_threshold": ("cbp",),
                 "cbp_utility": ("cbp",), "perturb_scale": USES_SNP}
    for name, agents in overrides.items():
        if getattr(args, name) is not None and agent not in agents:
            common.fail(f"--{name.replace('_', '-')} does not apply to agent {agent} (only {', '.join(agents)})")
    positive = {"seeds": args.seeds, "tasks": args.tasks, "steps-per-task": args.steps_per_task,
                "width": args.width, "eval-size": args.eval_size, "hessian-samples": args.hessian_samples,
                "lanczos-iters": args.lanczos_iters, "hessian-probes": args.hessian_probes}
    for name, value in positive.items():
        if value < 1:
            common.fail(f"--{name} must be >= 1, got {value}")
    if args.hessian_every < 0 or args.max_grad_norm < 0 or args.checkpoint_minutes < 0:
        common.fail("--hessian-every, --max-grad-norm and --checkpoint-minutes must be >= 0")
    defaults = AGENT_DEFAULTS[agent]
    sweep = {"lr": tuple(args.lr)}
    if agent in USES_ER:
        sweep["er_lr"] = tuple(args.er_lr) if args.er_lr is not None else (defaults["er_lr"],)
    if agent in USES_WD:
        sweep["weight_decay"] = (tuple(args.weight_decay) if args.weight_decay is not None
                                 else (defaults["weight_decay"],))
    pick = lambda value, default: default if value is None else value
    er_batch = pick(args.er_batch, ER_BATCH)
    replacement_rate = pick(args.replacement_rate, REPLACEMENT_RATE)
    decay_rate = pick(args.decay_rate, DECAY_RATE)
    if er_batch < 2:
        common.fail(f"--er-batch must be >= 2 (an effective rank needs several samples), got {er_batch}")
    if not 0 <= replacement_rate <= 1 or not 0 <= decay_rate < 1:
        common.fail("--replacement-rate must be in [0, 1] and --decay-rate in [0, 1)")
    cbp_utility = pick(args.cbp_utility, CBP_UTILITY)
    if cbp_utility not in common.CBP_UTILITIES:
        common.fail(f"--cbp-utility must be one of {', '.join(common.CBP_UTILITIES)}, got {cbp_utility!r}")
    static = dict(
        er=agent in USES_ER, cbp=agent == "cbp", snp=agent in USES_SNP, width=args.width,
        steps=args.steps_per_task, chunk=er_batch if agent in USES_ER else CHUNK, eval_size=args.eval_size,
        replacement_rate=replacement_rate, decay_rate=decay_rate,
        maturity_threshold=pick(args.maturity_threshold, MATURITY_THRESHOLD), cbp_utility=cbp_utility,
        perturb_scale=pick(args.perturb_scale, PERTURB_SCALE), max_grad_norm=args.max_grad_norm)
    return common.sweep(**sweep), static


def finite_mean(values):
    values = np.asarray(values)
    return float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")


def main(args, dataset=None):
    """Run the experiment. `dataset` (tests) replaces MNIST: a dict of train_x [N, D] uint8, train_y [N] int,
    test_x [M, D] uint8, test_y [M] int."""
    configs, static_fields = resolve(args)
    if dataset is not None:
        data = dataset
    else:
        data = synthetic_mnist() if args.synthetic_data else load_mnist(args.data_dir, args.manual_dir)
    n_train, in_dim = data["train_x"].shape
    n_test = data["test_x"].shape[0]
    if args.steps_per_task > n_train:
        common.fail(f"--steps-per-task {args.steps_per_task} exceeds the {n_train} training images "
                    "(one pass per task)")
    if args.eval_size > n_test:
        common.fail(f"--eval-size {args.eval_size} exceeds the {n_test} test images")
    if args.hessian_every and args.hessian_samples > n_train:
        common.fail(f"--hessian-samples {args.hessian_samples} exceeds the {n_train} training images")
    batching = args.member_batching
    if batching == "auto":
        batching = "map" if jax.default_backend() == "cpu" and jax.local_device_count() == 1 else "vmap"
    static = Static(batching=batching, **static_fields)
    train = compiled_train(static)
    spectra = compiled_spectra(args.hessian_samples, args.lanczos_iters, args.hessian_probes)

    seeds = [args.seed + i for i in range(args.seeds)]
    config_index, member_seed = common.stack_members(configs, seeds)
    num_configs, num_seeds, members = len(configs), len(seeds), len(member_seed)
    hp = {name: jnp.asarray([configs[c].get(name, 0.0) for c in config_index], jnp.float32)
          for name in ("lr", "er_lr", "weight_decay")}
    member_seed = jnp.asarray(member_seed, jnp.int32)
    data = {k: jnp.asarray(v, jnp.uint8 if k.endswith("_x") else jnp.int32) for k, v in data.items()}

    run_dir, ckpt = common.open_run("pmnist", args, RESUME_FREE)
    if ckpt is not None:
        state, done = ckpt["state"], int(ckpt["tasks_done"])
        history, spectra_history, diverged = ckpt["history"], ckpt["spectra"], np.asarray(ckpt["diverged"])
        print(f"resuming {run_dir} after task {done}", flush=True)
    else:
        state, done = jax.device_put(init_members(static, member_seed, in_dim)), 0
        history, spectra_history, diverged = {}, {"tasks": []}, np.zeros((num_configs, num_seeds), bool)
    common.save_config(run_dir, args, configs, seeds)
    hp, member_seed, state = common.shard_members((hp, member_seed, state))
    print(f"pmnist {args.agent}: {members} members ({num_configs} configs x {num_seeds} seeds), "
          f"{len(jax.devices())} x {jax.devices()[0].device_kind}, member batching {batching}, out {run_dir}",
          flush=True)

    def save_outputs():
        shaped = lambda a: a.reshape((num_configs, num_seeds) + a.shape[1:])
        common.save_npz(run_dir / "metrics.npz", diverged=diverged,
                        **{k: shaped(np.stack(v, axis=1)) for k, v in history.items()})
        if spectra_history["tasks"]:
            common.save_npz(run_dir / "hessian.npz", tasks=np.asarray(spectra_history["tasks"]),
                            **{k: shaped(np.stack(v, axis=1)) for k, v in spectra_history.items() if k != "tasks"})

    def checkpoint():
        common.save_checkpoint(run_dir, {"args": asdict(args), "tasks_done": done, "state": state,
                                         "history": history, "spectra": spectra_history, "diverged": diverged})

    progress = common.Progress(args.tasks, "task", start_units=done)
    last_checkpoint, timed_tasks, timed_seconds = time.perf_counter(), 0, 0.0
    while done < args.tasks:
        task = done
        started = time.perf_counter()
        measure = args.hessian_every and task % args.hessian_every == 0
        if measure:  # "init": the previous task's final params on this task's data
            init_spectrum = jax.device_get(spectra(state["params"], member_seed, task, 0, data))
        state, metrics = train(state, hp, member_seed, task, data)
        metrics = jax.device_get(metrics)
        if measure:
            end_spectrum = jax.device_get(spectra(state["params"], member_seed, task, 1, data))
            spectra_history["tasks"].append(task)
            for phase, (nodes, weights) in (("init", init_spectrum), ("end", end_spectrum)):
                spectra_history.setdefault(f"{phase}_nodes", []).append(nodes)
                spectra_history.setdefault(f"{phase}_weights", []).append(weights)
        elapsed = time.perf_counter() - started
        if task > progress.start_units and not measure:  # leave out compilation and Hessian time
            timed_tasks, timed_seconds = timed_tasks + 1, timed_seconds + elapsed
        finite = metrics.pop("finite")
        for k in ("online_acc", "test_acc"):  # a non-finite network's argmax means nothing
            metrics[k] = np.where(finite, metrics[k], np.nan)
        for k, v in metrics.items():
            history.setdefault(k, []).append(np.asarray(v))
        diverged = common.report_diverged(finite.reshape(num_configs, num_seeds), configs, seeds,
                                          f"task {task}", known=diverged)
        done = task + 1
        progress.update(done, args.steps_per_task, online_acc=finite_mean(metrics["online_acc"]),
                        test_acc=finite_mean(metrics["test_acc"]))
        save_outputs()
        if time.perf_counter() - last_checkpoint >= 60 * args.checkpoint_minutes and done < args.tasks:
            checkpoint()
            last_checkpoint = time.perf_counter()
    checkpoint()
    save_outputs()
    if timed_tasks:
        per_step = timed_seconds / (timed_tasks * args.steps_per_task)
        print(f"speed: {per_step * 1e6:.1f} us per step for {members} members "
              f"({per_step * 1e6 / members:.2f} us per member-step, {members / per_step:,.0f} member-steps/s); "
              f"at this speed 800 tasks x 60,000 steps take {per_step * 800 * 60000 / 3600:.2f} h", flush=True)
    print(f"done: {run_dir}", flush=True)
    return run_dir


if __name__ == "__main__":
    main(common.cli(Args))
