"""Slippery Ant (paper App. J; Dohare et al. 2024): PPO on MuJoCo MJX while the ground friction changes.

Brax's `ant` (torso sphere, four two-segment legs, 8 hinge motors, only the four foot spheres touching the
floor; crouched start) runs in MJX with the Newton solver (10 iterations, 20 line-search iterations: fewer
leave low friction barely slippery), timestep 0.01 s and 5 physics steps per env step. Every `--change-every`
env steps the sliding friction of every geom jumps to the next value of the schedule: by default the authors'
five frictions 0.2961, 0.2399, 0.0387, 0.3528, 0.0829, the same for every seed (MJX gives a contact the
larger of its two geoms' frictions, so setting only the floor would change nothing). `--physics brax` runs Brax's
own Ant instead, on its positional pipeline (timestep 0.005 s, 10 substeps, gear 200): the authors' engine, in
Brax's episode and auto-reset wrappers, its friction set on every geom each step as their wrapper does. About a
quarter of its random start states pop above the healthy height (z > 1) within 20 steps of zero action, and the
auto-reset returns every episode of an env to its first start. As in the authors' runs,
observations are raw, the control cost is on the unclipped action and a time-out ends the episode without
bootstrapping. PPO (Table 8) trains a separate actor (Gaussian, state-independent log-std) and critic, each
with one ReLU hidden layer, continually, never reset, with the details of the authors' code: every layer
LeCun-uniform (the policy head not scaled down), the value loss the larger of the clipped and unclipped squared
errors (no factor 0.5), Adam eps 1e-8. The agents are the table `AGENTS` below (Table 7 best values; Adam betas
as the authors ran each agent): bp, l2 (coupled weight decay), er (effective-rank ascent on the actor's rank plus
the critic's, one step before each epoch, on the rollout's observations), l2-er, cbp (continual backprop with
L2, as the paper: Dohare et al.'s algorithm on the minibatch's activations, lowest utility first, outgoing weights
0, Adam moments zeroed; --cbp-variant paper: the authors' code behind the paper's CBP curve, common.cbp_select_paper
and cbp_replace_paper: the highest-utility hidden units, |mean h| x mean|w_out| without bias correction, on the
rollout's activations (the acting parameters, as theirs), get incoming weights U(+-sqrt(6 / obs dim)) and outgoing
weights re-randomized U(+-sqrt(6 / hidden size)), bias 0, and their Adam moments zeroed; their Adam also zeroes a
per-parameter step count, ours keeps optax's one count for all parameters, so a redrawn entry's next Adam steps get
the old entries' bias correction, smaller than theirs); and beyond the paper's table: layernorm-l2 (LayerNorm
before each hidden ReLU with coupled L2 on every parameter; Lyle et al. 2024, as the authors' later runs),
spectral-reg (Lewandowski et al. 2024's spectral regularizer in the form of the authors' later runs) and redo
(ReDo, Sokar et al. 2023, as Dohare et al.'s Ant config: tau 0.1 every 100 Adam steps, weight decay 1e-4). The authors swept layernorm-l2 (lr
1e-2/1e-3/1e-4 x weight decay 1e-3/1e-4/1e-5) and spectral-reg (lr x lambda 1e-2/1e-3/1e-4) on Slippery Ant but
recorded no chosen values. Ours come from a small sweep with the PPO of commit 595b52d (Kaiming init, head x 0.01,
0.5 x MSE value loss, eps 1e-5; 1 seed, 1M env steps, the authors' five frictions every 200k steps, 64 envs; lr
1e-3/1e-4 x the authors' other values; picked by the mean return over the run): layernorm-l2 lr 1e-4, weight
decay 1e-3; spectral-reg lr 1e-4, lambda 1e-4. At lr 1e-3 every spectral-reg run collapsed (returns -6,000 to
-44,000: the action means grow and the control cost, on the unclipped action, explodes). One seed and 1M steps,
where no run walks yet (mean returns over the run -101 to +66 at lr 1e-4), make this weak evidence. The sweep,
and its mean return over updates 1-488 (last phase, 392-488) from
`python plot.py runs/ant_sweep/* --table 1-488 392-488`:

    python ant_ppo.py --agent layernorm-l2 --lr 1e-3 1e-4 --weight-decay 1e-3 1e-4 1e-5 --seeds 1 --num-envs 64 \
        --total-steps 1000000 --change-every 200000 --out-dir runs/ant_sweep/layernorm-l2
    python ant_ppo.py --agent spectral-reg --spectral-lambda L --lr 1e-3 1e-4 --seeds 1 --num-envs 64 \
        --total-steps 1000000 --change-every 200000 --out-dir runs/ant_sweep/spectral-reg_lambdaL  # L: 1e-2 1e-3 1e-4

    layernorm-l2, weight decay 1e-3 / 1e-4 / 1e-5:  lr 1e-4: 66 (217) / 56 (205) / 52 (181)
                                                    lr 1e-3: 32 (93) / -21 (37) / -21 (49)
    spectral-reg, lambda 1e-2 / 1e-3 / 1e-4:        lr 1e-4: -101 (-77) / -90 (-71) / -70 (-9)
                                                    lr 1e-3: -6,871 (-6,154) / -14,242 (-6,821) / -43,611 (-33,966)

Seeds and swept hyperparameters (--lr, --weight-decay, --er-lr) are "members" trained together, PureJaxRL
style: one update = rollout + GAE + 10 epochs of minibatch Adam, and a chunk of --updates-per-chunk updates
is one `lax.scan` inside one jitted call. Members are vmapped on accelerators; on one CPU device they run one
after another (--member-batching). Ctrl-C stops at the end of the chunk, checkpoints and prints the command
that resumes; --resume continues exactly.

Outputs (besides config.json and checkpoint.pkl): metrics.npz, arrays [config, seed, update]:
`episodic_return` (mean return of the episodes that ended in the update's rollout; NaN if none), `episodes`,
`friction` (at the rollout's last step), `loss` (mean PPO loss over the update's minibatches), `dead_units`
and `effective_rank` [C, S, U, 2] of the actor's and the critic's hidden layer (`layer_names`) on the
rollout's activations (before the update, as the authors), `param_norm` (after it), `step_reward` and
`ctrl_cost` (the env's reward and the control cost it charged, per env step over the rollout: the cost's share of
the return) and `action_rms` (root mean square of the policy's action mean over the rollout); and `env_steps` [U],
`friction_schedule` [C, S, phases], `diverged` [C, S]. With --hessian-every-phase, hessian.npz as pMNIST's with
`tasks` = the measured phases.

    python ant_ppo.py --agent l2-er --seeds 5   # 10M env steps per seed, 5 friction phases, 1 env each
"""
import os

# Before jax loads LAPACK (scipy's OpenBLAS): OpenBLAS's own threads, on top of XLA's, made the CPU's batched
# eigen/SVD solvers of the rank metrics crawl or stall on a 2-core machine. No effect on GPU runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib  # noqa: E402 (after the environment is set)
import io
import math
import time
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import mujoco
import numpy as np

with contextlib.redirect_stdout(io.StringIO()):  # mjx prints a notice when its optional Warp backend is absent
    from mujoco import mjx

import common
import hessian
import runner

# The agents (App. J; Table 7 best values, fixed learning rate 1e-4 for all: --lr). An agent is its entry: the
# hyperparameters it uses, with their defaults; a flag overrides one. A key switches its mechanism on:
# weight_decay -> coupled L2, er_lr -> the ER step, replacement_rate -> continual backprop (Dohare et al. 2024),
# layer_norm -> LayerNorm before each hidden ReLU, spectral_lambda -> the spectral penalty, redo_tau -> ReDo.
# The paper gives no best weight decay for CBP+L2 ("-"); we use 1e-3, the best of L2 and L2-ER on the same grid.
# Adam betas as the authors' Slippery Ant runs used them: 0.9 / 0.999 (Table 8) for BP only; 0.99 / 0.99 for
# L2, ER, L2-ER and CBP+L2 (the betas of all of Dohare et al.'s Slippery Ant agents, who report that equal
# betas by themselves reduce PPO's loss of plasticity; so bp --beta1 0.99 --beta2 0.99 is the control).
# The authors' later Slippery Ant runs (their code): layernorm-l2 with 0.99 / 0.99 like the rest of the L2
# family, spectral-reg with no betas set (their default 0.9 / 0.999), k 2, target 2, 10 power iterations from
# fixed start vectors and no weight decay. They recorded no chosen lr, weight decay or lambda for Ant: ours come
# from our small sweep (module docstring). ReDo is Dohare et al.'s Ant config (their cfg/ant/redo.yml): tau 0.1,
# every 100 Adam steps (their reset_period counts optimizer steps), coupled weight decay 1e-4, betas 0.99 / 0.99.
AGENTS = {
    "bp": dict(beta1=0.9, beta2=0.999),
    "l2": dict(weight_decay=1e-3, beta1=0.99, beta2=0.99),
    "er": dict(er_lr=1e-7, beta1=0.99, beta2=0.99),
    "l2-er": dict(weight_decay=1e-3, er_lr=1e-6, beta1=0.99, beta2=0.99),  # the paper's method
    "cbp": dict(weight_decay=1e-3, replacement_rate=1e-7, decay_rate=0.99, maturity_threshold=10_000,
                cbp_utility="contribution", cbp_variant="dohare", beta1=0.99, beta2=0.99),
    "layernorm-l2": dict(layer_norm=True, weight_decay=1e-3, beta1=0.99, beta2=0.99),  # our sweep's weight decay
    "spectral-reg": dict(spectral_lambda=1e-4, spectral_k=2.0, spectral_target=2.0, power_iters=10,
                         spectral_persistent=False, beta1=0.9, beta2=0.999),  # our sweep's lambda
    "redo": dict(redo_tau=0.1, redo_every=100, weight_decay=1e-4, beta1=0.99, beta2=0.99),  # Dohare et al.'s Ant
}
SWEPT = ("lr", "weight_decay", "er_lr")  # traced hyperparameters: several values train together as configs
# The frictions of the runs behind the paper's Slippery Ant figure (the authors' code: row 0 of their
# log-uniform [0.02, 2] table, used for every seed), one per 2M-step phase.
AUTHORS_FRICTIONS = (0.2961, 0.2399, 0.0387, 0.3528, 0.0829)


