"""Permuted MNIST (paper Sec. 6 and App. G; Dohare et al. 2024): online continual classification.

Each task draws a fresh random pixel permutation and trains on one pass over the 60,000 MNIST training
images in a fresh random order, one image per step (batch 1), plain SGD, MLP 784-1000x3-10 (ReLU,
Kaiming-uniform init; App. G.1). The headline metric is the online accuracy: the mean, over a task's steps,
of whether the prediction made *before* each update was right. The agents are the table `AGENTS` below.

Seeds and swept hyperparameters (--lr, --er-lr, --weight-decay) are "members" trained together. Each jitted
call runs a lax.scan over chunks of er_batch steps (an inner lax.scan of single-image SGD steps, then the ER
step on those images); a task is a few such calls, so Ctrl-C stops within seconds and --resume continues.
Members are vmapped on accelerators; on one CPU device they run one after another (--member-batching).

Choices where the paper is silent or the sources disagree (we follow the runs behind the paper's numbers):
- Data per task: all 60,000 training images once, in a fresh order with a fresh permutation (Dohare et al.;
  the authors' code held out 2,000 training images and repeated the last 100 of each task ~20 times, which
  inflates its online accuracy by ~0.032 x (1 - acc): expect ~0.872 for BP and ~0.949 for L2-ER at task 800
  here, against the paper's 0.876 / 0.951). Evaluation: 2,000 official test images per task, same permutation.
- Plain SGD: Table 1 lists gradient clipping 0.5, the authors' runs did not clip (--max-grad-norm turns it on).
- ER (the authors' code, Algorithm 1): a separate plain ascent step on the mean effective rank of the three
  hidden layers' features of the last er_batch images, at the current parameters, after every er_batch SGD
  steps; outside the optimizer. A task whose length is not a multiple of er_batch ends with SGD steps only.
- CBP (--cbp-variant dohare, the default): Dohare et al.'s algorithm and their Permuted MNIST utility
  (adaptable_contribution), on the 3 hidden layers: lowest bias-corrected utility first, fresh incoming weights
  from the init, outgoing weights 0. The paper's CBP curve came from the authors' code, so its 0.938 at task
  800 is not expected to match exactly; --cbp-variant paper runs that code's algorithm (common.cbp_select_paper,
  cbp_replace_paper) on the same 3 layers: the HIGHEST-utility units (|mean h| x mean|w_out|, no bias
  correction) get incoming weights U(+-sqrt(6 / 784)) (first layer) or U(+-sqrt(6 / width)) and outgoing
  weights re-randomized U(+-sqrt(6 / width)), the output layer's included (plain SGD: no optimizer state).
- Agents beyond the paper's table: layernorm-l2 and spectral-reg as the authors' later runs (lr 1e-2; weight decay
  1e-5 on every parameter, LayerNorm scales included / lambda 1e-3, sigma_max^2 pulled to 2 by 10 power iterations
  from fixed vectors, no weight decay). --spectral-persistent True --power-iters 1 is our cheaper variant. ReDo (Sokar
  et al. 2023): no source gives tau or a period for this benchmark; ours come from a width-100 sweep (README).
- Effective rank, the ER step and the Hessian run at full float32 matmul precision; the SGD steps at JAX's
  default (TF32 on some GPUs). Dead units and effective rank are measured on the 2,000 eval images.

    python pmnist.py --agent l2-er --seeds 5          # the paper's run: 800 tasks x 60,000 steps x 5 seeds
    python pmnist.py --agent bp --tasks 3 --steps-per-task 10000 --width 100 --manual-dir ~/mnist  # ~1 min
"""
import os

# Before jax loads LAPACK (scipy's OpenBLAS): OpenBLAS's threads on top of XLA's oversubscribe the cores
# (two l2-er runs side by side on a 2-core CPU ran 6.8x slower than two bp runs; 1.2x with one thread each).
# A user's own OPENBLAS_NUM_THREADS wins. No effect on GPU runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # noqa: E402 (after the environment is set)
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

