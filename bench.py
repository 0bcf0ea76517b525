"""Speed of every benchmark, each against a baseline measured in the same process, as one markdown table.

    python bench.py                 # full sizes (~8 min on one H100, its estimate printed first); the table also
                                    # goes to runs/bench__<UTC stamp>.md
    python bench.py --quick         # every size shrunk: a smoke run on a CPU (~2.5 CPU-minutes, mostly compiling)
    python bench.py --only pmnist er --set width=100    # some sections; any size overridden

What each row times is the scripts' own jitted training calls, on synthetic data of the real shapes (the
content of an image does not change the cost of a step): pmnist's `make_train` calls of ~2,000 single-image
steps, the effective-rank routes of `common`, one Hessian spectrum by `hessian.slq`, and the step or chunk
functions of imagenet, cifar and ant_ppo. Every timing is the median of several calls after a warm-up; the
first call's extra time over the median is the compile time, in its own column.

The baselines are written here, bare: an SGD step of the same network in a `lax.scan` with nothing else
(the floor a training step can reach), MJX physics with random actions for the Ant, the Gram-matrix route for
the effective rank (cheap but inexact, see `common.singular_values`), plain Hessian-vector products for a
Lanczos run. Ratios are of time per unit of work: above 1 is slower than the baseline (or than bp).
The last column projects the paper's full run from the measured step time, next to its goal. --quick leaves
out the rows that would only add compilations (more agents and member counts through the same code), and
--max-minutes (default 8 at full size) stops measuring before a lent GPU's time runs out.
"""
import os

# Before jax loads LAPACK: OpenBLAS threads on top of XLA's oversubscribe a small CPU (see pmnist.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402 (after the environment is set); argparse: runs where only jax is installed
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import common
import data
import hessian
import pmnist
import runner

SECTIONS = ("pmnist", "er", "hessian", "imagenet", "cifar", "ant", "agents")
TITLES = {"pmnist": "pMNIST", "er": "ER routes", "hessian": "Hessian", "imagenet": "ImageNet", "cifar": "CIFAR",
          "ant": "Ant", "agents": "New agents"}
NOT_MEASURED = "not measured"


class Sizes(NamedTuple):
    repeats: int           # timed calls per row (the median is reported), after the warm-up calls
    warmups: int           # untimed calls after the first (compiling) one
    width: int             # pMNIST hidden units (the paper: 1000)
    call_steps: int        # pMNIST steps per timed call (the scripts: ~2,000 per jitted call)
    seeds: int             # pMNIST members trained together (the paper: 5)
    er_batch: int          # images per ER step (the paper: 100)
    eval_size: int         # pMNIST eval images (metric SVD at task end; the paper: 2,000)
    hessian_samples: int   # samples in the Hessian's loss (the paper: 2,000)
    lanczos_iters: int     # Lanczos iterations per spectrum (the paper: 100)
    conv_seeds: int        # ImageNet members (the paper: 10)
    conv_steps: int        # bare ConvNet steps per call
    conv_batch: int        # ImageNet minibatch (the paper: 100)
    imagenet_per_class: int  # training images per class (the paper: 600, so 12 steps of 100 per epoch)
    imagenet_epochs: int   # epochs per timed imagenet call
    cifar_width: int       # ResNet-18 stem channels (the paper: 64)
    cifar_dense: int       # units of its two dense layers (512)
    cifar_batch: int       # minibatch (100)
    cifar_steps: int       # steps per timed call (a multiple of cifar's ER interval, 5)
    cifar_seeds: int       # CIFAR members (the paper: 5)
    ant_seeds: int         # Ant members (the paper: 5)
    ant_envs: int          # envs per seed (64: a speed setting; ant_ppo's default is Table 8's 1)
    ant_samples: int       # samples per PPO update (2,048)
    ant_epochs: int        # epochs per update (10)
    ant_minibatches: int   # minibatches per epoch (128)
    ant_hidden: int        # hidden units of actor and critic (256)
    ant_updates: int       # updates per timed call
    ant_fast_compile: bool  # ant_ppo's --fast-compile (tiny runs only: halves compile time, slows steps)
    variants: bool         # also the rows that only add compilations (more agents, other member counts)


FULL = Sizes(repeats=5, warmups=1, width=1000, call_steps=2000, seeds=5, er_batch=100, eval_size=2000,
             hessian_samples=2000, lanczos_iters=100, conv_seeds=10, conv_steps=12, conv_batch=100,
             imagenet_per_class=600, imagenet_epochs=2, cifar_width=64, cifar_dense=512, cifar_batch=100,
             cifar_steps=20, cifar_seeds=5,
             ant_seeds=5, ant_envs=64, ant_samples=2048, ant_epochs=10, ant_minibatches=128, ant_hidden=256,
             ant_updates=2, ant_fast_compile=False, variants=True)
QUICK = Sizes(repeats=3, warmups=0, width=100, call_steps=2000, seeds=5, er_batch=100, eval_size=2000,
              hessian_samples=2000, lanczos_iters=10, conv_seeds=2, conv_steps=2, conv_batch=20,
              imagenet_per_class=20, imagenet_epochs=1, cifar_width=4, cifar_dense=16, cifar_batch=4,
              cifar_steps=5, cifar_seeds=2,
              ant_seeds=2, ant_envs=4, ant_samples=32, ant_epochs=1, ant_minibatches=2, ant_hidden=16,
              ant_updates=1, ant_fast_compile=True, variants=False)

# The paper's full runs and the goals for their wall time on one GPU.
PMNIST_RUN = dict(tasks=800, steps=60_000, seeds=5, goal_h=2.0)