@dataclass(frozen=True)
class Args:
    agent: Literal[tuple(AGENTS)] = "bp"
    """algorithm: an entry of AGENTS (Table 7's best values; cbp is CBP with L2, as the paper; layernorm-l2 and
    spectral-reg run our own choices, redo Dohare et al.'s: see the module docstring)"""
    seed: int = 0
    """base seed; seeds seed .. seed+seeds-1 train together. A seed fixes the init, the env noise and, with
    random frictions, the friction schedule"""
    seeds: int = 1
    """number of seeds trained together (the paper: 5)"""
    lr: tuple[float, ...] = (1e-4,)
    """Adam learning rate(s) (Table 7: 1e-4 for every agent of the paper; also our small sweep's choice for
    layernorm-l2 and spectral-reg, unswept for redo); several values are swept together"""
    weight_decay: tuple[float, ...] | None = None
    """coupled L2 weight decay(s) added to the gradient of every parameter (agents with weight_decay in AGENTS:
    l2, l2-er, cbp, layernorm-l2, redo; layernorm-l2's 1e-3 is our small sweep's: the authors record none)"""
    er_lr: tuple[float, ...] | None = None
    """effective-rank ascent step size(s) (agents with er_lr: er 1e-7, l2-er 1e-6)"""
    replacement_rate: float | None = None
    """CBP units replaced per optimizer step, as a fraction of the mature units (cbp: 1e-7)"""
    decay_rate: float | None = None
    """CBP running-average decay of the utility (Table 8: 0.99)"""
    maturity_threshold: int | None = None
    """CBP: optimizer steps a unit must survive before it can be replaced (Table 8: 10,000)"""
    cbp_utility: Literal[common.CBP_UTILITIES] | None = None
    """CBP utility (Dohare et al.): contribution (their Slippery Ant config, the default) or adaptable_contribution; not with --cbp-variant paper"""
    cbp_variant: Literal[common.CBP_VARIANTS] | None = None
    """CBP algorithm: dohare (Dohare et al.'s, lowest utility, outgoing weights 0) or paper (the authors' code behind the paper's CBP curve: highest utility on the rollout's activations, outgoing weights re-randomized)"""
    layer_norm: bool | None = None
    """LayerNorm (learnable scale 1 and shift 0 at init, eps 1e-6) before the ReLU of the actor's and the critic's
    hidden layer; none on the output layers (agents with layer_norm: layernorm-l2)"""
    spectral_lambda: float | None = None
    """weight of the spectral penalty in the PPO loss: sum over the actor's and critic's kernels of
    (sigma_max^k - target)^2, plus squared biases; not the policy's log-std (Lewandowski et al. 2024; default 1e-4,
    our small sweep's: the authors record no chosen value for Ant)"""
    spectral_k: float | None = None
    """power of sigma_max in the spectral penalty (the authors: 2)"""
    spectral_target: float | None = None
    """target of sigma_max^k (the authors: 2; Lewandowski et al.'s "close to one": 1)"""
    power_iters: int | None = None
    """power iterations per kernel and Adam step for sigma_max, from a fixed start vector (the authors: 10)"""
    spectral_persistent: bool | None = None
    """start each Adam step's power iterations from the last step's vectors (carried in the state) instead of the
    fixed ones; with --power-iters 1 it costs ~1/10 (our option, not the authors')"""
    redo_tau: float | None = None
    """ReDo: recycle hidden units whose score mean|h_i| / (layer mean of mean|h_k|) on the minibatch is <= tau
    (Dohare et al.'s Ant config: 0.1)"""
    redo_every: int | None = None
    """ReDo: score and recycle after every K-th Adam step, on that step's minibatch (Dohare et al.'s Ant config:
    100, i.e. ~13 times per PPO update of 10 epochs x 128 minibatches)"""
    beta1: float | None = None
    """Adam beta_1 (every agent; as the authors' runs: 0.9 for bp (Table 8), 0.99 for the others)"""
    beta2: float | None = None
    """Adam beta_2 (every agent; as the authors' runs: 0.999 for bp (Table 8), 0.99 for the others)"""
    adam_eps: float = 1e-8
    """Adam epsilon (not in the paper; 1e-8, optax's default, as the authors' runs)"""
    total_steps: int = 10_000_000
    """env steps per seed; rounded down to whole updates of --num-steps samples"""
    num_envs: int = 1
    """parallel environments per seed; each rolls out num-steps / num-envs steps per update. 1 as Table 8 and
    the authors' runs (2048-step rollouts). More envs are a speed choice (fewer sequential physics steps; a GPU
    is nearly idle with one env) that keeps 2048 samples per update but changes what each update sees: bp at
    64 envs x 32 steps never walked in 10M steps (return 123-212 per phase, against 1672-1995 at 1 env; README)"""
    num_steps: int = 2048
    """samples per PPO update (Table 8 num_steps x num_envs)"""
    update_epochs: int = 10
    """passes over each update's samples (Table 8)"""
    num_minibatches: int = 128
    """minibatches per epoch (Table 8): 2048 / 128 = 16 samples per Adam step"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_eps: float = 0.2
    """PPO ratio clipping"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 1.0
    """value loss coefficient"""
    hidden_size: int = 256
    """units of the single hidden layer of the actor and of the critic"""
    normalize_obs: bool = False
    """normalize observations by running mean and variance over every observation seen (PureJaxRL's
    continuous-control PPO does; off by default: the authors' runs feed raw observations)"""
    change_every: int = 2_000_000
    """env steps (per seed) between friction changes; a multiple of --num-envs, so a change falls exactly on
    env step k * change_every"""
    frictions: tuple[float, ...] = AUTHORS_FRICTIONS
    """friction of each phase, the same for every seed; phase k uses value k mod len. Default: the five values
    of the authors' runs (row 0 of their log-uniform [0.02, 2] table, used for every seed)"""
    random_frictions: bool = False
    """instead of --frictions, draw each seed its own frictions, log-uniform in --friction-range, one per
    phase (the authors' table, one row per seed; their runs used one row for all seeds)"""
    friction_range: tuple[float, float] = (0.02, 2.0)
    """range of --random-frictions"""
    fixed_friction: float | None = None
    """use this friction for the whole run (same as --frictions F; e.g. 1.0 for a plain Ant)"""
    physics: Literal["mjx", "brax"] = "mjx"
    """the engine: "mjx" (Brax's ant rewritten for MuJoCo MJX, the flags below) or "brax" (Brax's own Ant on its
    positional pipeline, the authors' engine: `brax.envs.get_environment("ant", backend="positional")` in Brax's
    episode and auto-reset wrappers, sliding friction set on every geom each step as their wrapper does; the
    MJX-only flags below must keep their defaults)"""
    solver_iterations: int = 10
    """Newton iterations of MJX's constraint solver per physics step. Brax's MJX Ant uses 1 (and 4 line-search
    iterations); then the contact forces are far from converged and low friction is barely slippery (random
    gaits move as fast at friction 0.04 as at 1), so the default is high enough for friction to act as its
    coefficient says"""
    ls_iterations: int = 20
    """line-search iterations per Newton iteration (see --solver-iterations)"""
    contacts: Literal["feet", "all"] = "feet"
    """which geoms collide with the floor: "feet" (Brax's ant: the four foot spheres only; a flipped ant falls
    through the floor and its episode ends) or "all" (gym's Ant: torso and every leg capsule too; a flipped ant
    rests on its back, healthy)"""
    init_pose: Literal["crouched", "standing"] = "crouched"
    """start pose before the reset noise: "crouched" (Brax's ant: torso z 0.55, ankles at +-1 rad) or
    "standing" (MuJoCo's qpos0: z 0.75, straight legs, outside the ankle ranges)"""
    ctrl_cost_clipped: bool = False
    """charge the control cost on the action clipped to the motor range [-1, 1]; default: on the action as the
    policy emitted it (Brax's ant; the authors' runs add no clipping wrapper). The motors get the clipped
    action either way"""
    fresh_resets: bool = False
    """draw fresh reset noise for every episode (gym); default: every episode of an env restarts from that
    env's first start state, as Brax's auto-reset does"""
    episode_length: int = 1000
    """env steps before a time-out (the episode ends there; see --bootstrap-timeouts)"""
    bootstrap_timeouts: bool = False
    """at a time-out, bootstrap from the value of the final state (add gamma * V(s_T) to the last reward);
    default: a time-out is terminal, as in the authors' runs (Brax's episode wrapper sets done)"""
    hessian_every_phase: bool = False
    """Hessian spectrum (SLQ) of the PPO loss on a fresh rollout of num-steps samples at the start ("init":
    the previous phase's final parameters on the new friction) and end of every friction phase"""
    hessian_iters: int = 100
    """Lanczos iterations per probe"""
    hessian_probes: int = 1
    """Gaussian probes per spectrum"""
    updates_per_chunk: int = 10
    """updates per jitted call (one progress line each; Ctrl-C waits at most one); chunks also end at friction
    changes"""
    fast_compile: bool = False
    """compile without XLA's backend optimizations: about half the compile time but much slower steps (only
    for tiny runs: the tests, quick CPU checks)"""
    checkpoint_minutes: float = 5.0
    """write checkpoint.pkl after the first chunk that ends this many minutes after the last one (one is also
    written at the end and on Ctrl-C)"""
    out_dir: str | None = None
    """run directory (default: runs/ant_ppo__<agent>__<UTC stamp>/); with --resume, the run to continue"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint.pkl (--total-steps may be raised)"""
    member_batching: Literal[runner.MEMBER_BATCHING] = "auto"
    """how seeds x configs run together: vmap (one batched program) or map (one member after another); auto =
    map on one CPU device (faster there), else vmap"""
    distributed: bool = False
    """join a job of several processes (hosts) that SLURM or Open MPI started (srun, mpirun): the members spread over every process's devices"""
    coordinator: str | None = None
    """HOST:PORT of process 0 of a job of several processes started by hand (with --num-processes and --process-id)"""
    num_processes: int | None = None
    """processes in the job (with --coordinator)"""
    process_id: int | None = None
    """this process's index in the job, 0 .. num-processes - 1 (with --coordinator)"""