# The agents (App. D; paper Table 2 "Fixed LR Best" with lr 1e-2, Table 1 defaults). An agent is its entry: the
# hyperparameters it uses, with their defaults; a flag overrides one. A key switches its mechanism on:
# weight_decay -> coupled L2, er_lr -> the ER step, replacement_rate -> continual backprop (Dohare et al. 2024),
# perturb_scale -> Shrink & Perturb (Ash & Adams 2020; the paper sweeps none for pMNIST: Table 1's default),
# layer_norm -> LayerNorm before each hidden ReLU, spectral_lambda -> the spectral penalty, redo_tau -> ReDo.
AGENTS = {
    "bp": {},
    "l2": dict(weight_decay=1e-3),
    "er": dict(er_lr=1e-3, er_batch=100),
    "l2-er": dict(weight_decay=1e-3, er_lr=1e-3, er_batch=100),  # the paper's method (Algorithm 1)
    "cbp": dict(replacement_rate=1e-6, decay_rate=0.99, maturity_threshold=100, cbp_utility="adaptable_contribution",
                cbp_variant="dohare"),
    "snp": dict(perturb_scale=1e-5),
    "snp-l2": dict(perturb_scale=1e-5, weight_decay=1e-3),
    "spectral-reg": dict(spectral_lambda=1e-3, spectral_k=2.0, spectral_target=2.0, power_iters=10,
                         spectral_persistent=False),
    "layernorm-l2": dict(layer_norm=True, weight_decay=1e-5),  # the authors' chosen run (lr 1e-2)
    "redo": dict(redo_tau=0.025, redo_every=1000),  # Sokar et al. 2023; no source value: our sweep picked these
}
SWEPT = ("lr", "weight_decay", "er_lr")  # traced hyperparameters: several values train together as configs