# Expected cost of each section at full size on one H100: (programs compiled, seconds to compile each, seconds
# of timed calls). The timed calls follow from step times measured on an H100 (pMNIST batch-1 step with 5 seeds
# ~110 us, 10-seed ConvNet step ~3.1 ms, ResNet-18 step ~4.9 ms, MJX Ant step ~1.7 ms at 64 envs and ~1.4 ms at
# 1 env, 2,000-sample HVP ~0.5 ms) times the calls made (1 + warm-ups + repeats per row). GPU compile times were
# not measured: these are guesses from the CPU compile times of the same programs (CPU seconds: pMNIST bp 7, l2-er 9,
# spectral-reg 20; MJX Ant PPO chunk 29). --max-minutes stops the run if the guesses are wrong.
H100_PLAN = {"pmnist": (12, 8, 32), "er": (6, 3, 2), "hessian": (2, 5, 1), "imagenet": (4, 10, 6),
             "cifar": (3, 25, 20), "ant": (7, 30, 60), "agents": (9, 22, 27)}
RESERVE_S = 60  # a measurement starts only this long before the --max-minutes deadline (one slow compile)


class OverBudget(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------
# Rows and timing
# ----------------------------------------------------------------------------------------------------------
class Row(NamedTuple):
    section: str
    key: str                 # short id other rows refer to (baseline, bp)
    work: str
    seconds: float | None    # median seconds per unit of work (None: not measured)
    unit: str                # "step" (shown as us per step) or "env-step" (shown as env-steps/s)
    baseline: str | None     # key of the row this one is compared with
    bp: str | None           # key of the bp row of the same script and member count
    compile_s: float | None
    full_run: str            # projected full run vs its goal, or a note
    note: str = ""


class Bench:
    def __init__(self, sizes, quick, deadline=None):
        self.sizes, self.quick, self.rows, self.deadline = sizes, quick, [], deadline

    def check_budget(self):
        if self.deadline is not None and time.perf_counter() > self.deadline - RESERVE_S:
            raise OverBudget

    def add(self, section, key, work, seconds, unit="step", baseline=None, bp=None, compile_s=None, full_run="",
            note=""):
        row = Row(section, key, work, seconds, unit, baseline, bp, compile_s, full_run, note)
        self.rows.append(row)
        print(f"  {TITLES[section]}: {work}: {format_time(row)}"
              + (f" (compile {compile_s:.1f} s)" if compile_s is not None else "") + (f"; {note}" if note else ""),
              flush=True)
        return row

    def skip(self, section, work, why):
        self.add(section, None, work, None, full_run=NOT_MEASURED, note=why)

    def variant(self, section, work):
        """False (and a row saying so) for a row that --quick leaves out: its compile time is all it would add."""
        if not self.sizes.variants:
            self.skip(section, work, "left out by --quick (one more compilation, same code path)")
        return self.sizes.variants

    def find(self, section, key):
        return next((r for r in self.rows if (r.section, r.key) == (section, key)), None)

    def time(self, fn, *args, per=1):
        """(median seconds per unit, compile seconds) of `fn(*args)` doing `per` units of work per call."""
        self.check_budget()
        start = time.perf_counter()
        wait(fn(*args))
        first = time.perf_counter() - start
        for _ in range(self.sizes.warmups):
            wait(fn(*args))
        times = []
        for _ in range(self.sizes.repeats):
            start = time.perf_counter()
            wait(fn(*args))
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        return median / per, max(first - median, 0.0)


def wait(tree):
    """Block until every array of `tree` is computed (jax dispatches asynchronously; numpy leaves are done)."""
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


def format_seconds(seconds):
    """Microseconds below 10 ms, else milliseconds."""
    return f"{seconds * 1e6:,.1f} us" if seconds < 1e-2 else f"{seconds * 1e3:,.1f} ms"


def format_time(row):
    if row.seconds is None:
        return NOT_MEASURED
    if row.unit == "env-step":
        return f"{1 / row.seconds:,.0f} env-steps/s"
    return f"{format_seconds(row.seconds)} per {row.unit}"


def format_hours(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def projection(seconds, goal_s, quick):
    """'<projected> (goal <= <goal>: met / missed)'; at --quick sizes the projection would mean nothing."""
    if quick:
        return "- (quick sizes)"
    verdict = "met" if seconds <= goal_s else "missed"
    return f"{format_hours(seconds)} (goal <= {format_hours(goal_s)}: {verdict})"


# ----------------------------------------------------------------------------------------------------------
# 1. Permuted MNIST: pmnist's own ~2,000-step training calls against a bare lax.scan SGD step
# ----------------------------------------------------------------------------------------------------------
def bare_mlp_train(width, lr=0.01):
    """One member's bare SGD loop: batch-1 steps of the 784-width x 3-10 MLP in a lax.scan, nothing else
    (no online-accuracy bookkeeping, no data gather, no regularizer): the floor a training step can reach."""
    def init(seed):
        return pmnist.init_params(jax.random.key(seed), 784, width)

    def loss(params, x, y):
        return pmnist.cross_entropy(pmnist.forward(params, x)[0], y)

    def step(params, xy):
        grads = jax.grad(loss)(params, *xy)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), None

    def train(params, xs, ys):
        return jax.lax.scan(step, params, (xs, ys))[0]

    return init, train


def pmnist_setup(sizes, agent_name, seeds, ds, **flags):
    """pmnist's member functions for one agent (and `flags`, more Args) at these sizes: (members, state, hp,
    train call of one `call_steps` chunk of a task, evaluate, spectrum)."""
    args = pmnist.Args(agent=agent_name, seeds=seeds, width=sizes.width, steps_per_task=sizes.call_steps,
                       eval_size=sizes.eval_size, hessian_samples=sizes.hessian_samples,
                       lanczos_iters=sizes.lanczos_iters, synthetic_data=True,
                       er_batch=sizes.er_batch if "er_batch" in pmnist.AGENTS[agent_name] else None, **flags)
    agent, configs = pmnist.resolve(args, ds)
    members = runner.Members(configs, [args.seed + i for i in range(seeds)], args.member_batching)
    init, shuffle, train, evaluate, spectrum, calls = pmnist.make_train(args, agent, ds)
    assert len(calls) == 1 and calls[0][0] == 0, calls  # call_steps is a multiple of the chunk
    count = calls[0][1]
    state = members.run(init, (0,), batching="map")(members.seeds)
    hp, member_seeds, state = runner.shard_members((members.hyperparameters(pmnist.SWEPT), members.seeds, state))
    shuffled = members.run(shuffle, (0, None))(member_seeds, 0)  # once per task in a run: not timed
    call = members.run(lambda s, h, sd, t, o, d, f: train(s, h, sd, t, o, d, f, count), (0, 0, 0, None, 0, None, None))
    return dict(members=members, state=state, hp=hp, seeds=member_seeds, shuffled=shuffled, train=call,
                evaluate=evaluate, spectrum=spectrum, data=ds)


def pmnist_cached(setups, sizes, agent_name, seeds, ds, **flags):
    """pmnist_setup, built once per (agent, seeds, flags). Members run one after another ("map") share one
    compiled single-member program whatever their number: a smaller member count takes the first members of
    a larger setup instead of compiling again."""
    key = (agent_name, seeds, tuple(sorted(flags.items())))
    if key not in setups:
        larger = [s for (a, n, f), s in setups.items()
                  if (a, f) == (agent_name, key[2]) and n > seeds and s["members"].batching == "map"]
        if larger:
            first = lambda tree: jax.tree.map(lambda x: x[:seeds], tree)  # noqa: E731
            setups[key] = dict(larger[0], state=first(larger[0]["state"]), hp=first(larger[0]["hp"]),
                               seeds=first(larger[0]["seeds"]), shuffled=first(larger[0]["shuffled"]),
                               members=runner.Members(larger[0]["members"].configs,
                                                      larger[0]["members"].seed_list[:seeds], "map"))
            setups[key].pop("evaluate_seconds", None)
        else:
            setups[key] = pmnist_setup(sizes, agent_name, seeds, ds, **flags)
    return setups[key]


# The agents beyond the paper's table, timed against bp in every benchmark (section "agents"; pMNIST's own).
NEW_AGENTS = ("layernorm-l2", "spectral-reg", "redo")


def bench_pmnist(bench, ds, setups):
    sizes = bench.sizes
    steps, batching = sizes.call_steps, runner.resolve_batching("auto")
    init, train = bare_mlp_train(sizes.width)
    for seeds in (sizes.seeds, 1):
        rng = np.random.default_rng(seeds)
        xs = jnp.asarray(rng.random((seeds, steps, 784)), jnp.float32)
        ys = jnp.asarray(rng.integers(0, 10, (seeds, steps)), jnp.int32)
        params = runner.over_members(init, batching, (0,))(jnp.arange(seeds))
        seconds, compile_s = bench.time(runner.over_members(train, batching, (0, 0, 0)), params, xs, ys, per=steps)
        bench.add("pmnist", f"bare{seeds}", f"baseline: bare lax.scan SGD step, {seeds} seed(s) ({batching})",
                  seconds, compile_s=compile_s, note=f"{format_seconds(seconds / seeds)} per seed-step")
    # spectral-reg as the authors ran it (10 power iterations from fixed vectors every step), and with one
    # iteration from the vectors carried over from the last step (our cheaper option).
    persistent = dict(spectral_persistent=True, power_iters=1)
    for agent_name, seeds, flags in (("bp", sizes.seeds, {}), ("l2-er", sizes.seeds, {}), ("cbp", sizes.seeds, {}),
                                     ("snp", sizes.seeds, {}), ("spectral-reg", sizes.seeds, {}),
                                     ("spectral-reg", sizes.seeds, persistent), ("layernorm-l2", sizes.seeds, {}),
                                     ("redo", sizes.seeds, {}), ("bp", 1, {})):
        label = agent_name + (" --spectral-persistent True --power-iters 1" if flags else "")
        work = f"`pmnist` {label}, {seeds} seed(s) ({batching}), {steps:,}-step call"
        if agent_name not in ("bp", "l2-er") and not bench.variant("pmnist", work):
            continue
        setup = pmnist_cached(setups, sizes, agent_name, seeds, ds, **flags)
        seconds, compile_s = bench.time(setup["train"], setup["state"], setup["hp"], setup["seeds"], 0,
                                        setup["shuffled"], setup["data"], 0, per=steps)
        full_run = ""
        if agent_name == "l2-er":
            calls_per_task = PMNIST_RUN["steps"] / steps
            evaluate = setup["evaluate_seconds"] = time_evaluate(bench, setup)
            per_task = calls_per_task * seconds * steps + evaluate
            full_run = projection(PMNIST_RUN["tasks"] * per_task, PMNIST_RUN["goal_h"] * 3600, bench.quick)
        bench.add("pmnist", f"{agent_name}{'-persistent' * bool(flags)}{seeds}", work, seconds,
                  baseline=f"bare{seeds}", bp=f"bp{seeds}", compile_s=compile_s, full_run=full_run,
                  note=f"{format_seconds(seconds / seeds)} per seed-step"
                  + (f"; + end-of-task metrics {setup['evaluate_seconds'] * 1e3:,.0f} ms per task"
                     if "evaluate_seconds" in setup else ""))


def time_evaluate(bench, setup):
    """Seconds of pmnist's end-of-task metrics for all members (once per task; its SVDs of the eval features
    are the metric route)."""
    evaluate = setup["members"].run(setup["evaluate"], (0, 0, None, None))
    return bench.time(evaluate, setup["state"]["params"], setup["seeds"], 0, setup["data"])[0]


# ----------------------------------------------------------------------------------------------------------
# 2. Effective-rank routes on pMNIST's hidden features: metric SVD, the ER step (QR route), the Gram route
# ----------------------------------------------------------------------------------------------------------
def er_step_gram(params, x, er_lr):
    """The ER step of `common.er_ascent` through the Gram-matrix route (the speed baseline; inexact)."""
    def mean_rank(p):
        return jnp.mean(common.effective_ranks(pmnist.hidden_features(p, x), method="gram"))

    value, grads = jax.value_and_grad(mean_rank)(params)
    return jax.tree.map(lambda p, g: p + er_lr * g, params, grads), value


def er_step_qr(params, x, er_lr):
    return common.er_ascent(params, pmnist.hidden_features, x, er_lr)


def precise(fn):
    """`fn` at full float32 matmul precision, as pmnist runs its effective ranks and Hessians."""
    def run(*args):
        with jax.default_matmul_precision(pmnist.PRECISE):
            return fn(*args)
    return run


ER_STEP_QR = precise(er_step_qr)  # one function object: its jitted copies share one compilation


def bench_er(bench, ds, setups):
    sizes = bench.sizes
    n, width, seeds = sizes.er_batch, sizes.width, sizes.seeds
    setup = pmnist_cached(setups, sizes, "l2-er", seeds, ds)
    members, params = setup["members"], setup["state"]["params"]
    x = jnp.asarray(ds["train_x"][:n], jnp.float32) / 255.0
    one = jax.tree.map(lambda p: jnp.asarray(p[0]), params)
    features = jnp.stack(pmnist.hidden_features(one, x))  # [3, n, width] post-ReLU features of a fresh network
    shape = f"3 x ({n} x {width})"

    def ranks(method):
        return jax.jit(precise(lambda f: common.effective_ranks(list(f), method)))

    gram_s, compile_s = bench.time(ranks("gram"), features)
    bench.add("er", "rank_gram", f"baseline: effective rank, Gram route (eigvalsh), {shape}", gram_s,
              unit="call", compile_s=compile_s)
    svd_s, compile_s = bench.time(ranks("svd"), features)
    bench.add("er", "rank_svd", f"effective rank, metric route (`svd`), {shape}", svd_s, unit="call",
              baseline="rank_gram", compile_s=compile_s)
    qr_s, compile_s = bench.time(ranks("qr"), features)
    bench.add("er", "rank_qr", f"effective rank, ER-step route (`qr`), {shape}", qr_s, unit="call",
              baseline="rank_gram", compile_s=compile_s)

    er_lr = jnp.float32(1e-3)
    gram_s, compile_s = bench.time(jax.jit(precise(er_step_gram)), one, x, er_lr)
    bench.add("er", "step_gram", f"baseline: ER step through the Gram route, 1 member, {n} images", gram_s,
              unit="call", compile_s=compile_s)
    qr_s, compile_s = bench.time(jax.jit(ER_STEP_QR), one, x, er_lr)
    bench.add("er", "step_qr", f"ER step (`common.er_ascent`, `qr`), 1 member, {n} images", qr_s, unit="call",
              baseline="step_gram", compile_s=compile_s)

    # The ER step for all members, batched as pmnist batches them, against one chunk of l2-er training
    # (er_batch SGD steps + the ER step) of the same members.
    xs = jnp.broadcast_to(x, (members.count,) + x.shape)
    hp = jnp.full((members.count,), 1e-3, jnp.float32)
    step_s, compile_s = bench.time(members.run(ER_STEP_QR, (0, 0, 0)), params, xs, hp)
    chunk_note = ""
    l2_er = bench.find("pmnist", f"l2-er{seeds}")
    if l2_er is not None and l2_er.seconds:
        chunk = n * l2_er.seconds
        chunk_note = f"{100 * step_s / chunk:.0f}% of a {n}-step l2-er chunk ({chunk * 1e3:,.1f} ms)"
    bench.add("er", "step_members", f"ER step, {members.count} members ({members.batching}), {n} images", step_s,
              unit="call", compile_s=compile_s, full_run=chunk_note)

    eval_s = setup.get("evaluate_seconds") or time_evaluate(bench, setup)
    bench.add("er", "evaluate", f"`pmnist` end-of-task metrics ({members.count} members; `svd` of 3 x "
              f"({sizes.eval_size} x {width}) each)", eval_s, unit="call",
              full_run="" if bench.quick else f"{format_hours(PMNIST_RUN['tasks'] * eval_s)} over 800 tasks")


# ----------------------------------------------------------------------------------------------------------
# 3. One Hessian spectrum (pmnist's `spectrum`: SLQ, full reorthogonalization) against bare HVPs
# ----------------------------------------------------------------------------------------------------------
def bench_hessian(bench, ds, setups):
    sizes = bench.sizes
    setup = pmnist_cached(setups, sizes, "bp", 1, ds)
    params = jax.tree.map(lambda p: jnp.asarray(p[0]), setup["state"]["params"])
    n, iters = sizes.hessian_samples, sizes.lanczos_iters
    x = jnp.asarray(ds["train_x"][:n], jnp.float32) / 255.0
    y = jnp.asarray(ds["train_y"][:n])
    loss = lambda p: jnp.mean(pmnist.cross_entropy(pmnist.forward(p, x)[0], y))  # noqa: E731
    vector = jax.tree.map(jnp.ones_like, params)
    hvp_s, compile_s = bench.time(jax.jit(precise(lambda v: hessian.hvp(loss, params, v))), vector)
    bench.add("hessian", "hvps", f"baseline: {iters} bare Hessian-vector products, {n} samples", hvp_s * iters,
              unit="spectrum", compile_s=compile_s, note=f"{hvp_s * 1e3:.2f} ms per HVP")
    spectrum = jax.jit(setup["spectrum"])
    seconds, compile_s = bench.time(spectrum, params, 2024, 0, 0, setup["data"])
    bench.add("hessian", "slq", f"`pmnist` Hessian spectrum (SLQ, {iters} Lanczos iterations, {n} samples), 1 member",
              seconds, unit="spectrum", baseline="hvps", compile_s=compile_s,
              full_run="" if bench.quick else
              f"{format_hours(seconds * 2 * 80 * PMNIST_RUN['seeds'])} for --hessian-every 10, 5 seeds")


# ----------------------------------------------------------------------------------------------------------
# 4. Continual ImageNet: imagenet's whole-task training call against a bare conv SGD loop
# ----------------------------------------------------------------------------------------------------------
IMAGENET_RUN = dict(tasks=2000, epochs=250, steps=12, goal_h=5.0)  # 12 = 1,200 images per task / batch 100


def bare_momentum_train(loss, lr=0.01, momentum=0.9):
    """One member's bare loop: SGD with momentum on pre-made batches in a lax.scan, nothing else."""
    def step(carry, batch):
        params, velocity = carry
        grads = jax.grad(loss)(params, *batch)
        velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, grads)
        return (jax.tree.map(lambda p, v: p - lr * v, params, velocity), velocity), None

    def train(params, xs, ys):
        return jax.lax.scan(step, (params, jax.tree.map(jnp.zeros_like, params)), (xs, ys))[0][0]

    return train