# Args of the MJX env alone (Brax's Ant has its own solver, contacts, start pose, control cost and resets).
MJX_ONLY = ("solver_iterations", "ls_iterations", "contacts", "init_pose", "ctrl_cost_clipped", "fresh_resets",
            "bootstrap_timeouts")
# Args that may change between a run and its --resume (--total-steps to run longer).
RESUME_FREE = ("total_steps", "resume", "out_dir", "checkpoint_minutes", "member_batching")
LAYER_NAMES = ("actor_hidden", "critic_hidden")
# MJX Ant at friction 0.02-0.03 goes NaN on a GPU under the default (TF32) matmul precision.
PRECISE = "highest"
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # --fast-compile


# ----------------------------------------------------------------------------------------------------------
# Environment: Brax's `ant` (brax/envs/assets/ant.xml and brax/envs/ant.py, Copyright Google LLC, Apache
# License 2.0), rewritten here for MuJoCo MJX: the torso sphere, four two-segment legs, 8 hinge motors, and a
# foot sphere at the end of each leg. In Brax only the four foot spheres collide with the floor (a flipped ant
# falls through the floor, so its torso leaves the healthy range and the episode ends); `contacts="all"` lets
# the torso and every leg capsule collide instead (gym's Ant; a flipped ant then rests on its back, healthy).
# ----------------------------------------------------------------------------------------------------------
ANT_XML = """
<mujoco model="ant">
  <compiler angle="degree" inertiafromgeom="true"/>
  <option timestep="0.01" solver="Newton" iterations="{iterations}" ls_iterations="{ls_iterations}">
    <flag eulerdamp="disable"/>
  </option>
  <default>
    <joint limited="true" armature="1" damping="1"/>
    <geom contype="{contype}" conaffinity="0" condim="3" density="5.0" friction="1 0.5 0.5" margin="0.01"/>
  </default>
  <worldbody>
    <geom name="floor" type="plane" size="40 40 40" contype="{contype}" conaffinity="1"/>
    <body name="torso" pos="0 0 0.75">
      <freejoint name="root"/>
      <geom name="torso" type="sphere" size="0.25"/>
      <body name="front_left_leg">
        <geom type="capsule" size="0.08" fromto="0 0 0 0.2 0.2 0"/>
        <body pos="0.2 0.2 0">
          <joint name="hip_1" type="hinge" axis="0 0 1" range="-30 30"/>
          <geom type="capsule" size="0.08" fromto="0 0 0 0.2 0.2 0"/>
          <body pos="0.2 0.2 0">
            <joint name="ankle_1" type="hinge" axis="-1 1 0" range="30 70"/>
            <geom type="capsule" size="0.08" fromto="0 0 0 0.4 0.4 0"/>
            {foot:0.4 0.4 0}
          </body>
        </body>
      </body>
      <body name="front_right_leg">
        <geom type="capsule" size="0.08" fromto="0 0 0 -0.2 0.2 0"/>
        <body pos="-0.2 0.2 0">
          <joint name="hip_2" type="hinge" axis="0 0 1" range="-30 30"/>
          <geom type="capsule" size="0.08" fromto="0 0 0 -0.2 0.2 0"/>
          <body pos="-0.2 0.2 0">
            <joint name="ankle_2" type="hinge" axis="1 1 0" range="-70 -30"/>
            <geom type="capsule" size="0.08" fromto="0 0 0 -0.4 0.4 0"/>
            {foot:-0.4 0.4 0}
          </body>
        </body>
      </body>
      <body name="back_left_leg">
        <geom type="capsule" size="0.08" fromto="0 0 0 -0.2 -0.2 0"/>
        <body pos="-0.2 -0.2 0">
          <joint name="hip_3" type="hinge" axis="0 0 1" range="-30 30"/>
          <geom type="capsule" size="0.08" fromto="0 0 0 -0.2 -0.2 0"/>
          <body pos="-0.2 -0.2 0">
            <joint name="ankle_3" type="hinge" axis="-1 1 0" range="-70 -30"/>
            <geom type="capsule" size="0.08" fromto="0 0 0 -0.4 -0.4 0"/>
            {foot:-0.4 -0.4 0}
          </body>
        </body>
      </body>
      <body name="back_right_leg">
        <geom type="capsule" size="0.08" fromto="0 0 0 0.2 -0.2 0"/>
        <body pos="0.2 -0.2 0">
          <joint name="hip_4" type="hinge" axis="0 0 1" range="-30 30"/>
          <geom type="capsule" size="0.08" fromto="0 0 0 0.2 -0.2 0"/>
          <body pos="0.2 -0.2 0">
            <joint name="ankle_4" type="hinge" axis="1 1 0" range="30 70"/>
            <geom type="capsule" size="0.08" fromto="0 0 0 0.4 -0.4 0"/>
            {foot:0.4 -0.4 0}
          </body>
        </body>
      </body>
    </body>
  </worldbody>
  <actuator>
    <motor joint="hip_1" gear="150" ctrllimited="true" ctrlrange="-1 1"/>
    <motor joint="ankle_1" gear="150" ctrllimited="true" ctrlrange="-1 1"/>
    <motor joint="hip_2" gear="150" ctrllimited="true" ctrlrange="-1 1"/>
    <motor joint="ankle_2" gear="150" ctrllimited="true" ctrlrange="-1 1"/>
    <motor joint="hip_3" gear="150" ctrllimited="true" ctrlrange="-1 1"/>
    <motor joint="ankle_3" gear="150" ctrllimited="true" ctrlrange="-1 1"/>
    <motor joint="hip_4" gear="150" ctrllimited="true" ctrlrange="-1 1"/>
    <motor joint="ankle_4" gear="150" ctrllimited="true" ctrlrange="-1 1"/>
  </actuator>
</mujoco>
"""
# Brax's foot: a massless sphere (inertia unchanged) over the end cap of the lower leg, the only geom that
# touches the floor.
FOOT_XML = '<geom type="sphere" size="0.08" pos="{}" contype="1" mass="0"/>'
SUBSTEPS = 5              # physics steps per env step
DT = 0.01 * SUBSTEPS      # seconds per env step (Brax's ant: 0.05)
OBS_DIM, ACT_DIM = 27, 8  # qpos without x, y (13) + qvel (14); 8 motors
HEALTHY_Z = (0.2, 1.0)    # the episode ends when the torso height leaves this interval
HEALTHY_REWARD, CTRL_COST = 1.0, 0.5
RESET_NOISE = 0.1         # qpos += U(-0.1, 0.1), qvel = 0.1 N(0, 1) at reset (as Gym / Brax)
# Brax ant's init_qpos: crouched, torso at z 0.55, hips 0, ankles at +-1 rad (inside their 30-70 degree
# ranges). The "standing" pose is MuJoCo's qpos0 (z 0.75, all hinges 0: the ankles start outside their ranges
# and snap in on the first step).
CROUCHED_QPOS = (0.0, 0.0, 0.55, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0, -1.0, 0.0, 1.0)


class EnvConfig(NamedTuple):
    """Static settings of the Ant env (hashable: part of the compiled program). Defaults: Brax's ant as the
    authors ran it, with solver iterations at which MJX's friction acts as its coefficient says."""
    solver_iterations: int = 10
    ls_iterations: int = 20
    contacts: str = "feet"          # "feet" (Brax) or "all" (gym)
    init_pose: str = "crouched"     # "crouched" (Brax) or "standing" (MuJoCo's qpos0)
    ctrl_cost_clipped: bool = False  # control cost on the action clipped to the motor range (else the raw one)
    fresh_resets: bool = False      # fresh reset noise every episode (else each env's first start, as Brax)
    episode_length: int = 1000
    physics: str = "mjx"            # "mjx" (this file's MJX Ant) or "brax" (Brax's own positional Ant)


@lru_cache(maxsize=None)
def ant_model(solver_iterations=EnvConfig._field_defaults["solver_iterations"],
              ls_iterations=EnvConfig._field_defaults["ls_iterations"], contacts="feet"):
    """The Ant as (MjModel, MJX model); built once per process and setting."""
    if contacts not in ("feet", "all"):
        raise ValueError(f"contacts must be 'feet' or 'all', got {contacts!r}")
    xml = ANT_XML.replace("{iterations}", str(solver_iterations)).replace("{ls_iterations}", str(ls_iterations))
    xml = xml.replace("{contype}", "0" if contacts == "feet" else "1")
    for pos in ("0.4 0.4 0", "-0.4 0.4 0", "-0.4 -0.4 0", "0.4 -0.4 0"):
        xml = xml.replace("{foot:" + pos + "}", FOOT_XML.format(pos) if contacts == "feet" else "")
    mj_model = mujoco.MjModel.from_xml_string(xml)
    # This process's device: MJX's default, jax.devices()[0], is process 0's in a job of several processes.
    with jax.ensure_compile_time_eval():  # concrete arrays even when first called inside a jit trace
        return mj_model, mjx.put_model(mj_model, jax.local_devices()[0])