@dataclass(frozen=True)
class Args:
    agent: Literal[tuple(AGENTS)] = "l2-er"
    """algorithm: an entry of AGENTS (its defaults are the paper's Table 2 fixed-LR best values)"""
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
    """coupled L2 weight decay(s), added to the gradient (agents with weight_decay in AGENTS)"""
    er_lr: tuple[float, ...] | None = None
    """effective-rank ascent step size(s) (agents with er_lr)"""
    er_batch: int | None = None
    """ER step every er_batch SGD steps, on those er_batch images' features of all 3 hidden layers (agents with er_lr)"""
    replacement_rate: float | None = None
    """CBP units replaced per eligible unit per step"""
    decay_rate: float | None = None
    """CBP utility running-average decay"""
    maturity_threshold: int | None = None
    """CBP steps before a unit may be replaced"""
    cbp_utility: Literal[common.CBP_UTILITIES] | None = None
    """CBP utility (Dohare et al.): contribution, or adaptable_contribution (their Permuted MNIST config); not with --cbp-variant paper"""
    cbp_variant: Literal[common.CBP_VARIANTS] | None = None
    """CBP algorithm: dohare (Dohare et al.'s, lowest utility, outgoing weights 0) or paper (the authors' code behind the paper's CBP curve: highest utility, outgoing weights re-randomized)"""
    perturb_scale: float | None = None
    """std of the Gaussian noise added to every parameter after each step (Shrink & Perturb)"""
    spectral_lambda: float | None = None
    """weight of the spectral penalty (Lewandowski et al. 2024): sum over kernels of (sigma_max^k - target)^2, plus squared biases"""
    spectral_k: float | None = None
    """power of sigma_max in the spectral penalty (the authors: 2)"""
    spectral_target: float | None = None
    """target of sigma_max^k (the authors: 2; Lewandowski et al.'s "close to one": 1)"""
    power_iters: int | None = None
    """power iterations per kernel and step for sigma_max, from a fixed start vector (the authors: 10)"""
    spectral_persistent: bool | None = None
    """start each step's power iterations from the last step's vectors (carried in the state) instead of the fixed ones; with --power-iters 1 it costs ~1/10 (our option, not the authors')"""
    layer_norm: bool | None = None
    """LayerNorm (learnable scale and shift, eps 1e-6) before each hidden ReLU (agents with layer_norm)"""
    redo_tau: float | None = None
    """ReDo: recycle hidden units whose score mean|h_i| / (layer mean of mean|h_k|) is <= tau (our choice, from a width-100 sweep; no source gives one for pMNIST)"""
    redo_every: int | None = None
    """ReDo: score and recycle every K SGD steps of a task, on the last 100 training images (a multiple of 100; our choice from the sweep)"""
    max_grad_norm: float = 0.0
    """clip each step's gradient to this global norm; 0 = off (plain SGD, as the authors' runs; Table 1 lists 0.5)"""
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
    """folder of the MNIST cache and of tensorflow-datasets' downloads (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"""
    manual_dir: str | None = None
    """folder holding the four MNIST .gz files (read directly, no download)"""
    synthetic_data: bool = False
    """random images and labels of MNIST's shapes instead of MNIST (speed and regression tests; nothing to learn)"""
    out_dir: str | None = None
    """run directory (default: runs/pmnist__<agent>__<UTC stamp>/); with --resume, the run to continue"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint"""
    checkpoint_minutes: float = 5.0
    """minutes of work between checkpoints (one is also written at the end and on Ctrl-C)"""
    member_batching: Literal[runner.MEMBER_BATCHING] = "auto"
    """how seeds x configs run together: vmap (one batched program) or map (one member after another); auto = map on one CPU device (faster there), else vmap"""
    distributed: bool = False
    """join a job of several processes (hosts) that SLURM or Open MPI started (srun, mpirun): the members spread over every process's devices"""
    coordinator: str | None = None
    """HOST:PORT of process 0 of a job of several processes started by hand (with --num-processes and --process-id)"""
    num_processes: int | None = None
    """processes in the job (with --coordinator)"""
    process_id: int | None = None
    """this process's index in the job, 0 .. num-processes - 1 (with --coordinator)"""


CHUNK = 100  # SGD steps per inner scan for agents without ER (the per-step noise keys are folded per chunk)
CALL_STEPS = 2000  # about this many steps per jitted call: Ctrl-C and checkpoints wait at most one call
PRECISE = "highest"  # matmul precision of effective rank and Hessian (TF32 would blur small singular values)
# Args that may change between a run and its --resume (the results stay the same up to float rounding).
RESUME_FREE = ("tasks", "resume", "out_dir", "data_dir", "manual_dir", "checkpoint_minutes", "member_batching")