def bench_imagenet(bench, ds, setups, agents=("bp", "l2-er"), section="imagenet"):
    import imagenet
    sizes = bench.sizes
    impl = "im2col" if jax.default_backend() == "cpu" else "xla"  # imagenet's --conv-impl auto
    rng = np.random.default_rng(0)
    batch, steps, per_class = sizes.conv_batch, sizes.conv_steps, sizes.imagenet_per_class

    def loss(params, x, y):
        return imagenet.cross_entropy(imagenet.forward(params, x, impl)[0], y)

    train = jax.jit(jax.vmap(bare_momentum_train(loss)))
    for seeds in (1, sizes.conv_seeds) if section == "imagenet" else ():
        work = f"baseline: bare ConvNet SGD step (momentum), batch {batch}, {seeds} seed(s) (vmap, {impl})"
        if seeds == 1 and not bench.variant("imagenet", work):
            continue
        params = jax.vmap(imagenet.init_params)(jax.random.split(jax.random.key(0), seeds))
        xs = jnp.asarray(rng.random((seeds, steps, batch, 32, 32, 3)), jnp.float32) - 0.5
        ys = jnp.asarray(rng.integers(0, 2, (seeds, steps, batch)), jnp.int32)
        seconds, compile_s = bench.time(train, params, xs, ys, per=steps)
        bench.add("imagenet", f"bare{seeds}", work, seconds, compile_s=compile_s,
                  note=f"{format_seconds(seconds / seeds)} per seed-step")
    seeds = sizes.conv_seeds
    for agent in agents:
        args = imagenet.Args(agent=agent, seeds=seeds, epochs=sizes.imagenet_epochs, batch_size=batch,
                             train_per_class=per_class, test_per_class=10, synthetic_data=True)
        resolved, configs = imagenet.resolve(args)
        members = runner.Members(configs, [args.seed + i for i in range(seeds)], args.member_batching)
        init, task_data, train, _, _, calls = imagenet.make_train(args, resolved, imagenet.load_data(args))
        state = members.run(init, (0,), batching="map")(members.seeds)
        count = calls[0][1]  # the script's first call of a task: whole epochs (all of them at these sizes)
        call = members.run(lambda s, h, sd, t, x, f: train(s, h, sd, t, x, f, count), (0, 0, 0, None, 0, None))
        steps_per_call = count * (2 * per_class // batch)
        seconds, compile_s = bench.time(call, state, members.hyperparameters(imagenet.SWEPT), members.seeds, 0,
                                        task_data(members.seeds, 0)[0], 0, per=steps_per_call)
        run = IMAGENET_RUN["tasks"] * IMAGENET_RUN["epochs"] * IMAGENET_RUN["steps"] * seconds
        bench.add(section, f"{agent}{seeds}", f"`imagenet` {agent}, {seeds} seeds ({members.batching}, "
                  f"{impl}), a call of {count} epoch(s) x {steps_per_call // count} steps",
                  seconds, baseline=("imagenet", f"bare{seeds}"), bp=("imagenet", f"bp{seeds}"), compile_s=compile_s,
                  full_run=projection(run, IMAGENET_RUN["goal_h"] * 3600, bench.quick) if agent == "l2-er" else "",
                  note=f"{format_seconds(seconds / seeds)} per seed-step"
                  + ("; ER step once per epoch, on its images" if agent == "l2-er" else "")
                  + ("; projection without the per-task evaluation" if agent == "l2-er" and not bench.quick else ""))


# ----------------------------------------------------------------------------------------------------------
# 5. Incremental CIFAR-100: cifar's training call against a bare ResNet-18 SGD loop
# ----------------------------------------------------------------------------------------------------------
# Steps per seed of the full run: 200 epochs of task t (t = 1..20) over 500 x 5t images at batch 100.
CIFAR_RUN = dict(steps=200 * sum(500 * 5 * t // 100 for t in range(1, 21)), seeds=5, goal_h=5.0)


def cifar_setup(cifar, sizes, agent, seeds, ds):
    """cifar's training call for `agent` with its default member batching, as cifar.main builds it: a function
    state -> state running the first `sizes.cifar_steps` steps of task 1 for every member, and the first state."""
    args = cifar.Args(agent=agent, seeds=seeds, width=sizes.cifar_width, dense_width=sizes.cifar_dense,
                      batch_size=sizes.cifar_batch, synthetic_data=True)
    resolved, configs = cifar.resolve(args)
    members = runner.Members(configs, [args.seed + i for i in range(seeds)], args.member_batching)
    init, train, _, _, _, _ = cifar.make_train(args, resolved, ds)
    state = members.run(init, (0, None), batching="map")(members.seeds, 0)
    train = members.run(train, (0, 0, 0, 0, None, None, None, None))
    hp, classes = members.hyperparameters(cifar.SWEPT), cifar.class_ranks(members.seeds)
    data = {k: jnp.asarray(v) for k, v in ds.items()}
    return resolved, members, state, lambda state: train(state, hp, members.seeds, classes, data, 0, 0,
                                                         sizes.cifar_steps)


def bare_cifar_rows(bench, cifar):
    """The baseline rows: one member's bare ResNet-18 loop (SGD with momentum, BatchNorm on batch statistics,
    nothing else), compiled once and called once per seed."""
    sizes, rng = bench.sizes, np.random.default_rng(0)
    batch, steps, seeds = sizes.cifar_batch, sizes.cifar_steps, sizes.cifar_seeds

    def step(carry, batch):
        params, stats, velocity = carry
        def loss(p):
            logits, new_stats, _ = cifar.forward(p, stats, batch[0], True)
            return jnp.mean(pmnist.cross_entropy(logits, batch[1])), new_stats
        grads, stats = jax.grad(loss, has_aux=True)(params)
        velocity = jax.tree.map(lambda v, g: 0.9 * v + g, velocity, grads)
        return (jax.tree.map(lambda p, v: p - 0.01 * v, params, velocity), stats, velocity), None

    train = jax.jit(lambda net, xs, ys: jax.lax.scan(
        step, (net[0], net[1], jax.tree.map(jnp.zeros_like, net[0])), (xs, ys))[0][:2])
    nets = [cifar.init_net(jax.random.key(s), sizes.cifar_width, sizes.cifar_dense) for s in range(seeds)]
    xs = jnp.asarray(rng.random((steps, batch, 32, 32, 3)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 100, (steps, batch)), jnp.int32)
    for count in (1, seeds):
        seconds, compile_s = bench.time(lambda: [train(net, xs, ys) for net in nets[:count]], per=steps)
        bench.add("cifar", f"bare{count}", f"baseline: bare ResNet-18 SGD step (momentum; batch statistics "
                  f"only), batch {batch}, {count} seed(s) one after another", seconds, compile_s=compile_s,
                  note=f"{format_seconds(seconds / count)} per seed-step")


def bench_cifar(bench, ds, setups, agents=("bp", "l2-er"), section="cifar"):
    import cifar
    sizes = bench.sizes
    steps, seeds = sizes.cifar_steps, sizes.cifar_seeds
    if section == "cifar":
        bare_cifar_rows(bench, cifar)
    cifar_ds = data.synthetic_cifar100()
    for agent in agents:
        resolved, members, state, call = cifar_setup(cifar, sizes, agent, seeds, cifar_ds)
        seconds, compile_s = bench.time(call, state, per=steps)
        bench.add(section, f"{agent}{seeds}", f"`cifar` {agent}, {seeds} seeds ({members.batching}), a call of "
                  f"{steps} steps", seconds, baseline=("cifar", f"bare{seeds}"), bp=("cifar", f"bp{seeds}"),
                  compile_s=compile_s,
                  full_run=projection(CIFAR_RUN["steps"] * seconds, CIFAR_RUN["goal_h"] * 3600, bench.quick)
                  if agent == "l2-er" else "",
                  note=f"{format_seconds(seconds / seeds)} per seed-step"
                  + (f"; ER step every {resolved['er_batch']} steps" if agent == "l2-er" else ""))


# ----------------------------------------------------------------------------------------------------------
# 6. Slippery Ant: ant_ppo's chunk of PPO updates against bare MJX physics (random actions)
# ----------------------------------------------------------------------------------------------------------
ANT_RUN = dict(steps=10_000_000, seeds=5, goal_h=20 / 60)


def ant_args(ant_ppo, sizes, agent, seeds, envs=None, physics="mjx"):
    return ant_ppo.Args(agent=agent, seeds=seeds, num_envs=envs or sizes.ant_envs, num_steps=sizes.ant_samples,
                        update_epochs=sizes.ant_epochs, num_minibatches=sizes.ant_minibatches,
                        hidden_size=sizes.ant_hidden, updates_per_chunk=sizes.ant_updates,
                        fast_compile=sizes.ant_fast_compile, member_batching="vmap", physics=physics)


def bare_ant_rollout(ant_ppo, cfg, vector_steps, fast_compile):
    """All envs of all members stepped `vector_steps` times with Gaussian actions: the physics alone."""
    _, env_step, _ = ant_ppo.env_functions(cfg)
    step = jax.vmap(lambda s, a, k: env_step(cfg, s, a, ant_ppo.AUTHORS_FRICTIONS[0], k))

    def rollout(envs, key):
        def one(envs, k):
            k_act, k_reset = jax.random.split(k)
            count = jax.tree.leaves(envs)[0].shape[0]
            actions = jax.random.normal(k_act, (count, ant_ppo.ACT_DIM))
            envs, info = step(envs, actions, jax.random.split(k_reset, count))
            return envs, info.reward
        return jax.lax.scan(one, envs, jax.random.split(key, vector_steps))

    return jax.jit(rollout, compiler_options={"xla_backend_optimization_level": 0} if fast_compile else None)


def bench_ant(bench, ds, setups, agents=None, section="ant"):
    import ant_ppo
    sizes = bench.sizes
    bare = [("mjx", 1), ("mjx", sizes.ant_seeds), ("brax", sizes.ant_seeds)]  # Brax: the authors' engine
    for physics, seeds in bare if section == "ant" else ():
        args = ant_args(ant_ppo, sizes, "bp", seeds, physics=physics)
        work = (f"baseline: bare {'MJX' if physics == 'mjx' else 'Brax positional'} Ant physics, random actions, "
                f"{seeds} seed(s) x {args.num_envs} envs")
        if not bench.variant("ant", work):  # MJX compiles slowly: --quick keeps only the two agents
            continue
        cfg = ant_ppo.env_config(args)
        vector_steps = args.updates_per_chunk * args.num_steps // args.num_envs
        reset = ant_ppo.env_functions(cfg)[0]
        envs = jax.vmap(lambda k: reset(cfg, k))(jax.random.split(jax.random.key(0), seeds * args.num_envs))
        rollout = precise(bare_ant_rollout(ant_ppo, cfg, vector_steps, args.fast_compile))
        seconds, compile_s = bench.time(rollout, envs, jax.random.key(1), per=vector_steps * seeds * args.num_envs)
        bench.add("ant", ("brax-" if physics == "brax" else "") + f"bare{seeds}", work, seconds, unit="env-step",
                  compile_s=compile_s)
    speed_envs = sizes.ant_envs
    runs = [("bp", 1, speed_envs, "mjx"), ("l2-er", 1, speed_envs, "mjx"), ("bp", sizes.ant_seeds, speed_envs, "mjx"),
            ("l2-er", sizes.ant_seeds, speed_envs, "mjx")]
    if agents is not None:
        runs = [(agent, sizes.ant_seeds, speed_envs, "mjx") for agent in agents]
    else:
        runs.append(("bp", sizes.ant_seeds, speed_envs, "brax"))  # the same PPO on the authors' engine
        if speed_envs != 1:  # last, l2-er at ant_ppo's default of 1 env (the paper's rollout): the run a
            runs.append(("l2-er", sizes.ant_seeds, 1, "mjx"))  # reproduction makes (more envs learn far slower)
    for agent, seeds, n_envs, physics in runs:
        args = ant_args(ant_ppo, sizes, agent, seeds, n_envs, physics)
        work = (f"`ant_ppo` {agent}, {seeds} seed(s), {args.num_envs} envs, {args.updates_per_chunk} update(s) of "
                f"{args.num_steps} samples" + (", --physics brax" if physics == "brax" else ""))
        extra_row = n_envs != speed_envs  # the 1-env row: no bare or bp row steps its env count
        if (seeds == 1 or extra_row or physics == "brax") and not bench.variant("ant", work):
            continue
        entry, configs = ant_ppo.resolve(args)
        members = runner.Members(configs, [args.seed + i for i in range(seeds)], args.member_batching)
        init, train, _ = ant_ppo.programs(args, entry, members.batching)  # train sets MJX's full precision
        state, hp = init(members.seeds), members.hyperparameters(ant_ppo.SWEPT)
        env_steps = args.updates_per_chunk * args.num_steps * seeds
        seconds, compile_s = bench.time(train, state, hp, members.seeds, jnp.int32(args.updates_per_chunk),
                                        per=env_steps)
        run = ANT_RUN["steps"] * ANT_RUN["seeds"] * seconds
        brax = "brax-" if physics == "brax" else ""
        bench.add(section, f"{brax}{agent}{seeds}" + (f"x{n_envs}env" if extra_row else ""), work, seconds,
                  unit="env-step", baseline=None if extra_row else ("ant", f"{brax}bare{seeds}"),
                  bp=None if extra_row or brax else ("ant", f"bp{seeds}"), compile_s=compile_s,
                  full_run=projection(run, ANT_RUN["goal_h"] * 3600, bench.quick)
                  if (agent, seeds) == ("l2-er", sizes.ant_seeds) else "",
                  note=f"{format_seconds(seconds)} per env-step"
                  + ("; 1 env: ant_ppo's default, as the paper" if n_envs == 1
                     else f"; {n_envs} envs: a speed setting"))


def bench_agents(bench, ds, setups):
    """The agents beyond the paper's table in ImageNet, CIFAR and Ant, against those sections' bp and baselines
    (pMNIST times them in its own section). Last, so that the paper's rows come first within the time budget."""
    if not bench.variant("agents", f"`imagenet`, `cifar`, `ant_ppo` {', '.join(NEW_AGENTS)}"):
        return
    bench_imagenet(bench, ds, setups, NEW_AGENTS, "agents")
    bench_cifar(bench, ds, setups, NEW_AGENTS, "agents")
    bench_ant(bench, ds, setups, NEW_AGENTS, "agents")


BENCHES = {"pmnist": bench_pmnist, "er": bench_er, "hessian": bench_hessian, "imagenet": bench_imagenet,
           "cifar": bench_cifar, "ant": bench_ant, "agents": bench_agents}


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------
def ratio(bench, row, key):
    """Time per unit of work of `row` over that of the row `key` of its section ("" if either is missing)."""
    where = key if isinstance(key, tuple) else (row.section, key)  # (section, key): a row of another section
    other = None if key is None or row.seconds is None else bench.find(*where)
    return f"{row.seconds / other.seconds:.2f}" if other is not None and other.seconds else ""


def device_line():
    devices = jax.devices()
    return f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})"


def plan_line(sections):
    programs = sum(H100_PLAN[s][0] for s in sections)
    compile_s = sum(H100_PLAN[s][0] * H100_PLAN[s][1] for s in sections)
    calls_s = sum(H100_PLAN[s][2] for s in sections)
    return (f"estimate for these sections at full size on one H100: {(compile_s + calls_s) / 60:.1f} min "
            f"({programs} programs compiled, ~{compile_s / 60:.1f} min guessed; timed calls ~{calls_s / 60:.1f} min "
            f"from measured H100 step times)")


def table(bench, command, started, elapsed, plan=None):
    warmups = 1 + bench.sizes.warmups
    lines = [f"# bench.py, {started:%Y-%m-%d %H:%M} UTC", "",
             f"- device: {device_line()}; jax {jax.__version__}; {os.cpu_count()} CPU cores",
             f"- command: `{command}` ({'quick' if bench.quick else 'full'} sizes; all sizes: "
             f"{', '.join(f'{k} {v}' for k, v in bench.sizes._asdict().items())})",
             f"- each time: median of {bench.sizes.repeats} calls after {warmups} warm-up call{'s' * (warmups > 1)} "
             f"(the first compiles); compile = first call minus the median. Ratios: time per unit of work over the "
             f"baseline's (or bp's), above 1 = slower",
             f"- wall time of this run: {elapsed:.0f} s" + (f"; {plan}" if plan else ""), "",
             "| section | work | time | vs baseline | vs bp | compile s | full run (goal) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for row in bench.rows:
        compile_s = "" if row.compile_s is None else f"{row.compile_s:.1f}"
        lines.append(f"| {TITLES[row.section]} | {row.work} | {format_time(row)} | {ratio(bench, row, row.baseline)} "
                     f"| {ratio(bench, row, row.bp)} | {compile_s} | {row.full_run} | {row.note} |")
    return "\n".join(lines) + "\n"


def override(sizes, settings, parser):
    """`sizes` with NAME=VALUE settings applied (each value parsed as the field's type)."""
    changes = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if name not in Sizes._fields or not value:
            parser.error(f"--set {setting}: expected NAME=VALUE with NAME one of {', '.join(Sizes._fields)}")
        kind = type(getattr(sizes, name))
        changes[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return sizes._replace(**changes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shrink every size (a smoke run on a small CPU)")
    parser.add_argument("--out", help="markdown file for the table (default runs/bench__<UTC stamp>.md)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                        help=f"override sizes, e.g. --set width=1000 repeats=9 (names: {', '.join(Sizes._fields)})")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no measurement later than a minute before this (default: 8 at full size, so "
                             "that a GPU lent for 15 minutes has time for a second run; 0 = no limit)")
    args = parser.parse_args(argv)
    started = datetime.now(timezone.utc)
    out = Path(args.out or runner.REPO_DIR / "runs" / f"bench__{started:%Y%m%d-%H%M%S}.md")
    sections = args.only or SECTIONS
    minutes = args.max_minutes if args.max_minutes is not None else (0 if args.quick else 8)
    start = time.perf_counter()
    bench = Bench(override(QUICK if args.quick else FULL, args.set, parser), args.quick,
                  start + 60 * minutes if minutes > 0 else None)
    print(f"bench: {device_line()}, jax {jax.__version__}, {'quick' if args.quick else 'full'} sizes", flush=True)
    if not args.quick:
        print(plan_line(sections), flush=True)
    ds = {k: jnp.asarray(v) for k, v in data.synthetic_mnist().items()}
    setups = {}  # pmnist member functions shared between sections (one compile each)
    for section in sections:
        print(f"{TITLES[section]}:", flush=True)
        try:
            bench.check_budget()
            BENCHES[section](bench, ds, setups)
        except OverBudget:
            bench.skip(section, f"the rest of this section (over the {minutes:g}-minute budget)",
                       f"run `python bench.py --only {section}`")
        except Exception as e:  # one broken section must not cost the others' figures
            traceback.print_exc()
            bench.skip(section, f"section failed: {type(e).__name__}: {e}".replace("|", "/")[:200], "error")
    text = table(bench, " ".join(["python bench.py"] + (argv if argv is not None else sys.argv[1:])), started,
                 time.perf_counter() - start, plan_line(sections) if not args.quick else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + text + f"\nwritten: {out}", flush=True)
    return out


if __name__ == "__main__":
    with runner.quiet_on_closed_pipe():
        main()