def env_model(cfg):
    return ant_model(cfg.solver_iterations, cfg.ls_iterations, cfg.contacts)


class EnvState(NamedTuple):
    """Everything an Ant env carries between steps (MJX recomputes the rest of mjx.Data every step)."""
    qpos: jax.Array       # [15] free joint (x, y, z, quaternion) + 8 hinges
    qvel: jax.Array       # [14]
    warmstart: jax.Array  # [14] solver warm start (qacc of the previous step)
    t: jax.Array          # int32 env steps since the episode began
    ret: jax.Array        # undiscounted return of the episode so far
    start_qpos: jax.Array  # [15] the env's first start state (where Brax's auto-reset returns every episode)
    start_qvel: jax.Array  # [14]


class StepInfo(NamedTuple):
    reward: jax.Array
    terminated: jax.Array   # torso height left HEALTHY_Z
    truncated: jax.Array    # time-out while healthy
    final_obs: jax.Array    # observation after the step, before any auto-reset
    episode_return: jax.Array  # return of the episode that ended at this step (meaningful where done)


def observe(state):
    return jnp.concatenate([state.qpos[2:], state.qvel])


def env_reset(cfg, key):
    """A fresh start: the initial pose + U(-0.1, 0.1) on qpos, 0.1 N(0, 1) on qvel (Brax's ant)."""
    mj_model, _ = env_model(cfg)
    if cfg.init_pose not in ("crouched", "standing"):
        raise ValueError(f"init_pose must be 'crouched' or 'standing', got {cfg.init_pose!r}")
    k_pos, k_vel = jax.random.split(key)
    qpos = jnp.asarray(CROUCHED_QPOS if cfg.init_pose == "crouched" else mj_model.qpos0, jnp.float32)
    qpos = qpos + jax.random.uniform(k_pos, qpos.shape, jnp.float32, -RESET_NOISE, RESET_NOISE)
    qpos = qpos.at[3:7].set(qpos[3:7] / jnp.linalg.norm(qpos[3:7]))  # keep the quaternion a rotation
    qvel = RESET_NOISE * jax.random.normal(k_vel, (mj_model.nv,), jnp.float32)
    return EnvState(qpos, qvel, jnp.zeros(mj_model.nv, jnp.float32), jnp.zeros((), jnp.int32),
                    jnp.zeros((), jnp.float32), qpos, qvel)


def with_friction(model, friction):
    """The MJX model with the sliding friction of every geom set to `friction` (may be traced)."""
    return model.replace(geom_friction=model.geom_friction.at[:, 0].set(friction))


def ctrl_cost(cfg, action):
    """0.5 |a|^2. Brax's ant charges it on the action as the policy emitted it, and the authors' runs add no
    clipping wrapper, so a policy pays for means beyond the motor range; `cfg.ctrl_cost_clipped` charges the
    clipped action instead."""
    cost_action = jnp.clip(action, -1.0, 1.0) if cfg.ctrl_cost_clipped else action
    return CTRL_COST * jnp.sum(jnp.square(cost_action), axis=-1)


def auto_reset(cfg, after, done, reset_key):
    """The state after `after` where the episode is `done`: the env's first start state (Brax's
    AutoResetWrapper returns every episode to the state of the first reset), or with `cfg.fresh_resets` a new
    start with fresh noise (gym); `after` itself elsewhere."""
    if cfg.fresh_resets:
        fresh = env_reset(cfg, reset_key)
    else:
        fresh = after._replace(qpos=after.start_qpos, qvel=after.start_qvel, warmstart=jnp.zeros_like(after.warmstart),
                               t=jnp.zeros_like(after.t), ret=jnp.zeros_like(after.ret))
    return jax.tree.map(lambda r, a: jnp.where(done, r, a), fresh, after)


def env_step(cfg, state, action, friction, reset_key):
    """One env step (5 physics steps) of one Ant at the given friction, with auto-reset on done."""
    _, model = env_model(cfg)
    model = with_friction(model, friction)
    ctrl = jnp.clip(action, -1.0, 1.0)  # the motors' range (Brax's actuators clip too)
    data = mjx.make_data(model).replace(qpos=state.qpos, qvel=state.qvel, qacc_warmstart=state.warmstart,
                                        ctrl=ctrl)
    data = jax.lax.fori_loop(0, SUBSTEPS, lambda _, d: mjx.step(model, d), data)
    forward_velocity = (data.qpos[0] - state.qpos[0]) / DT
    reward = forward_velocity + HEALTHY_REWARD - ctrl_cost(cfg, action)
    z = data.qpos[2]
    terminated = ~((z > HEALTHY_Z[0]) & (z < HEALTHY_Z[1]))
    t = state.t + 1
    truncated = (t >= cfg.episode_length) & ~terminated
    after = state._replace(qpos=data.qpos, qvel=data.qvel, warmstart=data.qacc_warmstart, t=t,
                           ret=state.ret + reward)
    next_state = auto_reset(cfg, after, terminated | truncated, reset_key)
    return next_state, StepInfo(reward, terminated, truncated, observe(after), after.ret)


def phase_friction(friction_key, phase, frictions, friction_range):
    """Friction of phase `phase` (may be traced): `frictions[phase mod len(frictions)]`, the same for every
    seed; or, with `frictions` None, log-uniform in friction_range, a function of the seed's friction key and
    the phase alone."""
    if frictions is not None:
        return jnp.asarray(frictions, jnp.float32)[phase % len(frictions)]
    low, high = math.log(friction_range[0]), math.log(friction_range[1])
    u = jax.random.uniform(jax.random.fold_in(friction_key, phase))
    return jnp.exp(low + u * (high - low))


# ----------------------------------------------------------------------------------------------------------
# --physics brax: Brax's own Ant on its positional pipeline, the engine of the authors' runs (their
# NonstationaryFrictionBraxWrapper): `brax.envs.get_environment("ant", backend="positional")` (timestep 0.005 s,
# 10 substeps, gear 200) in Brax's EpisodeWrapper (1000 steps, action repeat 1) and AutoResetWrapper (every
# episode restarts from the env's first start state); before each step the system's sliding friction
# `geom_friction[:, 0]` of every geom is set to the phase's value, as their wrapper does. Their wrapper switches
# phase one env step early ((steps + 1) // change_every); both physics here use the schedule above.
# ----------------------------------------------------------------------------------------------------------
class BraxEnvState(NamedTuple):
    brax: object          # brax.envs.base.State of the wrapped env (obs, done, info: steps, truncation, ...)
    ret: jax.Array        # undiscounted return of the episode so far


@lru_cache(maxsize=None)
def brax_ant(episode_length):
    """Brax's positional Ant in the authors' wrappers; imported on first use (MJX runs do not need Brax)."""
    with contextlib.redirect_stdout(io.StringIO()):  # Brax prints a notice when its optional Warp backend is absent
        from brax import envs
        from brax.envs.wrappers.training import AutoResetWrapper, EpisodeWrapper
    with warnings.catch_warnings(), jax.ensure_compile_time_eval():  # concrete arrays even inside a jit trace
        warnings.simplefilter("ignore", UserWarning)  # Brax warns on every load that its pipelines are unmaintained
        ant = envs.get_environment("ant", backend="positional")
    return AutoResetWrapper(EpisodeWrapper(ant, episode_length, 1))


def brax_reset(cfg, key):
    return BraxEnvState(brax_ant(cfg.episode_length).reset(key), jnp.zeros((), jnp.float32))


def brax_observe(state):
    return state.brax.obs


def brax_step(cfg, state, action, friction, reset_key):
    """One env step of Brax's Ant at `friction`: the base env's system gets the friction for this step (restored
    after tracing it), then the wrappers step, auto-reset included. Brax clips the action to the motors' range
    and charges the control cost on the action as given, as the MJX env."""
    del reset_key  # Brax's auto-reset returns to the first start state: no fresh noise
    env = brax_ant(cfg.episode_length)
    base, sys = env.unwrapped, env.unwrapped.sys
    base.sys = sys.replace(geom_friction=sys.geom_friction.at[:, 0].set(friction))
    try:
        after = env.step(state.brax, action)
    finally:
        base.sys = sys
    done = after.done > 0.5
    truncated = done & (after.info["truncation"] > 0.5)
    ret = state.ret + after.reward
    info = StepInfo(after.reward, done & ~truncated, truncated, after.obs, ret)  # obs after a reset where done
    return BraxEnvState(after, jnp.where(done, 0.0, ret)), info


def env_functions(cfg):
    """(reset, step, observe) of the chosen physics."""
    if cfg.physics == "brax":
        return brax_reset, brax_step, brax_observe
    return env_reset, env_step, observe


# ----------------------------------------------------------------------------------------------------------
# Actor-critic (App. J.1): separate networks, one ReLU hidden layer each; Gaussian policy with a
# state-independent log standard deviation. Zero biases. With LayerNorm (layernorm-l2) each hidden layer also
# holds its scale and shift, which the forward pass applies before the ReLU.
# ----------------------------------------------------------------------------------------------------------
def lecun_dense(key, fan_in, fan_out):
    """{"w": U(-b, b) with b = sqrt(3 / fan_in) (LeCun-uniform), "b": 0}: the init of every layer of the authors'
    actor and critic (their models.py), the policy head included."""
    bound = math.sqrt(3.0 / fan_in)
    return {"w": jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -bound, bound),
            "b": jnp.zeros(fan_out, jnp.float32)}