# ----------------------------------------------------------------------------------------------------------
# Network (App. G.1): 784 -> width x 3 (ReLU) -> 10
# ----------------------------------------------------------------------------------------------------------
def init_params(key, in_dim, width):
    sizes = [in_dim, width, width, width, 10]
    keys = jax.random.split(key, len(sizes) - 1)
    return [common.dense_init(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def forward(params, x):
    """Logits and the post-ReLU features of the 3 hidden layers; x is [784] or [n, 784]."""
    features = []
    for layer in params[:-1]:
        x = x @ layer["w"] + layer["b"]
        if "scale" in layer:  # agents with layer_norm
            x = common.layer_norm(x, layer["scale"], layer["shift"])
        x = jax.nn.relu(x)
        features.append(x)
    return x @ params[-1]["w"] + params[-1]["b"], features


def cross_entropy(logits, labels):
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]


def hidden_features(params, x):
    return forward(params, x)[1]


# ----------------------------------------------------------------------------------------------------------
# One member (a config x seed). Its randomness depends only on (seed, task), never on its position among the
# members, so a seed run alone reproduces the same member of a multi-seed run.
# ----------------------------------------------------------------------------------------------------------
def task_randomness(seed, task, n_train, n_test, in_dim):
    """The task's pixel permutation, its order of the training images, its eval subset, and the keys of its
    per-step noise (CBP, S&P) and of its Hessian probes."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), task)
    k_perm, k_order, k_eval, k_steps, k_hess = jax.random.split(key, 5)
    return (jax.random.permutation(k_perm, in_dim), jax.random.permutation(k_order, n_train),
            jax.random.permutation(k_eval, n_test), k_steps, k_hess)


def make_train(args, agent, ds):
    """The run's functions of one member (PureJaxRL's make_train): init(seed) -> state; shuffle(seed, task) ->
    the task's (pixel permutation, image order), computed once per task; train(state, hp, seed, task, shuffled,
    data, first, count) -> (state, correct, loss) over the task's chunks first .. first + count - 1 (count static;
    0 = the SGD-only tail of the last steps_per_task % chunk steps); evaluate(params, seed, task, data) ->
    metrics; spectrum(params, seed, task, phase, data) -> SLQ (nodes, weights); and `calls`, the (first, count)
    that make up one task. `agent` is the resolved AGENTS entry. `data` is the dataset `ds` on the device, an
    argument: closed over, the 60,000 images would be a constant compiled into every program (a 94 MB program,
    4x the compile time); the functions below use only the sizes of `ds`."""
    (n_train, in_dim), n_test = ds["train_x"].shape, ds["test_x"].shape[0]
    chunk = agent.get("er_batch", CHUNK)
    num_chunks, tail = divmod(args.steps_per_task, chunk)

    def optimizer(hp):
        opt = common.sgd(hp["lr"], hp.get("weight_decay", 0.0))
        return optax.chain(optax.clip_by_global_norm(args.max_grad_norm), opt) if args.max_grad_norm > 0 else opt

    def init(seed):
        params = init_params(jax.random.fold_in(jax.random.key(seed), 0), in_dim, args.width)
        if agent.get("layer_norm"):
            params = [{**p, "scale": jnp.ones(args.width), "shift": jnp.zeros(args.width)} for p in params[:-1]] + params[-1:]
        state = {"params": params, "opt": optimizer({"lr": 0.0}).init(params)}
        if agent.get("spectral_persistent"):  # an agent's own state goes here: step reads it and writes it back
            state["spectral_v"] = common.spectral_starts(params)
        if "replacement_rate" in agent:
            state["cbp"] = [common.cbp_init(args.width) for _ in range(3)]
        return state

    def step(hp, state, inputs):
        """One single-image step: predict (counted for online accuracy), update, then CBP or S&P."""
        x, y, key = inputs
        opt = optimizer(hp)

        def loss_fn(params):
            logits, features = forward(params, x)
            loss, vectors = cross_entropy(logits, y), None
            if "spectral_lambda" in agent:  # spectral regularization, in the loss
                penalty, vectors = common.spectral_penalty(params, agent["spectral_k"], agent["spectral_target"],
                                                           agent["power_iters"], state.get("spectral_v"))
                loss = loss + agent["spectral_lambda"] * penalty
            return loss, (logits, features, vectors)

        (_, (logits, features, vectors)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        loss = cross_entropy(logits, y)  # online loss: the task's cross-entropy only
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        state = {**state, "params": optax.apply_updates(state["params"], updates), "opt": opt_state}
        if "spectral_v" in state:
            state["spectral_v"] = vectors
        if "replacement_rate" in agent:
            state = cbp_step(agent, opt, state, features, key)
        if "perturb_scale" in agent:
            state["params"] = common.shrink_perturb(state["params"], key, agent["perturb_scale"])
        return state, (jnp.argmax(logits) == y, loss)

    def shuffle(seed, task):
        perm, order, _, _, _ = task_randomness(seed, task, n_train, n_test, in_dim)
        return perm, order

    def train(state, hp, seed, task, shuffled, data, first, count):
        # The permutations come in from shuffle (sorting 60,000 keys per call cost ~50 ms on a CPU); only the
        # step keys are derived here (XLA drops the unused permutations).
        (perm, order), (_, _, _, k_steps, _) = shuffled, task_randomness(seed, task, n_train, n_test, in_dim)

        def run_chunk(state, inputs):
            idx, chunk_index = inputs
            x = data["train_x"][idx][:, perm].astype(jnp.float32) / 255.0
            chunk_key = jax.random.fold_in(k_steps, chunk_index)
            keys = jax.random.split(chunk_key, idx.shape[0])
            state, (correct, loss) = jax.lax.scan(lambda s, i: step(hp, s, i), state, (x, data["train_y"][idx], keys))
            # Algorithm 1: ER ascent on the chunk's images, after its SGD steps, as the authors' pMNIST code
            # (their ImageNet and CIFAR code takes it before the group's steps; imagenet.py and cifar.py follow that).
            if "er_lr" in agent and idx.shape[0] == chunk:
                with jax.default_matmul_precision(PRECISE):
                    params, _ = common.er_ascent(state["params"], hidden_features, x, hp["er_lr"])
                state = {**state, "params": params}
            if "redo_tau" in agent:  # ReDo, on the chunk's images, every redo_every steps of the task
                due = (chunk_index * chunk + idx.shape[0]) % agent["redo_every"] == 0
                state = redo_step(agent, optimizer(hp), state, x, jax.random.fold_in(chunk_key, 1), due)
            return state, (jnp.sum(correct), jnp.sum(loss))

        if count == 0:  # the tail: the task's last steps_per_task % chunk steps, SGD only
            idx = jax.lax.dynamic_slice_in_dim(order, num_chunks * chunk, tail)
            state, (correct, loss) = run_chunk(state, (idx, num_chunks))
            return state, correct, loss
        idx = jax.lax.dynamic_slice_in_dim(order, first * chunk, count * chunk).reshape(count, chunk)
        state, (correct, loss) = jax.lax.scan(run_chunk, state, (idx, first + jnp.arange(count)))
        return state, jnp.sum(correct), jnp.sum(loss)

    def evaluate(params, seed, task, data):
        perm, _, eval_order, _, _ = task_randomness(seed, task, n_train, n_test, in_dim)
        idx = eval_order[:args.eval_size]
        with jax.default_matmul_precision(PRECISE):
            logits, features = forward(params, data["test_x"][idx][:, perm].astype(jnp.float32) / 255.0)
            effective_rank = common.effective_ranks(features)
        return {"test_acc": jnp.mean(jnp.argmax(logits, -1) == data["test_y"][idx]),
                "dead_units": jnp.stack([common.dead_units(f) for f in features]).astype(jnp.int32),
                "effective_rank": effective_rank, "param_norm": common.param_norm(params),
                "finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))}

    def spectrum(params, seed, task, phase, data):
        """SLQ spectrum of the cross-entropy task loss (no L2/ER term) on the task's first hessian_samples
        training images (paper App. G.4; the authors' code); phase 0 = task init, 1 = task end."""
        perm, order, _, _, k_hess = task_randomness(seed, task, n_train, n_test, in_dim)
        idx = order[:args.hessian_samples]
        x, y = data["train_x"][idx][:, perm].astype(jnp.float32) / 255.0, data["train_y"][idx]
        loss_fn = lambda p: jnp.mean(cross_entropy(forward(p, x)[0], y))
        with jax.default_matmul_precision(PRECISE):
            return hessian.slq(loss_fn, params, jax.random.fold_in(k_hess, phase), args.lanczos_iters,
                               args.hessian_probes)

    per_call = max(1, CALL_STEPS // chunk)
    calls = [(f, min(per_call, num_chunks - f)) for f in range(0, num_chunks, per_call)] + ([(num_chunks, 0)] if tail else [])
    return init, shuffle, train, evaluate, spectrum, calls


def replace_units(params, keep, layer, key, idx, valid, paper=False):
    """Units idx[valid] of hidden layer `layer` get fresh incoming weights (the init) and bias 0, outgoing weights
    0, and keep-masks 0 for their optimizer state (CBP and ReDo); `paper`: the authors' CBP re-initialization
    (common.cbp_replace_paper: outgoing weights re-randomized). Updates the lists `params` and `keep`."""
    replace = common.cbp_replace_paper if paper else common.cbp_replace
    w_in, b_in, w_out, keep_in, keep_b, keep_out = replace(
        key, params[layer]["w"], params[layer]["b"], params[layer + 1]["w"], idx, valid)
    params[layer] = {**params[layer], "w": w_in, "b": b_in}
    params[layer + 1] = {**params[layer + 1], "w": w_out}
    keep[layer] = {**keep[layer], "w": keep[layer]["w"] * keep_in, "b": keep[layer]["b"] * keep_b}
    keep[layer + 1] = {**keep[layer + 1], "w": keep[layer + 1]["w"] * keep_out}


def cbp_step(agent, opt, state, features, key):
    """Continual backprop after an SGD step: per hidden layer, replace the lowest-utility mature units (Dohare
    et al.) or, with cbp_variant paper, the highest-utility ones as the authors' code."""
    params, width = list(state["params"]), state["cbp"][0].utility.shape[0]
    keep = jax.tree.map(jnp.ones_like, params)
    cbp_states, paper = [], agent["cbp_variant"] == "paper"
    hp = dict(replacement_rate=agent["replacement_rate"], decay_rate=agent["decay_rate"],
              maturity_threshold=agent["maturity_threshold"],
              max_replace=common.cbp_max_replace(agent["replacement_rate"], width))
    for layer, k in enumerate(jax.random.split(key, 3)):
        if paper:
            cbp_state, idx, valid = common.cbp_select_paper(state["cbp"][layer], features[layer],
                                                            params[layer + 1]["w"], **hp)
        else:
            cbp_state, idx, valid = common.cbp_select(
                state["cbp"][layer], features[layer], params[layer + 1]["w"], w_in=params[layer]["w"],
                utility=agent["cbp_utility"], **hp)
        cbp_states.append(cbp_state)
        replace_units(params, keep, layer, k, idx, valid, paper)
    return {**state, "params": params, "cbp": cbp_states,
            "opt": common.mask_opt_state(opt, state["opt"], keep)}


def redo_step(agent, opt, state, x, key, due):
    """ReDo (Sokar et al. 2023) when `due`: per hidden layer, the units dormant on the images x get fresh
    incoming weights (the layer's init), bias 0, outgoing weights 0 (the output is unchanged) and zeroed
    optimizer state; the output layer is never recycled."""
    params = list(state["params"])
    features, keep = hidden_features(params, x), jax.tree.map(jnp.ones_like, params)
    for layer, k in enumerate(jax.random.split(key, 3)):
        dormant = common.dormant_units(features[layer], agent["redo_tau"]) & due
        replace_units(params, keep, layer, k, jnp.arange(dormant.shape[0]), dormant)
    return {**state, "params": params, "opt": common.mask_opt_state(opt, state["opt"], keep)}


# ----------------------------------------------------------------------------------------------------------
# Settings (no need to modify to fork)
# ----------------------------------------------------------------------------------------------------------
def resolve(args, ds):
    """The agent's hyperparameters (its AGENTS entry overridden by the flags given) and the configs to sweep;
    stops with one line on a setting that would silently give wrong science."""
    agent = runner.agent_settings(args, AGENTS)
    n_train, n_test = ds["train_x"].shape[0], ds["test_x"].shape[0]
    checks = [(args.seeds >= 1 and args.tasks >= 1 and args.width >= 1, "--seeds, --tasks and --width must be >= 1"),
              (1 <= args.steps_per_task <= n_train,
               f"--steps-per-task {args.steps_per_task} exceeds the {n_train} training images (one pass per task)"),
              (1 <= args.eval_size <= n_test, f"--eval-size {args.eval_size} exceeds the {n_test} test images"),
              (not args.hessian_every or 1 <= args.hessian_samples <= n_train,
               f"--hessian-samples {args.hessian_samples} exceeds the {n_train} training images"),
              (args.lanczos_iters >= 1 and args.hessian_probes >= 1, "--lanczos-iters and --hessian-probes must be >= 1"),
              (args.hessian_every >= 0 and args.max_grad_norm >= 0 and args.checkpoint_minutes >= 0,
               "--hessian-every, --max-grad-norm and --checkpoint-minutes must be >= 0"),
              (agent.get("er_batch", 2) >= 2, "--er-batch must be >= 2 (an effective rank needs several samples)"),
              (agent.get("redo_every", CHUNK) % CHUNK == 0 and agent.get("redo_every", 1) > 0,
               f"--redo-every must be a positive multiple of {CHUNK} (ReDo scores a chunk's images)"),
              (agent.get("power_iters", 1) >= 1, "--power-iters must be >= 1"),
              (0 <= agent.get("replacement_rate", 0) <= 1 and 0 <= agent.get("decay_rate", 0) < 1,
               "--replacement-rate must be in [0, 1] and --decay-rate in [0, 1)"),
              (agent.get("cbp_variant") != "paper" or args.cbp_utility is None,
               "--cbp-utility does not apply to --cbp-variant paper (the authors' utility: |mean h| x mean|w_out|)")]
    return agent, runner.agent_configs(agent, checks, SWEPT, args.lr)


def load_data(args):
    return data.synthetic_mnist() if args.synthetic_data else data.mnist(args.data_dir, args.manual_dir)


# ----------------------------------------------------------------------------------------------------------
# Driver: data, init or resume, then for each task: train (in calls), measure, record, checkpoint
# ----------------------------------------------------------------------------------------------------------
def main(args, dataset=None):
    """Run the experiment. `dataset` (tests) replaces MNIST: a dict of train_x [N, D] uint8, train_y [N] int,
    test_x [M, D] uint8, test_y [M] int."""
    runner.init_processes(args)
    runner.check_agent(args, AGENTS, SWEPT)
    ds = load_data(args) if dataset is None else dataset
    agent, configs = resolve(args, ds)
    ds = {k: jnp.asarray(v, jnp.uint8 if k.endswith("_x") else jnp.int32) for k, v in ds.items()}
    members = runner.Members(configs, [args.seed + i for i in range(args.seeds)], args.member_batching)
    init, shuffle, train, evaluate, spectrum, calls = make_train(args, agent, ds)
    measured = list(range(0, args.tasks, args.hessian_every)) if args.hessian_every else []
    run = runner.Run("pmnist", args, RESUME_FREE, members, args.tasks, METRICS, spectra_shapes(args), len(measured))
    state = members.run(init, (0,), batching="map")(members.seeds) if run.state is None else run.state
    hp, seeds, state = runner.shard_members((members.hyperparameters(SWEPT), members.seeds, state))
    shuffle = members.run(shuffle, (0, None))
    train_calls = {n: members.run(lambda s, h, sd, t, o, d, f, n=n: train(s, h, sd, t, o, d, f, n),
                                  (0, 0, 0, None, 0, None, None)) for n in {count for _, count in calls}}
    evaluate = members.run(evaluate, (0, 0, None, None))
    spectrum = members.run(spectrum, (0, 0, None, None, None), batching="map")  # a Lanczos basis per member
    stop, start = runner.StopRequests(), run.cursor["unit"]
    progress, timer, last_checkpoint = runner.Progress(args.tasks, "task", start), runner.StepTimer(), time.time()
    print(f"{runner.script_name(args)} {args.agent}: {members}, out {run.dir}", flush=True)
    for task in range(start, args.tasks):
        k = measured.index(task) if task in measured else None
        if k is not None and run.cursor["call"] == 0:  # "init": the last task's final params on this task's data
            run.spectra["init_nodes"][:, k], run.spectra["init_weights"][:, k] = members.host(spectrum(
                state["params"], seeds, task, 0, ds))
        shuffled = shuffle(seeds, task)
        for i in range(run.cursor["call"], len(calls)):
            with timer.timing(task > start):  # the first task compiles
                state, correct, loss = train_calls[calls[i][1]](state, hp, seeds, task, shuffled, ds, calls[i][0])
                correct, loss = members.host((correct, loss))
            timer.steps += members.count * call_steps(args, agent, calls[i]) * (task > start)
            run.accumulate(i + 1, correct=correct, loss=loss)
            if stop.requested and i + 1 < len(calls):
                run.checkpoint(state)
                steps_done = sum(call_steps(args, agent, c) for c in calls[:i + 1])
                stop.exit(f"task {task + 1}/{args.tasks} (step {steps_done:,} of {args.steps_per_task:,})",
                          runner.resume_command(args, run.dir))
        metrics = members.host(evaluate(state["params"], seeds, task, ds))
        if k is not None:
            run.spectra["end_nodes"][:, k], run.spectra["end_weights"][:, k] = members.host(spectrum(
                state["params"], seeds, task, 1, ds))
        total = run.cursor["partial"]
        metrics.update(online_acc=total["correct"] / np.float32(args.steps_per_task),
                       online_loss=total["loss"] / np.float32(args.steps_per_task),
                       finite=metrics["finite"] & np.isfinite(total["loss"]))
        run.record(task, metrics, f"task {task}")
        progress.update(task + 1, args.steps_per_task, online_acc=runner.finite_mean(metrics["online_acc"]),
                        test_acc=runner.finite_mean(metrics["test_acc"]))
        run.save(measured[:sum(t <= task for t in measured)])
        if stop.due(last_checkpoint, args.checkpoint_minutes) or task + 1 == args.tasks:
            run.checkpoint(state)
            last_checkpoint = time.time()
            if stop.requested and task + 1 < args.tasks:
                stop.exit(f"task {task + 1}/{args.tasks}", runner.resume_command(args, run.dir))
    stop.close()
    print(speed_line(args, timer, members.count), flush=True)
    print(f"done: {run.dir}", flush=True)
    return run.dir


def call_steps(args, agent, call):
    chunk = agent.get("er_batch", CHUNK)
    return call[1] * chunk if call[1] else args.steps_per_task % chunk


def speed_line(args, timer, members):
    """Throughput of the timed calls; the paper-scale projection only from a run at the paper's width."""
    if not timer.steps:
        return "speed: not measured (only one task ran in this process; the first compiles)"
    per_step = timer.seconds / timer.steps
    line = (f"speed at width {args.width}: {per_step * 1e6:.2f} us per member-step ({1 / per_step:,.0f} member-steps/s)")
    if args.width == 1000:
        line += f"; the paper's run (800 tasks x 60,000 steps) of {members} members takes {per_step * 48e6 * members / 3600:.2f} h"
    return line


METRICS = {"online_acc": ((), np.float32), "online_loss": ((), np.float32), "test_acc": ((), np.float32),
           "dead_units": ((3,), np.int32), "effective_rank": ((3,), np.float32), "param_norm": ((), np.float32)}


def spectra_shapes(args):
    shape = ((args.hessian_probes, args.lanczos_iters), np.float32)
    return {f"{phase}_{part}": shape for phase in ("init", "end") for part in ("nodes", "weights")}


if __name__ == "__main__":
    with runner.quiet_on_closed_pipe():
        main(runner.cli(Args, AGENTS))