def init_params(key, hidden, layer_norm=False):
    """Every layer LeCun-uniform, the policy head not scaled down, as the authors' runs: their untrained policy's
    action means reach well beyond the [-1, 1] motor range, where the control cost on the unclipped action is
    large (an untrained policy's return is about -350 to -550 here, against -70 to -134 with a head scaled by
    0.01). `layer_norm`: the hidden layers also get a LayerNorm scale (1) and shift (0), as Flax's LayerNorm
    inits them in the authors' runs."""
    k = jax.random.split(key, 4)
    norm = {"scale": jnp.ones(hidden, jnp.float32), "shift": jnp.zeros(hidden, jnp.float32)} if layer_norm else {}
    return {"actor": {"hidden": {**lecun_dense(k[0], OBS_DIM, hidden), **norm},
                      "out": lecun_dense(k[1], hidden, ACT_DIM),
                      "log_std": jnp.zeros(ACT_DIM, jnp.float32)},
            "critic": {"hidden": {**lecun_dense(k[2], OBS_DIM, hidden), **norm},
                       "out": lecun_dense(k[3], hidden, 1)}}


def dense(layer, x):
    return x @ layer["w"] + layer["b"]


def hidden_layer(layer, x):
    """ReLU(dense), with LayerNorm between them where the layer has a scale (agents with layer_norm)."""
    x = dense(layer, x)
    if "scale" in layer:
        x = common.layer_norm(x, layer["scale"], layer["shift"])
    return jax.nn.relu(x)


def actor_apply(actor, obs):
    """-> (action mean, log std, hidden activations)."""
    h = hidden_layer(actor["hidden"], obs)
    return dense(actor["out"], h), actor["log_std"], h


def critic_apply(critic, obs):
    """-> (value, hidden activations)."""
    h = hidden_layer(critic["hidden"], obs)
    return dense(critic["out"], h)[..., 0], h


def hidden_features(params, obs):
    """Post-ReLU hidden features of the actor and the critic: the layers ER, CBP and the metrics act on."""
    return [actor_apply(params["actor"], obs)[2], critic_apply(params["critic"], obs)[1]]


def gaussian_log_prob(action, mean, log_std):
    return jnp.sum(-0.5 * jnp.square((action - mean) / jnp.exp(log_std)) - log_std - 0.5 * math.log(2 * math.pi),
                   axis=-1)


class Batch(NamedTuple):
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array   # under the policy that acted
    value: jax.Array      # the critic's value when the policy acted (the centre of the clipped value loss)
    advantage: jax.Array
    target: jax.Array     # value target (advantage + value)


def ppo_loss(params, batch, args):
    """Clipped PPO objective + value loss - entropy bonus (advantages normalized over the batch). The value loss is
    the authors': the larger of the squared error and that of the value clipped to +-clip_eps around the rollout's
    value, with no factor 0.5. Returns (loss, (actor hidden, critic hidden))."""
    mean, log_std, h_actor = actor_apply(params["actor"], batch.obs)
    ratio = jnp.exp(gaussian_log_prob(batch.action, mean, log_std) - batch.log_prob)
    adv = (batch.advantage - batch.advantage.mean()) / (batch.advantage.std() + 1e-8)
    policy_loss = -jnp.mean(jnp.minimum(ratio * adv,
                                        jnp.clip(ratio, 1 - args.clip_eps, 1 + args.clip_eps) * adv))
    value, h_critic = critic_apply(params["critic"], batch.obs)
    clipped = batch.value + jnp.clip(value - batch.value, -args.clip_eps, args.clip_eps)
    value_loss = jnp.mean(jnp.maximum(jnp.square(value - batch.target), jnp.square(clipped - batch.target)))
    entropy = jnp.sum(log_std + 0.5 * math.log(2 * math.pi * math.e))
    return policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy, (h_actor, h_critic)


def spectral_params(params):
    """What the spectral penalty sees: the actor's and critic's layers, without the policy's log-std. Its rule
    (common.spectral_penalty) takes every leaf not named "w" or "scale" for a bias, which would pull log_std to
    0 (std 1) and fight PPO's entropy term; the authors' penalty skips it (it penalizes only kernels, biases and
    LayerNorm scales)."""
    return {"actor": {name: layer for name, layer in params["actor"].items() if name != "log_std"},
            "critic": params["critic"]}


def train_loss(params, batch, args, agent, starts=None):
    """The loss an Adam step minimizes: ppo_loss, + spectral_lambda x the spectral penalty for agents with
    spectral_lambda (Lewandowski et al. 2024, added to the loss as the authors' code does). `starts`: the power
    iterations' start vectors (None: the fixed ones). Returns (loss, (PPO loss, hidden activations, the power
    iterations' last vectors or None))."""
    loss, hiddens = ppo_loss(params, batch, args)
    if "spectral_lambda" not in agent:
        return loss, (loss, hiddens, None)
    # Start keys 0..3 count the kernels in leaf order (actor hidden, out, critic hidden, out), the authors' order
    # (their a_0, a_1, c_0, c_1).
    penalty, vectors = common.spectral_penalty(spectral_params(params), agent["spectral_k"], agent["spectral_target"],
                                               agent["power_iters"], starts)
    return loss + agent["spectral_lambda"] * penalty, (loss, hiddens, vectors)


def gae(values, rewards, dones, last_value, gamma, lam):
    """Generalized advantage estimation over a [T, envs] rollout with a reverse lax.scan.
    `dones[t]` ends the episode after step t (with --bootstrap-timeouts, time-outs already carry
    gamma * V(final obs) in their reward).
    Returns (advantages, value targets)."""
    def back(carry, x):
        next_adv, next_value = carry
        value, reward, done = x
        keep = 1.0 - done
        delta = reward + gamma * next_value * keep - value
        adv = delta + gamma * lam * keep * next_adv
        return (adv, value), adv

    _, advantages = jax.lax.scan(back, (jnp.zeros_like(last_value), last_value),
                                 (values, rewards, dones.astype(values.dtype)), reverse=True)
    return advantages, advantages + values


# ----------------------------------------------------------------------------------------------------------
# Observation normalization: running mean / variance over every observation the policy has seen
# ----------------------------------------------------------------------------------------------------------
class ObsStats(NamedTuple):
    mean: jax.Array
    var: jax.Array
    count: jax.Array


def obs_stats_init():
    return ObsStats(jnp.zeros(OBS_DIM, jnp.float32), jnp.ones(OBS_DIM, jnp.float32), jnp.float32(1e-4))


def obs_stats_update(stats, obs):
    """Merge a batch [n, OBS_DIM] into the running moments (parallel-variance formula)."""
    n = obs.shape[0]
    batch_mean, batch_var = obs.mean(0), obs.var(0)
    total = stats.count + n
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * n / total
    var = (stats.var * stats.count + batch_var * n + jnp.square(delta) * stats.count * n / total) / total
    return ObsStats(mean, var, total)


def normalize(stats, obs):
    return (obs - stats.mean) / jnp.sqrt(stats.var + 1e-8)


# ----------------------------------------------------------------------------------------------------------
# One member (a config x seed). Its randomness depends only on its seed, never on its position among the
# members, so a seed run alone reproduces the same member of a multi-seed run.
# ----------------------------------------------------------------------------------------------------------
class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array      # env reward (+ gamma * V(final obs) on time-outs with bootstrap_timeouts)
    done: jax.Array
    episode_return: jax.Array
    friction: jax.Array
    env_reward: jax.Array  # the env's reward (no bootstrap term)
    ctrl_cost: jax.Array   # the control cost the env charged (its share of the reward)
    mean_sq: jax.Array     # mean square of the policy's action mean over the action's dims


def env_config(args):
    return EnvConfig(solver_iterations=args.solver_iterations, ls_iterations=args.ls_iterations,
                     contacts=args.contacts, init_pose=args.init_pose, ctrl_cost_clipped=args.ctrl_cost_clipped,
                     fresh_resets=args.fresh_resets, episode_length=args.episode_length, physics=args.physics)


def phase_frictions(args):
    """The phases' frictions, the same for every seed; None: each seed draws its own (--random-frictions)."""
    if args.fixed_friction is not None:
        return (float(args.fixed_friction),)
    return None if args.random_frictions else tuple(float(f) for f in args.frictions)


def member_keys(seed):
    """(init, env reset, training, friction, Hessian, ReDo) keys of a member: functions of its seed alone."""
    return tuple(jax.random.fold_in(jax.random.key(seed), i) for i in range(6))


def schedule(args, friction_key):
    """The slippery schedule: friction of the vector step that starts after `s` env steps of this seed."""
    return lambda s: phase_friction(friction_key, s // args.change_every, phase_frictions(args), args.friction_range)


def training_reward(args, critic, obs_stats, info):
    """The reward PPO learns from: the env's, where a time-out is terminal (the authors' runs: Brax's episode
    wrapper sets done at the time-out and their GAE does not bootstrap through done); with
    --bootstrap-timeouts, + gamma * V(final obs) at time-outs (the episode still ends there)."""
    if not args.bootstrap_timeouts:
        return info.reward
    final_obs = normalize(obs_stats, info.final_obs) if args.normalize_obs else info.final_obs
    return info.reward + args.gamma * critic_apply(critic, final_obs)[0] * info.truncated


def rollout(args, params, env, obs_stats, steps, key, friction_of_step):
    """num_steps / num_envs vector steps of all envs under the current policy. `friction_of_step(s)` gives
    the friction of a vector step that starts after s env steps. Returns ((env, obs_stats, steps), Transition
    [T, envs], normalized obs after the last step)."""
    _, step, observe = env_functions(env_config(args))
    step_fn = jax.vmap(partial(step, env_config(args)), in_axes=(0, 0, None, 0))

    def one(carry, key_t):
        env, obs_stats, steps = carry
        obs = jax.vmap(observe)(env)
        if args.normalize_obs:
            obs_stats = obs_stats_update(obs_stats, obs)
            obs = normalize(obs_stats, obs)
        k_act, k_reset = jax.random.split(key_t)
        mean, log_std, _ = actor_apply(params["actor"], obs)
        action = mean + jnp.exp(log_std) * jax.random.normal(k_act, mean.shape)
        value, _ = critic_apply(params["critic"], obs)
        friction = friction_of_step(steps)
        env, info = step_fn(env, action, friction, jax.random.split(k_reset, args.num_envs))
        reward = training_reward(args, params["critic"], obs_stats, info)
        transition = Transition(obs, action, gaussian_log_prob(action, mean, log_std), value, reward,
                                info.terminated | info.truncated, info.episode_return,
                                jnp.full(args.num_envs, friction), info.reward,
                                ctrl_cost(env_config(args), action), jnp.mean(jnp.square(mean), axis=-1))
        return (env, obs_stats, steps + args.num_envs), transition

    length = args.num_steps // args.num_envs
    (env, obs_stats, steps), traj = jax.lax.scan(one, (env, obs_stats, steps), jax.random.split(key, length))
    last_obs = jax.vmap(observe)(env)
    last_obs = normalize(obs_stats, last_obs) if args.normalize_obs else last_obs
    return (env, obs_stats, steps), traj, last_obs


def make_batch(args, params, traj, last_obs):
    """Flatten a rollout into [num_steps] samples with GAE advantages and value targets."""
    last_value, _ = critic_apply(params["critic"], last_obs)
    advantages, targets = gae(traj.value, traj.reward, traj.done, last_value, args.gamma, args.gae_lambda)
    flat = lambda x: x.reshape((args.num_steps,) + x.shape[2:])
    return Batch(flat(traj.obs), flat(traj.action), flat(traj.log_prob), flat(traj.value), flat(advantages),
                 flat(targets))


def make_train(args, agent):
    """The run's functions of one member (PureJaxRL's make_train): init(seed) -> state; train(state, hp, seed,
    count) -> (state, metrics [updates_per_chunk, ...]): updates_per_chunk PPO updates, of which those at index
    >= count are skipped (zero metrics), so chunks cut at friction changes reuse one program; spectrum(state,
    seed, phase, which) -> SLQ (nodes, weights). `agent` is the resolved AGENTS entry; `hp` holds the member's
    swept hyperparameters (traced: a sweep is one compiled program)."""

    def optimizer(hp):
        return common.adam(hp["lr"], agent["beta1"], agent["beta2"], args.adam_eps, hp["weight_decay"])

    def init(seed):
        k_init, k_env, k_train, *_ = member_keys(seed)
        params = init_params(k_init, args.hidden_size, agent.get("layer_norm", False))
        env_keys = jax.random.split(k_env, args.num_envs)
        reset = partial(env_functions(env_config(args))[0], env_config(args))
        state = {"params": params, "opt": optimizer({"lr": 1.0, "weight_decay": 0.0}).init(params),
                 "obs_stats": obs_stats_init(), "env": jax.vmap(reset)(env_keys),
                 "steps": jnp.zeros((), jnp.int32), "key": jax.random.key_data(k_train)}  # raw: "map" stacks states on the host
        if "replacement_rate" in agent:
            state["cbp"] = (common.cbp_init(args.hidden_size), common.cbp_init(args.hidden_size))
        if agent.get("spectral_persistent"):
            state["spectral_v"] = common.spectral_starts(spectral_params(params))
        return state

    @jax.jit  # its trace is cached: eval_shape in train and the cond there reuse one trace
    def update(state, hp, seed):
        """One PPO update: rollout, GAE, update_epochs x (one ER ascent step, then num_minibatches Adam steps, each
        followed by CBP or, when due, ReDo). Returns (new state, metrics of this update)."""
        opt = optimizer(hp)
        key, k_roll, k_epochs = jax.random.split(jax.random.wrap_key_data(state["key"]), 3)
        friction_key = member_keys(seed)[3]
        (env, obs_stats, steps), traj, last_obs = rollout(args, state["params"], state["env"], state["obs_stats"],
                                                          state["steps"], k_roll, schedule(args, friction_key))
        batch = make_batch(args, state["params"], traj, last_obs)
        mb_size = args.num_steps // args.num_minibatches
        # The plasticity metrics on the rollout's activations, i.e. of the policy and critic that acted, before the
        # update (as the authors' runs record them)
        feats = hidden_features(state["params"], batch.obs)
        acting = state["params"]  # the parameters that acted in the rollout
        steps_per_update = args.update_epochs * args.num_minibatches
        first_step = state["steps"] // args.num_steps * steps_per_update  # Adam steps before this update

        def minibatch_step(carry, xs):
            params, opt_state, cbp, vectors = carry
            mb, k_cbp, number = xs
            starts = vectors if agent.get("spectral_persistent") else None
            (_, (loss, hiddens, ends)), grads = jax.value_and_grad(
                lambda p: train_loss(p, mb, args, agent, starts), has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = jax.tree.map(jnp.add, params, updates)
            if "replacement_rate" in agent:
                if agent["cbp_variant"] == "paper":  # the authors: the activations the acting parameters produced
                    hiddens = hidden_features(acting, mb.obs)
                params, opt_state, cbp = cbp_step(agent, opt, params, opt_state, cbp, hiddens, k_cbp)
            if "redo_tau" in agent:  # after every redo_every-th Adam step, scored on its minibatch's activations
                due = (number + 1) % agent["redo_every"] == 0
                params = redo_step(agent, params, hiddens, jax.random.fold_in(member_keys(seed)[5], number), due)
            return (params, opt_state, cbp, ends if agent.get("spectral_persistent") else vectors), loss

        def epoch(carry, xs):
            key_e, index = xs
            k_perm, k_cbp = jax.random.split(key_e)
            if "er_lr" in agent:  # the ER step (App. D) before the epoch's Adam steps, on the whole rollout
                carry = (er_step(carry[0], batch.obs, hp["er_lr"]),) + carry[1:]
            perm = jax.random.permutation(k_perm, args.num_steps)
            mbs = jax.tree.map(lambda x: x[perm].reshape((args.num_minibatches, mb_size) + x.shape[1:]), batch)
            numbers = first_step + index * args.num_minibatches + jnp.arange(args.num_minibatches)
            carry, losses = jax.lax.scan(minibatch_step, carry,
                                         (mbs, jax.random.split(k_cbp, args.num_minibatches), numbers))
            return carry, losses.mean()

        (params, opt_state, cbp, vectors), losses = jax.lax.scan(
            epoch, (state["params"], state["opt"], state.get("cbp", ()), state.get("spectral_v", ())),
            (jax.random.split(k_epochs, args.update_epochs), jnp.arange(args.update_epochs)))
        done = traj.done.astype(jnp.float32)
        episodes = done.sum()
        metrics = {
            "episodic_return": jnp.where(episodes > 0, (traj.episode_return * done).sum() / jnp.maximum(episodes, 1),
                                         jnp.nan),
            "episodes": episodes.astype(jnp.int32),
            "friction": traj.friction[-1, 0],
            "loss": losses.mean(),
            "dead_units": jnp.stack([common.dead_units(f) for f in feats]).astype(jnp.int32),
            "effective_rank": common.effective_ranks(feats),
            "param_norm": common.param_norm(params),
            "step_reward": traj.env_reward.mean(), "ctrl_cost": traj.ctrl_cost.mean(),
            "action_rms": jnp.sqrt(traj.mean_sq.mean()),
            "finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])),
        }
        state = {**state, "params": params, "opt": opt_state, "obs_stats": obs_stats, "env": env, "steps": steps,
                 "key": jax.random.key_data(key)}
        state = {**state, "cbp": cbp} if "cbp" in state else state
        return ({**state, "spectral_v": vectors} if "spectral_v" in state else state), metrics

    def train(state, hp, seed, count):
        with jax.default_matmul_precision(PRECISE):
            shapes = jax.eval_shape(update, state, hp, seed)[1]
            skip = lambda s: (s, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), shapes))
            body = lambda s, i: jax.lax.cond(i < count, lambda s: update(s, hp, seed), skip, s)
            return jax.lax.scan(body, state, jnp.arange(args.updates_per_chunk))

    def spectrum(state, seed, phase, which):
        """SLQ spectrum of the PPO loss (task loss only: no L2, ER or spectral term) at the member's parameters,
        on a fresh rollout of num_steps samples at phase `phase`'s friction from a copy of the envs (training
        is untouched). `which` (0 init, 1 end) only picks the probe key."""
        _, _, _, friction_key, hessian_key, _ = member_keys(seed)
        k_roll, k_slq = jax.random.split(jax.random.fold_in(jax.random.fold_in(hessian_key, phase), which))
        friction = phase_friction(friction_key, phase, phase_frictions(args), args.friction_range)
        with jax.default_matmul_precision(PRECISE):
            _, traj, last_obs = rollout(args, state["params"], state["env"], state["obs_stats"], state["steps"],
                                        k_roll, lambda s: friction)
            batch = make_batch(args, state["params"], traj, last_obs)
            return hessian.slq(lambda p: ppo_loss(p, batch, args)[0], state["params"], k_slq, args.hessian_iters,
                               args.hessian_probes)

    return init, train, spectrum


def cbp_step(agent, opt, params, opt_state, cbp, hiddens, key):
    """Continual backprop on the actor and critic hidden layers after an optimizer step (Dohare et al.):
    select low-utility mature units from `hiddens`, re-initialize them (outgoing weights 0) and zero their Adam
    moments; cbp_variant paper: the authors' selection and re-initialization (module docstring), moments zeroed
    too (the scalar step count is shared by all parameters, so it is kept)."""
    max_replace = common.cbp_max_replace(agent["replacement_rate"], params["actor"]["hidden"]["w"].shape[1])
    params = {net: dict(p) for net, p in params.items()}
    keep = jax.tree.map(jnp.ones_like, params)
    new_cbp, paper = [], agent["cbp_variant"] == "paper"
    hp = dict(replacement_rate=agent["replacement_rate"], decay_rate=agent["decay_rate"],
              maturity_threshold=agent["maturity_threshold"], max_replace=max_replace)
    for net, h, state, k in zip(("actor", "critic"), hiddens, cbp, jax.random.split(key, 2)):
        p = params[net]
        if paper:  # the authors' CBP: highest utility, outgoing weights re-randomized
            state, idx, valid = common.cbp_select_paper(state, h, p["out"]["w"], **hp)
        else:
            state, idx, valid = common.cbp_select(state, h, p["out"]["w"], w_in=p["hidden"]["w"],
                                                  utility=agent["cbp_utility"], **hp)
        w_in, b_in, w_out, keep_in, keep_b, keep_out = (common.cbp_replace_paper if paper else common.cbp_replace)(
            k, p["hidden"]["w"], p["hidden"]["b"], p["out"]["w"], idx, valid)
        p["hidden"] = {"w": w_in, "b": b_in}
        p["out"] = {"w": w_out, "b": p["out"]["b"]}
        keep[net]["hidden"] = {"w": keep_in, "b": keep_b}
        keep[net]["out"]["w"] = keep_out
        new_cbp.append(state)
    return params, common.mask_opt_state(opt, opt_state, keep), tuple(new_cbp)


def redo_step(agent, params, hiddens, key, due):
    """ReDo (Sokar et al. 2023) as Dohare et al.'s Ant runs (their GnTredo) when `due`: the actor's and the critic's
    hidden units dormant on `hiddens`, the minibatch's post-ReLU activations before the Adam step (score mean|h_i|
    / layer mean <= redo_tau), get fresh incoming weights U(+-sqrt(6 / fan_in)) (their bound), bias 0 and outgoing
    weights 0 (the policy and the value are unchanged); the Adam moments are kept, as theirs; the output layers and
    log_std never change."""
    params = {net: dict(p) for net, p in params.items()}
    for net, h, k in zip(("actor", "critic"), hiddens, jax.random.split(key, 2)):
        p = params[net]
        dormant = common.dormant_units(h, agent["redo_tau"]) & due
        w_in, b_in, w_out, *_ = common.cbp_replace(
            k, p["hidden"]["w"], p["hidden"]["b"], p["out"]["w"], jnp.arange(dormant.shape[0]), dormant)
        p["hidden"] = {**p["hidden"], "w": w_in, "b": b_in}
        p["out"] = {**p["out"], "w": w_out}
    return params


def er_step(params, obs, er_lr):
    """One ER ascent step (App. D) as the authors' Ant runs: the objective is the actor's effective rank plus the
    critic's (their sum of the two networks' per-layer means; one hidden layer each), not their mean."""
    return common.er_ascent(params, hidden_features, obs, er_lr, reduce=jnp.sum)[0]


# ----------------------------------------------------------------------------------------------------------
# Settings (no need to modify to fork)
# ----------------------------------------------------------------------------------------------------------
def resolve(args):
    """The agent's hyperparameters (its AGENTS entry overridden by the flags given) and the configs to sweep;
    stops with one line on a setting that would silently give wrong science."""
    agent = runner.agent_settings(args, AGENTS)
    num_params = (2 * (OBS_DIM * args.hidden_size + args.hidden_size) + args.hidden_size * (ACT_DIM + 1) + 2 * ACT_DIM
                  + 1 + 4 * args.hidden_size * bool(agent.get("layer_norm")))
    checks = [
        (args.seeds >= 1, "--seeds must be >= 1"),
        (args.num_envs >= 1 and args.num_steps % args.num_envs == 0,
         f"--num-steps ({args.num_steps}) must be a multiple of --num-envs ({args.num_envs})"),
        (args.num_minibatches >= 1 and args.num_steps % args.num_minibatches == 0,
         f"--num-steps ({args.num_steps}) must be a multiple of --num-minibatches ({args.num_minibatches})"),
        (args.num_steps // max(args.num_minibatches, 1) >= 2, "minibatches need at least 2 samples"),
        (args.update_epochs >= 1, "--update-epochs must be >= 1"),
        (args.hidden_size >= 1, "--hidden-size must be >= 1"),
        (args.num_steps <= args.total_steps < 2**31,
         f"--total-steps must cover one update ({args.num_steps} samples) and stay below 2^31"),
        (args.change_every >= 1 and args.change_every % args.num_envs == 0,
         f"--change-every ({args.change_every}) must be a positive multiple of --num-envs ({args.num_envs})"),
        (0 < args.friction_range[0] <= args.friction_range[1], "--friction-range needs 0 < low <= high"),
        (args.fixed_friction is None or args.fixed_friction > 0, "--fixed-friction must be > 0"),
        (len(args.frictions) >= 1 and all(f > 0 for f in args.frictions), "--frictions must be > 0"),
        (not (args.random_frictions and args.fixed_friction is not None),
         "--random-frictions and --fixed-friction exclude each other"),
        (args.solver_iterations >= 1 and args.ls_iterations >= 1,
         "--solver-iterations and --ls-iterations must be >= 1"),
        (args.episode_length >= 1, "--episode-length must be >= 1"),
        *[(args.physics == "mjx" or getattr(args, name) == getattr(Args, name),
           f"--{name.replace('_', '-')} applies only to --physics mjx") for name in MJX_ONLY],
        (args.updates_per_chunk >= 1, "--updates-per-chunk must be >= 1"),
        (args.hessian_probes >= 1 and args.hessian_iters >= 1, "--hessian-iters and --hessian-probes must be >= 1"),
        (not args.hessian_every_phase or args.hessian_iters <= num_params,
         f"--hessian-iters ({args.hessian_iters}) exceeds the number of parameters ({num_params})"),
        (0 <= agent.get("replacement_rate", 0) <= 1,
         f"--replacement-rate must be in [0, 1], got {agent.get('replacement_rate')}"),
        (0 <= agent.get("decay_rate", 0) < 1, "--decay-rate must be in [0, 1)"),
        (agent.get("maturity_threshold", 0) >= 0, "--maturity-threshold must be >= 0"),
        (agent.get("cbp_utility", common.CBP_UTILITIES[0]) in common.CBP_UTILITIES,
         f"--cbp-utility must be one of {', '.join(common.CBP_UTILITIES)}, got {agent.get('cbp_utility')!r}"),
        (agent.get("cbp_variant") != "paper" or args.cbp_utility is None,
         "--cbp-utility does not apply to --cbp-variant paper (the authors' utility: |mean h| x mean|w_out|)"),
        (agent.get("spectral_lambda", 0) >= 0 and agent.get("power_iters", 1) >= 1,
         "--spectral-lambda must be >= 0 and --power-iters >= 1"),
        (agent.get("redo_tau", 0) >= 0 and agent.get("redo_every", 1) >= 1,
         "--redo-tau must be >= 0 and --redo-every >= 1"),
        (0 <= agent["beta1"] < 1 and 0 <= agent["beta2"] < 1,
         f"--beta1 and --beta2 must be in [0, 1), got {agent['beta1']}, {agent['beta2']}"),
        (args.checkpoint_minutes >= 0, "--checkpoint-minutes must be >= 0"),
    ]
    return agent, runner.agent_configs(agent, checks, SWEPT, args.lr)


# Args that do not shape the compiled programs (seeds and swept values are their inputs).
RUN_ONLY = ("agent", "seed", "seeds", "lr", "weight_decay", "er_lr", "total_steps", "out_dir", "resume",
            "checkpoint_minutes", "member_batching", "hessian_every_phase")


def programs(args, agent, batching):
    """make_train's functions, run over the members and jitted. Made once per program in a process (tracing
    and compiling MJX take tens of seconds): runs that differ only in RUN_ONLY flags or in swept values share
    them (the tests, bench.py)."""
    shaping = replace(args, **{name: getattr(Args, name) for name in RUN_ONLY})
    return _programs(shaping, tuple((k, None if k in SWEPT else v) for k, v in agent.items()), batching)


@lru_cache(maxsize=None)
def _programs(args, agent, batching):
    init, train, spectrum = make_train(args, dict(agent))
    run = lambda fn, in_axes: over_members(fn, batching, in_axes, args.fast_compile)
    return run(init, (0,)), run(train, (0, 0, 0, None)), run(spectrum, (0, 0, None, None))


def over_members(fn, batching, in_axes, fast_compile):
    """runner.over_members with --fast-compile's compiler options, and "map" one member at a time: each
    member's call finishes before the next starts (member programs running at once on a CPU can stall XLA's
    thread pool, as concurrent LAPACK solves can: see common.effective_ranks)."""
    jit = partial(jax.jit, compiler_options=FAST_COMPILE if fast_compile else None)
    if batching == "vmap" or runner.spread():
        return runner.over_members(fn, batching, in_axes, jit)
    single = jit(fn)

    def run(*args):
        args = [jax.device_get(a) if axis == 0 else a for a, axis in zip(args, in_axes)]
        member = lambda m: [jax.tree.map(lambda x: x[m], a) if axis == 0 else a for a, axis in zip(args, in_axes)]
        size = next(jax.tree.leaves(a)[0].shape[0] for a, axis in zip(args, in_axes) if axis == 0)
        outs = [jax.device_get(single(*member(m))) for m in range(size)]
        return jax.tree.map(lambda *xs: np.stack(xs), *outs)

    return run


def phase_starts(args, num_updates):
    """{update: phase} at the first update of each friction phase after the first (of phases shorter than one
    update, the first that starts there)."""
    starts, k = {}, 1
    while (u := -(-k * args.change_every // args.num_steps)) < num_updates:
        starts.setdefault(u, k)
        k += 1
    return starts


def measured_phases(args, num_updates):
    """[(first update, phase)] of the phases whose spectra are measured (all, with --hessian-every-phase)."""
    return [(0, 0)] + sorted(phase_starts(args, num_updates).items()) if args.hessian_every_phase else []


def chunks(args, num_updates, start):
    """(first, last) update of each jitted call from `start` on: calls end every updates_per_chunk updates,
    at the first update of each friction phase, and at `start` (a longer --total-steps may move the edges off
    a resumed run's cursor)."""
    edges = set(range(0, num_updates, args.updates_per_chunk)) | set(phase_starts(args, num_updates))
    edges = sorted(edges | {start, num_updates})
    return [(first, last) for first, last in zip(edges[:-1], edges[1:]) if first >= start]


def measure_spectra(run, spectrum, state, seeds, measured, update, num_updates):
    """The spectra due before update `update` (App. G.4, per friction phase): where a measured phase starts,
    the previous phase's "end" and its own "init"; after the run's last update, the last phase's "end"."""
    starts = [first for first, _ in measured]
    k = starts.index(update) if update in starts else len(measured) if measured and update == num_updates else None
    if k is not None and k > 0:
        run.spectra["end_nodes"][:, k - 1], run.spectra["end_weights"][:, k - 1] = run.members.host(spectrum(
            state, seeds, jnp.int32(measured[k - 1][1]), jnp.int32(1)))
    if k is not None and k < len(measured):
        run.spectra["init_nodes"][:, k], run.spectra["init_weights"][:, k] = run.members.host(spectrum(
            state, seeds, jnp.int32(measured[k][1]), jnp.int32(0)))


def check_resume(args, num_updates):
    """A resumed run may run longer, not shorter (runner.Run grows its metric arrays, it cannot cut them)."""
    checkpoint = runner.load_checkpoint(args.out_dir) if args.resume and args.out_dir else None
    done = checkpoint.get("cursor", {}).get("unit", 0) if isinstance(checkpoint, dict) else 0
    if done > num_updates:
        runner.fail(f"--resume: the run already has {done} updates, more than {num_updates}")


def restore(run, state, measured, num_updates):
    """The checkpoint's state. It holds the leaves only: the env state's classes would pickle under this file's
    module name, which differs between `python ant_ppo.py` and an import. A run resumed to run longer
    measures its last phase's "end" spectrum again, at the phase's new end."""
    start = run.cursor["unit"]
    k = sum(first < start for first, _ in measured) - 1
    if k >= 0 and start < num_updates:
        run.spectra["end_nodes"][:, k], run.spectra["end_weights"][:, k] = np.nan, np.nan
    return jax.tree.unflatten(jax.tree.structure(state), run.state)


def friction_table(args, seeds, num_phases):
    """[members, phases] numpy array: each member's friction in each phase."""
    frictions = phase_frictions(args)
    if frictions is not None:  # the same list for every member
        row = [np.float32(frictions[p % len(frictions)]) for p in range(num_phases)]
        return np.tile(np.asarray(row, np.float32), (len(seeds), 1))
    keys = jax.vmap(lambda s: member_keys(s)[3])(jnp.asarray(seeds))
    per_phase = lambda k: jax.vmap(lambda p: phase_friction(k, p, None, args.friction_range))(jnp.arange(num_phases))
    return np.asarray(jax.vmap(per_phase)(keys))


def save(run, args, measured, schedule):
    """metrics.npz: the Run's arrays [configs, seeds, updates done, ...] and `diverged`, with `env_steps`,
    `friction_schedule` [configs, seeds, phases] and `layer_names`; hessian.npz: the phases measured so far."""
    done, grid = run.cursor["unit"], run.members.grid_shaped
    runner.save_npz(run.dir / "metrics.npz", diverged=run.diverged, layer_names=np.asarray(LAYER_NAMES),
                    env_steps=args.num_steps * np.arange(1, done + 1), friction_schedule=grid(schedule),
                    **{k: grid(v[:, :done]) for k, v in run.metrics.items()})
    phases = [phase for first, phase in measured if first < done]
    if phases:
        runner.save_npz(run.dir / "hessian.npz", tasks=np.asarray(phases),
                        **{k: grid(v[:, :len(phases)]) for k, v in run.spectra.items()})


def describe(args, agent, members, num_updates, schedule, run_dir):
    shown = lambda row: ", ".join(f"{f:.4g}" for f in row)
    lines = [f"{runner.script_name(args)} {args.agent} on {args.physics}: {members}; {num_updates} updates of "
             f"{args.num_steps} samples "
             f"({args.num_envs} envs x {args.num_steps // args.num_envs} steps); Adam betas {agent['beta1']} / "
             f"{agent['beta2']}; steps/s below counts the env steps of all members; out {run_dir}"]
    if (schedule == schedule[0]).all():
        lines.append(f"friction schedule (every seed), one value per {args.change_every:,} env steps: "
                     f"{shown(schedule[0])}")
    else:
        lines += [f"friction schedule of seed {seed}, one value per {args.change_every:,} env steps: "
                  f"{shown(schedule[i])}" for i, seed in enumerate(members.seed_list)]
    return "\n".join(lines)


def nanmean(x, axis=None):
    """Mean over the finite entries; NaN (without a warning) where there are none."""
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    count = finite.sum(axis=axis)
    total = np.where(finite, x, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def final_returns(run, num_updates):
    returns = run.members.grid_shaped(run.metrics["episodic_return"][:, :run.cursor["unit"]])
    tail = returns[:, :, -max(1, num_updates // 20):]
    final = nanmean(tail, axis=2)  # [C, S]; NaN where no episode ended in the tail
    return "\n".join(f"final episodic return (mean of the last {tail.shape[2]} updates) {config}: mean over seeds "
                     f"{float(nanmean(final[c])):.1f}, per seed {np.round(final[c], 1).tolist()}"
                     for c, config in enumerate(run.members.configs))


def speed_line(args, timer, members):
    """Throughput of the timed calls (all but the first chunk, which compiles)."""
    if not timer.steps:
        return "speed: not measured (only one chunk ran in this process; the first compiles)"
    rate = timer.steps / timer.seconds
    return (f"speed: {rate:,.0f} env-steps/s over {members} members ({rate / members:,.0f} per member): "
            f"{args.total_steps:,} env steps of each take {args.total_steps * members / rate / 3600:.2f} h")


METRICS = {"episodic_return": ((), np.float32), "episodes": ((), np.int32), "friction": ((), np.float32),
           "loss": ((), np.float32), "dead_units": ((2,), np.int32), "effective_rank": ((2,), np.float32),
           "param_norm": ((), np.float32), "step_reward": ((), np.float32), "ctrl_cost": ((), np.float32),
           "action_rms": ((), np.float32)}


def spectra_shapes(args):
    shape = ((args.hessian_probes, args.hessian_iters), np.float32)
    return {f"{phase}_{part}": shape for phase in ("init", "end") for part in ("nodes", "weights")}


# ----------------------------------------------------------------------------------------------------------
# Driver: init or resume, then for each chunk of updates: spectra at phase changes, train, record, checkpoint
# ----------------------------------------------------------------------------------------------------------
def main(args):
    runner.init_processes(args)
    runner.check_agent(args, AGENTS, SWEPT)
    agent, configs = resolve(args)
    members = runner.Members(configs, [args.seed + i for i in range(args.seeds)], args.member_batching)
    init, train, spectrum = programs(args, agent, members.batching)
    num_updates = args.total_steps // args.num_steps
    measured = measured_phases(args, num_updates)
    check_resume(args, num_updates)
    run = runner.Run("ant_ppo", args, RESUME_FREE, members, num_updates, METRICS, spectra_shapes(args), len(measured))
    state = init(members.seeds)
    state = state if run.state is None else restore(run, state, measured, num_updates)
    hp, seeds, state = runner.shard_members((members.hyperparameters(SWEPT), members.seeds, state))
    schedule = friction_table(args, members.seeds, (num_updates * args.num_steps - 1) // args.change_every + 1)
    start = run.cursor["unit"]
    print(describe(args, agent, members, num_updates, schedule, run.dir), flush=True)
    stop, progress, timer = runner.StopRequests(), runner.Progress(num_updates, "update", start), runner.StepTimer()
    last_checkpoint = time.time()
    for first, last in chunks(args, num_updates, start):
        measure_spectra(run, spectrum, state, seeds, measured, first, num_updates)
        with timer.timing(first > start):  # the first chunk compiles
            state, metrics = train(state, hp, seeds, jnp.int32(last - first))
            metrics = members.host(metrics)  # [members, updates_per_chunk, ...]
        timer.steps += members.count * (last - first) * args.num_steps * (first > start)
        for i in range(last - first):
            run.record(first + i, {k: v[:, i] for k, v in metrics.items()}, f"update {first + i + 1}")
        progress.update(last, members.count * (last - first) * args.num_steps,
                        phase=(last * args.num_steps - 1) // args.change_every,
                        episodic_return=runner.finite_mean(run.metrics["episodic_return"][:, first:last]),
                        friction=float(run.metrics["friction"][0, last - 1]))
        if last == num_updates:
            measure_spectra(run, spectrum, state, seeds, measured, last, num_updates)
        save(run, args, measured, schedule)
        if stop.due(last_checkpoint, args.checkpoint_minutes) or last == num_updates:
            run.checkpoint(jax.tree.leaves(state))  # leaves only: see restore
            last_checkpoint = time.time()
            if stop.requested and last < num_updates:
                stop.exit(f"update {last}/{num_updates}", runner.resume_command(args, run.dir))
    stop.close()
    print(speed_line(args, timer, members.count), flush=True)
    print(final_returns(run, num_updates), flush=True)
    return run.dir


if __name__ == "__main__":
    with runner.quiet_on_closed_pipe():
        main(runner.cli(Args, AGENTS))
