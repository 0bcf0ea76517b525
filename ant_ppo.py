"""Slippery Ant (paper App. J; Dohare et al. 2024): PPO on MuJoCo MJX while the ground friction changes.

Brax's `ant` (torso sphere, four two-segment legs, 8 hinge motors, only the four foot spheres touching the
floor; crouched start) runs in MJX with the Newton solver (10 iterations, 20 line-search iterations: fewer
leave low friction barely slippery), timestep 0.01 s and 5 physics steps per env step. Every `--change-every`
env steps the sliding friction of every geom jumps to the next value of the schedule: by default the authors'
five frictions 0.2961, 0.2399, 0.0387, 0.3528, 0.0829, the same for every seed (MJX gives a contact the
larger of its two geoms' frictions, so setting only the floor would change nothing). As in the authors' runs,
observations are raw, the control cost is on the unclipped action and a time-out ends the episode without
bootstrapping. PPO (Table 8) trains a separate actor (Gaussian, state-independent log-std) and critic, each
with one ReLU hidden layer, continually, never reset. Agents (Table 7 best values; Adam betas as the authors
ran each agent): bp, l2 (coupled weight decay), er (effective-rank ascent on the actor and critic hidden
layers, once per epoch on the rollout's observations), l2-er, cbp (continual backprop with L2, as the paper).

Seeds (and swept configs) train together under one vmap, PureJaxRL style: one update = rollout + GAE + 10
epochs of minibatch Adam, and a chunk of updates is one `lax.scan` inside one `jax.jit`.

    python ant_ppo.py --agent l2-er --seeds 5 --num-envs 1   # 10M env steps per seed, 5 friction phases
"""
import os

# Before jax loads LAPACK (scipy's OpenBLAS): OpenBLAS's own threads, on top of XLA's, made the CPU's batched
# eigen/SVD solvers of the rank metrics crawl or stall on a 2-core machine. No effect on GPU runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib  # noqa: E402 (after the environment is set)
import io
import math
import time
from dataclasses import asdict, dataclass
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

AGENTS = ("bp", "l2", "er", "l2-er", "cbp")
# Table 7 best values (fixed learning rate 1e-4 everywhere). The paper gives no best weight decay for CBP+L2
# ("-"); we use 1e-3, the best weight decay of L2 and L2-ER on the same grid.
# Adam betas as the authors' Slippery Ant runs used them: 0.9 / 0.999 (Table 8) for BP only; 0.99 / 0.99 for
# L2, ER, L2-ER and CBP+L2 (the betas of all of Dohare et al.'s Slippery Ant agents, who report that equal
# betas by themselves reduce PPO's loss of plasticity).
AGENT_DEFAULTS = {
    "bp": dict(lr=1e-4, weight_decay=0.0, er_lr=0.0, replacement_rate=0.0, beta1=0.9, beta2=0.999),
    "l2": dict(lr=1e-4, weight_decay=1e-3, er_lr=0.0, replacement_rate=0.0, beta1=0.99, beta2=0.99),
    "er": dict(lr=1e-4, weight_decay=0.0, er_lr=1e-7, replacement_rate=0.0, beta1=0.99, beta2=0.99),
    "l2-er": dict(lr=1e-4, weight_decay=1e-3, er_lr=1e-6, replacement_rate=0.0, beta1=0.99, beta2=0.99),
    "cbp": dict(lr=1e-4, weight_decay=1e-3, er_lr=0.0, replacement_rate=1e-7, beta1=0.99, beta2=0.99),
}
# The frictions of the runs behind the paper's Slippery Ant figure (the authors' code: row 0 of their
# log-uniform [0.02, 2] table, used for every seed), one per 2M-step phase.
AUTHORS_FRICTIONS = (0.2961, 0.2399, 0.0387, 0.3528, 0.0829)
ER_AGENTS = ("er", "l2-er")
# Flags a resumed run may change (--total-steps to run longer); all others must match the checkpoint.
RESUME_FREE = ("total_steps", "resume", "out_dir", "checkpoint_minutes")
LAYER_NAMES = ("actor_hidden", "critic_hidden")


@dataclass
class Args:
    agent: Literal["bp", "l2", "er", "l2-er", "cbp"] = "bp"
    """algorithm: bp, l2, er, l2-er, cbp (CBP with L2, as the paper); defaults are Table 7's best values"""
    seed: int = 0
    """base seed; seeds seed .. seed+seeds-1 train together. A seed fixes the init, the env noise and the
    friction schedule"""
    seeds: int = 1
    """number of seeds trained together (the paper: 5)"""
    lr: tuple[float, ...] | None = None
    """Adam learning rate(s) (default: the agent's, 1e-4); several values are swept together"""
    weight_decay: tuple[float, ...] | None = None
    """coupled L2 weight decay(s) added to the gradient (default: the agent's; 0 for bp and er)"""
    er_lr: tuple[float, ...] | None = None
    """effective-rank ascent step size(s) (er: 1e-7, l2-er: 1e-6); only for er and l2-er"""
    replacement_rate: float | None = None
    """CBP units replaced per optimizer step, as a fraction of the mature units (default 1e-7); only for cbp"""
    decay_rate: float = 0.99
    """CBP running-average decay of the utility (Table 8)"""
    cbp_utility: str = "contribution"
    """CBP utility (Dohare et al.): "contribution" or "adaptable_contribution"; default as Dohare's config for
    this benchmark (Slippery Ant: contribution)"""
    maturity_threshold: int = 10_000
    """CBP: optimizer steps a unit must survive before it can be replaced (Table 8)"""
    beta1: float | None = None
    """Adam beta_1 (default: per agent, as the authors' Slippery Ant runs: 0.9 for bp (Table 8); 0.99 for l2,
    er, l2-er and cbp, the value of all of Dohare et al.'s Slippery Ant agents, who report that equal betas
    alone reduce PPO's loss of plasticity; so bp --beta1 0.99 --beta2 0.99 is the control for the betas)"""
    beta2: float | None = None
    """Adam beta_2 (default: per agent, as the authors' runs: 0.999 for bp (Table 8), 0.99 for the others)"""
    adam_eps: float = 1e-5
    """Adam epsilon (not in the paper; 1e-5 as in PureJaxRL's PPO)"""
    total_steps: int = 10_000_000
    """env steps per seed; rounded down to whole updates of --num-steps samples"""
    num_envs: int = 64
    """parallel environments per seed; each rolls out num-steps / num-envs steps per update. The paper and the
    authors' runs use 1 (2048-step rollouts: use --num-envs 1 for a run that claims to reproduce the figure);
    64 envs x 32 steps is a speed choice (64x fewer sequential physics steps; a GPU is nearly idle with one
    env) that keeps 2048 samples per update but changes what each update sees"""
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
    updates_per_chunk: int = 100
    """updates per jitted lax.scan call (one progress line each); chunks also end at friction changes"""
    fast_compile: bool = False
    """compile without XLA's backend optimizations: about half the compile time but much slower steps (only
    for tiny runs: the tests, quick CPU checks)"""
    checkpoint_minutes: float = 5.0
    """write checkpoint.pkl after the first chunk that ends this many minutes after the last one"""
    out_dir: str | None = None
    """run directory (default: runs/ant_ppo__<agent>__<UTC stamp>/)"""
    resume: bool = False
    """continue the run in --out-dir from its checkpoint.pkl (--total-steps may be raised)"""


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
    with jax.ensure_compile_time_eval():  # concrete arrays even when first called inside a jit trace
        return mj_model, mjx.put_model(mj_model)


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
# Actor-critic (App. J.1): separate networks, one ReLU hidden layer each; Gaussian policy with a
# state-independent log standard deviation. Zero biases.
# ----------------------------------------------------------------------------------------------------------
def init_params(key, hidden):
    """Kaiming-uniform layers, except the actor's output weights, scaled by 0.01 so the first policy is
    centred on zero action (as PureJaxRL's PPO, whose head is initialized at scale 0.01): a plain Kaiming
    head puts most initial action means beyond the [-1, 1] motor range."""
    k = jax.random.split(key, 4)
    actor_out = common.dense_init(k[1], hidden, ACT_DIM)
    return {"actor": {"hidden": common.dense_init(k[0], OBS_DIM, hidden),
                      "out": {"w": 0.01 * actor_out["w"], "b": actor_out["b"]},
                      "log_std": jnp.zeros(ACT_DIM, jnp.float32)},
            "critic": {"hidden": common.dense_init(k[2], OBS_DIM, hidden),
                       "out": common.dense_init(k[3], hidden, 1)}}


def dense(layer, x):
    return x @ layer["w"] + layer["b"]


def actor_apply(actor, obs):
    """-> (action mean, log std, hidden activations)."""
    h = jax.nn.relu(dense(actor["hidden"], obs))
    return dense(actor["out"], h), actor["log_std"], h


def critic_apply(critic, obs):
    """-> (value, hidden activations)."""
    h = jax.nn.relu(dense(critic["hidden"], obs))
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
    advantage: jax.Array
    target: jax.Array     # value target (advantage + value)


def ppo_loss(params, batch, static):
    """Clipped PPO objective + value loss - entropy bonus (advantages normalized over the batch).
    Returns (loss, (actor hidden, critic hidden))."""
    mean, log_std, h_actor = actor_apply(params["actor"], batch.obs)
    ratio = jnp.exp(gaussian_log_prob(batch.action, mean, log_std) - batch.log_prob)
    adv = (batch.advantage - batch.advantage.mean()) / (batch.advantage.std() + 1e-8)
    policy_loss = -jnp.mean(jnp.minimum(ratio * adv,
                                        jnp.clip(ratio, 1 - static.clip_eps, 1 + static.clip_eps) * adv))
    value, h_critic = critic_apply(params["critic"], batch.obs)
    value_loss = 0.5 * jnp.mean(jnp.square(value - batch.target))
    entropy = jnp.sum(log_std + 0.5 * math.log(2 * math.pi * math.e))
    return policy_loss + static.vf_coef * value_loss - static.ent_coef * entropy, (h_actor, h_critic)


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
# One member (a config x seed pair): state, rollout, update, Hessian measurement
# ----------------------------------------------------------------------------------------------------------
class Static(NamedTuple):
    """Everything that shapes the compiled program (hashable)."""
    num_envs: int
    num_steps: int
    update_epochs: int
    num_minibatches: int
    hidden_size: int
    gamma: float
    gae_lambda: float
    clip_eps: float
    ent_coef: float
    vf_coef: float
    beta1: float
    beta2: float
    adam_eps: float
    normalize_obs: bool
    use_er: bool
    use_cbp: bool
    replacement_rate: float
    decay_rate: float
    maturity_threshold: int
    cbp_utility: str
    change_every: int
    frictions: tuple | None  # the phases' frictions, the same for every seed; None: log-uniform per seed
    friction_range: tuple
    env: EnvConfig
    bootstrap_timeouts: bool
    updates_per_chunk: int
    hessian_iters: int
    hessian_probes: int
    fast_compile: bool


class Hyper(NamedTuple):
    """Per-member hyperparameters (traced, so a sweep is one compiled program)."""
    lr: jax.Array
    weight_decay: jax.Array
    er_lr: jax.Array


class MemberState(NamedTuple):
    params: dict
    opt_state: tuple
    cbp: tuple             # (actor CBPState, critic CBPState) for cbp, else ()
    obs_stats: ObsStats
    env: EnvState          # batched over num_envs
    steps: jax.Array       # int32 env steps done (per seed)
    key: jax.Array         # training key (rollout noise, minibatch order, CBP init)
    friction_key: jax.Array
    hessian_key: jax.Array


class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array      # env reward (+ gamma * V(final obs) on time-outs with bootstrap_timeouts)
    done: jax.Array
    episode_return: jax.Array
    friction: jax.Array


def schedule(static, friction_key):
    """The slippery schedule: friction of the vector step that starts after `s` env steps of this seed."""
    return lambda s: phase_friction(friction_key, s // static.change_every, static.frictions, static.friction_range)


def optimizer(static, hyper):
    return common.adam(hyper.lr, static.beta1, static.beta2, static.adam_eps, hyper.weight_decay)


def init_member(static, seed):
    key = jax.random.key(seed)
    params = init_params(jax.random.fold_in(key, 0), static.hidden_size)
    opt_state = common.adam(1.0, static.beta1, static.beta2, static.adam_eps, 0.0).init(params)
    cbp = (common.cbp_init(static.hidden_size), common.cbp_init(static.hidden_size)) if static.use_cbp else ()
    env = jax.vmap(partial(env_reset, static.env))(jax.random.split(jax.random.fold_in(key, 1), static.num_envs))
    return MemberState(params, opt_state, cbp, obs_stats_init(), env, jnp.zeros((), jnp.int32),
                       jax.random.fold_in(key, 2), jax.random.fold_in(key, 3), jax.random.fold_in(key, 4))


def training_reward(static, critic, obs_stats, info):
    """The reward PPO learns from: the env's, where a time-out is terminal (the authors' runs: Brax's episode
    wrapper sets done at the time-out and their GAE does not bootstrap through done); with
    `bootstrap_timeouts`, + gamma * V(final obs) at time-outs (the episode still ends there)."""
    if not static.bootstrap_timeouts:
        return info.reward
    final_obs = normalize(obs_stats, info.final_obs) if static.normalize_obs else info.final_obs
    return info.reward + static.gamma * critic_apply(critic, final_obs)[0] * info.truncated


def rollout(static, params, env, obs_stats, steps, key, friction_of_step):
    """num_steps / num_envs vector steps of all envs under the current policy. `friction_of_step(s)` gives
    the friction of a vector step that starts after s env steps. Returns ((env, obs_stats, steps), Transition
    [T, envs], normalized obs after the last step)."""
    step_fn = jax.vmap(partial(env_step, static.env), in_axes=(0, 0, None, 0))

    def one(carry, key_t):
        env, obs_stats, steps = carry
        obs = jax.vmap(observe)(env)
        if static.normalize_obs:
            obs_stats = obs_stats_update(obs_stats, obs)
            obs = normalize(obs_stats, obs)
        k_act, k_reset = jax.random.split(key_t)
        mean, log_std, _ = actor_apply(params["actor"], obs)
        action = mean + jnp.exp(log_std) * jax.random.normal(k_act, mean.shape)
        value, _ = critic_apply(params["critic"], obs)
        friction = friction_of_step(steps)
        env, info = step_fn(env, action, friction, jax.random.split(k_reset, static.num_envs))
        reward = training_reward(static, params["critic"], obs_stats, info)
        transition = Transition(obs, action, gaussian_log_prob(action, mean, log_std), value, reward,
                                info.terminated | info.truncated, info.episode_return,
                                jnp.full(static.num_envs, friction))
        return (env, obs_stats, steps + static.num_envs), transition

    length = static.num_steps // static.num_envs
    (env, obs_stats, steps), traj = jax.lax.scan(one, (env, obs_stats, steps), jax.random.split(key, length))
    last_obs = jax.vmap(observe)(env)
    last_obs = normalize(obs_stats, last_obs) if static.normalize_obs else last_obs
    return (env, obs_stats, steps), traj, last_obs


def make_batch(static, params, traj, last_obs):
    """Flatten a rollout into [num_steps] samples with GAE advantages and value targets."""
    last_value, _ = critic_apply(params["critic"], last_obs)
    advantages, targets = gae(traj.value, traj.reward, traj.done, last_value, static.gamma, static.gae_lambda)
    flat = lambda x: x.reshape((static.num_steps,) + x.shape[2:])
    return Batch(flat(traj.obs), flat(traj.action), flat(traj.log_prob), flat(advantages), flat(targets))


def cbp_step(static, opt, params, opt_state, cbp, hiddens, key):
    """Continual backprop on the actor and critic hidden layers after an optimizer step (Dohare et al.):
    select low-utility mature units from this minibatch's activations, re-initialize them (outgoing weights
    0) and zero their Adam moments."""
    max_replace = common.cbp_max_replace(static.replacement_rate, static.hidden_size)
    params = {net: dict(p) for net, p in params.items()}
    keep = jax.tree.map(jnp.ones_like, params)
    new_cbp = []
    for net, h, state, k in zip(("actor", "critic"), hiddens, cbp, jax.random.split(key, 2)):
        p = params[net]
        state, idx, valid = common.cbp_select(state, h, p["out"]["w"], w_in=p["hidden"]["w"],
                                              utility=static.cbp_utility, replacement_rate=static.replacement_rate,
                                              decay_rate=static.decay_rate,
                                              maturity_threshold=static.maturity_threshold,
                                              max_replace=max_replace)
        w_in, b_in, w_out, keep_in, keep_b, keep_out = common.cbp_replace(
            k, p["hidden"]["w"], p["hidden"]["b"], p["out"]["w"], idx, valid)
        p["hidden"] = {"w": w_in, "b": b_in}
        p["out"] = {"w": w_out, "b": p["out"]["b"]}
        keep[net]["hidden"] = {"w": keep_in, "b": keep_b}
        keep[net]["out"]["w"] = keep_out
        new_cbp.append(state)
    return params, common.mask_opt_state(opt, opt_state, keep), tuple(new_cbp)


def update(static, state, hyper):
    """One PPO update of one member: rollout, GAE, update_epochs x num_minibatches Adam steps (+ CBP after
    each, + one ER ascent step after each epoch). Returns (new state, metrics of this update)."""
    opt = optimizer(static, hyper)
    key, k_roll, k_epochs = jax.random.split(state.key, 3)
    (env, obs_stats, steps), traj, last_obs = rollout(static, state.params, state.env, state.obs_stats,
                                                      state.steps, k_roll, schedule(static, state.friction_key))
    batch = make_batch(static, state.params, traj, last_obs)
    mb_size = static.num_steps // static.num_minibatches

    def minibatch_step(carry, xs):
        params, opt_state, cbp = carry
        mb, k_cbp = xs
        (loss, hiddens), grads = jax.value_and_grad(lambda p: ppo_loss(p, mb, static), has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = jax.tree.map(jnp.add, params, updates)
        if static.use_cbp:
            params, opt_state, cbp = cbp_step(static, opt, params, opt_state, cbp, hiddens, k_cbp)
        return (params, opt_state, cbp), loss

    def epoch(carry, key_e):
        k_perm, k_cbp = jax.random.split(key_e)
        perm = jax.random.permutation(k_perm, static.num_steps)
        mbs = jax.tree.map(lambda x: x[perm].reshape((static.num_minibatches, mb_size) + x.shape[1:]), batch)
        carry, losses = jax.lax.scan(minibatch_step, carry, (mbs, jax.random.split(k_cbp, static.num_minibatches)))
        if static.use_er:
            carry = (common.er_ascent(carry[0], hidden_features, batch.obs, hyper.er_lr)[0],) + carry[1:]
        return carry, losses.mean()

    (params, opt_state, cbp), losses = jax.lax.scan(epoch, (state.params, state.opt_state, state.cbp),
                                                    jax.random.split(k_epochs, static.update_epochs))
    feats = hidden_features(params, batch.obs)
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
    }
    new_state = MemberState(params, opt_state, cbp, obs_stats, env, steps, key, state.friction_key,
                            state.hessian_key)
    return new_state, metrics


def hessian_member(static, state, phase, which):
    """SLQ spectrum of the PPO loss (task loss only: no L2 / ER term) at the member's current parameters, on
    a fresh rollout of num_steps samples at phase `phase`'s friction from a copy of the envs (training is
    untouched). `which` (0 init, 1 end) only picks the probe key."""
    key = jax.random.fold_in(jax.random.fold_in(state.hessian_key, phase), which)
    k_roll, k_slq = jax.random.split(key)
    friction = phase_friction(state.friction_key, phase, static.frictions, static.friction_range)
    _, traj, last_obs = rollout(static, state.params, state.env, state.obs_stats, state.steps, k_roll,
                                lambda s: friction)
    batch = make_batch(static, state.params, traj, last_obs)
    return hessian.slq(lambda p: ppo_loss(p, batch, static)[0], state.params, k_slq,
                       static.hessian_iters, static.hessian_probes)


@lru_cache(maxsize=None)
def build(static):
    """Jitted functions over all members (leading axis), compiled once per Static."""
    jit = partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0} if static.fast_compile else None)

    @jit
    def init(seeds):
        return jax.vmap(lambda s: init_member(static, s))(seeds)

    # jit-wrapped so that its trace is cached: eval_shape below and the cond reuse one trace.
    step = jax.jit(jax.vmap(lambda s, h: update(static, s, h)))

    @jit
    def run_chunk(states, hypers, num_updates):
        """updates_per_chunk updates of every member; those at index >= num_updates are skipped (so chunks
        cut at friction changes reuse the same program). Metrics of skipped updates are zeros."""
        metric_shapes = jax.eval_shape(step, states, hypers)[1]

        def body(states, i):
            skip = lambda s: (s, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes))
            return jax.lax.cond(i < num_updates, lambda s: step(s, hypers), skip, states)

        return jax.lax.scan(body, states, jnp.arange(static.updates_per_chunk))

    @jit
    def measure_hessian(states, phase, which):
        return jax.vmap(lambda s: hessian_member(static, s, phase, which))(states)

    return init, run_chunk, measure_hessian


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------
def resolve(args):
    """Validate the flags and fill in the agent defaults -> (configs, Static)."""
    common.check_agent(args.agent, AGENTS)
    defaults = AGENT_DEFAULTS[args.agent]
    if args.er_lr is not None and args.agent not in ER_AGENTS:
        common.fail(f"--er-lr applies to er and l2-er only, not {args.agent}")
    if args.replacement_rate is not None and args.agent != "cbp":
        common.fail(f"--replacement-rate applies to cbp only, not {args.agent}")
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
        (args.updates_per_chunk >= 1, "--updates-per-chunk must be >= 1"),
        (args.hessian_probes >= 1 and args.hessian_iters >= 1, "--hessian-iters and --hessian-probes must be >= 1"),
        (0 <= args.decay_rate < 1, "--decay-rate must be in [0, 1)"),
        (args.maturity_threshold >= 0, "--maturity-threshold must be >= 0"),
        (args.checkpoint_minutes >= 0, "--checkpoint-minutes must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            common.fail(message)
    num_params = 2 * (OBS_DIM * args.hidden_size + args.hidden_size) + args.hidden_size * (ACT_DIM + 1) + 2 * ACT_DIM + 1
    if args.hessian_every_phase and args.hessian_iters > num_params:
        common.fail(f"--hessian-iters ({args.hessian_iters}) exceeds the number of parameters ({num_params})")
    lrs = args.lr if args.lr is not None else (defaults["lr"],)
    wds = args.weight_decay if args.weight_decay is not None else (defaults["weight_decay"],)
    er_lrs = args.er_lr if args.er_lr is not None else (defaults["er_lr"],)
    rate = args.replacement_rate if args.replacement_rate is not None else defaults["replacement_rate"]
    if not 0 <= rate <= 1:
        common.fail(f"--replacement-rate must be in [0, 1], got {rate}")
    if args.cbp_utility not in common.CBP_UTILITIES:
        common.fail(f"--cbp-utility must be one of {', '.join(common.CBP_UTILITIES)}, got {args.cbp_utility!r}")
    beta1 = args.beta1 if args.beta1 is not None else defaults["beta1"]
    beta2 = args.beta2 if args.beta2 is not None else defaults["beta2"]
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        common.fail(f"--beta1 and --beta2 must be in [0, 1), got {beta1}, {beta2}")
    if args.fixed_friction is not None:
        frictions = (float(args.fixed_friction),)
    elif args.random_frictions:
        frictions = None
    else:
        frictions = tuple(float(f) for f in args.frictions)
    configs = common.sweep(lr=tuple(lrs), weight_decay=tuple(wds), er_lr=tuple(er_lrs))
    env = EnvConfig(solver_iterations=args.solver_iterations, ls_iterations=args.ls_iterations,
                    contacts=args.contacts, init_pose=args.init_pose, ctrl_cost_clipped=args.ctrl_cost_clipped,
                    fresh_resets=args.fresh_resets, episode_length=args.episode_length)
    static = Static(
        num_envs=args.num_envs, num_steps=args.num_steps, update_epochs=args.update_epochs,
        num_minibatches=args.num_minibatches, hidden_size=args.hidden_size, gamma=args.gamma,
        gae_lambda=args.gae_lambda, clip_eps=args.clip_eps, ent_coef=args.ent_coef, vf_coef=args.vf_coef,
        beta1=float(beta1), beta2=float(beta2), adam_eps=args.adam_eps, normalize_obs=args.normalize_obs,
        use_er=args.agent in ER_AGENTS, use_cbp=args.agent == "cbp", replacement_rate=float(rate),
        decay_rate=args.decay_rate, maturity_threshold=args.maturity_threshold, cbp_utility=args.cbp_utility,
        change_every=args.change_every, frictions=frictions, friction_range=tuple(args.friction_range), env=env,
        bootstrap_timeouts=args.bootstrap_timeouts, updates_per_chunk=args.updates_per_chunk,
        hessian_iters=args.hessian_iters, hessian_probes=args.hessian_probes, fast_compile=args.fast_compile)
    return configs, static


def friction_schedule(static, friction_keys, num_phases):
    """[members, num_phases] numpy array: each member's friction in each phase."""
    if static.frictions is not None:  # the same list for every member
        row = [np.float32(static.frictions[p % len(static.frictions)]) for p in range(num_phases)]
        return np.tile(np.asarray(row, np.float32), (len(friction_keys), 1))
    phases = jnp.arange(num_phases)
    table = jax.vmap(lambda k: jax.vmap(lambda p: phase_friction(k, p, static.frictions, static.friction_range))(
        phases))(friction_keys)
    return np.asarray(table)


def chunk_bounds(num_updates, static):
    """Chunk edges: every updates_per_chunk updates, and at the first update of each friction phase.
    Returns (edges, {update index: phase that starts there})."""
    phase_starts = {}
    k = 1
    while (u := -(-k * static.change_every // static.num_steps)) < num_updates:
        phase_starts.setdefault(u, k)  # phases shorter than one update: keep the first
        k += 1
    edges = sorted(set(range(0, num_updates, static.updates_per_chunk)) | set(phase_starts) | {num_updates})
    return edges, phase_starts


def nanmean(x, axis=None):
    """Mean over the finite entries; NaN (without a warning) where there are none."""
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    count = finite.sum(axis=axis)
    total = np.where(finite, x, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def main(args):
    configs, static = resolve(args)
    seeds = [args.seed + i for i in range(args.seeds)]
    num_c, num_s = len(configs), len(seeds)
    config_index, member_seeds = common.stack_members(configs, seeds)
    member_seeds = jnp.asarray(member_seeds, jnp.int32)
    hypers = Hyper(*(jnp.asarray([configs[c][k] for c in config_index], jnp.float32)
                     for k in ("lr", "weight_decay", "er_lr")))
    num_updates = args.total_steps // args.num_steps
    edges, phase_starts = chunk_bounds(num_updates, static)
    run_dir, checkpoint = common.open_run("ant_ppo", args, RESUME_FREE)
    to_cs = lambda x: np.asarray(x).reshape((num_c, num_s) + np.shape(x)[1:])  # member axis -> [C, S]

    # MJX Ant at friction 0.02-0.03 goes NaN on a GPU under the default (TF32) matmul precision.
    with jax.default_matmul_precision("highest"):
        init, run_chunk, measure_hessian = build(static)
        state_tree = jax.tree.structure(jax.eval_shape(init, member_seeds))
        if checkpoint is None:
            done, states = 0, init(member_seeds)
            history, diverged = {}, np.zeros((num_c, num_s), bool)
            spectra = {"tasks": [], "init": [], "end": []}  # per phase: (nodes, weights), each [C, S, P, I]
        else:
            done = checkpoint["update"]
            if done > num_updates:
                common.fail(f"--resume: the run already has {done} updates, more than {num_updates}")
            edges = sorted(set(edges) | {done})  # a longer --total-steps may move the chunk edges off it
            states = jax.tree.unflatten(state_tree, checkpoint["states"])
            history, diverged, spectra = checkpoint["history"], checkpoint["diverged"], checkpoint["spectra"]
            if len(spectra["end"]) == len(spectra["init"]) > 0 and done < num_updates:
                spectra["end"].pop()  # measured at the old run's end: the phase goes on now
        common.save_config(run_dir, args, configs, seeds)
        num_phases = (num_updates * args.num_steps - 1) // args.change_every + 1
        schedule_cs = to_cs(friction_schedule(static, states.friction_key, num_phases))  # [C, S, phases]
        states = common.shard_members(states)

        def spectrum(phase, which):
            return tuple(map(to_cs, measure_hessian(states, jnp.int32(phase), jnp.int32(which))))

        def save_outputs():
            arrays = {k: np.concatenate(v, axis=2) for k, v in history.items()}
            common.save_npz(run_dir / "metrics.npz", **arrays, diverged=diverged, layer_names=np.asarray(LAYER_NAMES),
                            env_steps=args.num_steps * np.arange(1, done + 1), friction_schedule=schedule_cs)
            if spectra["tasks"]:
                # The current phase's "end" is not measured until the phase ends: NaN until then.
                missing = [tuple(np.full_like(x, np.nan) for x in spectra["init"][0])]
                ends = spectra["end"] + missing * (len(spectra["init"]) - len(spectra["end"]))
                stack = lambda pairs, i: np.stack([p[i] for p in pairs], axis=2)  # [C, S, K, probes, iters]
                common.save_npz(run_dir / "hessian.npz", tasks=np.asarray(spectra["tasks"]),
                                init_nodes=stack(spectra["init"], 0), init_weights=stack(spectra["init"], 1),
                                end_nodes=stack(ends, 0), end_weights=stack(ends, 1))

        def save_checkpoint():
            common.save_checkpoint(run_dir, {"update": done, "states": jax.tree.leaves(states), "history": history,
                                             "spectra": spectra, "diverged": diverged, "args": asdict(args)})

        print(f"ant_ppo {args.agent}: {num_c} config(s) x {num_s} seed(s), {num_updates} updates of "
              f"{args.num_steps} samples ({args.num_envs} envs x {args.num_steps // args.num_envs} steps); "
              f"Adam betas {static.beta1} / {static.beta2}; steps/s below counts the env steps of all members; "
              f"run dir {run_dir}", flush=True)
        shown = lambda row: ", ".join(f"{f:.4g}" for f in row)
        if (schedule_cs == schedule_cs[0, 0]).all():
            print(f"friction schedule (every seed), one value per {args.change_every:,} env steps: "
                  f"{shown(schedule_cs[0, 0])}", flush=True)
        else:
            for i, seed in enumerate(seeds):
                print(f"friction schedule of seed {seed}, one value per {args.change_every:,} env steps: "
                      f"{shown(schedule_cs[0, i])}", flush=True)
        progress = common.Progress(num_updates, "update", start_units=done)
        last_checkpoint = time.perf_counter()
        for start, stop in zip(edges[:-1], edges[1:]):
            if stop <= done:
                continue
            if args.hessian_every_phase and (start == 0 or start in phase_starts):
                phase = phase_starts.get(start, 0)
                if start > 0:
                    spectra["end"].append(spectrum(spectra["tasks"][-1], 1))
                spectra["tasks"].append(phase)
                spectra["init"].append(spectrum(phase, 0))
            states, metrics = run_chunk(states, hypers, jnp.int32(stop - start))
            for k, v in metrics.items():  # [updates_per_chunk, members, ...] -> [C, S, updates, ...]
                history.setdefault(k, []).append(to_cs(np.moveaxis(np.asarray(v)[: stop - start], 0, 1)))
            done = stop
            finite = to_cs(np.stack([np.isfinite(np.asarray(x)).reshape(len(member_seeds), -1).all(1)
                                     for x in jax.tree.leaves(states.params)]).all(0))
            diverged = common.report_diverged(finite, configs, seeds, f"update {done}", known=diverged)
            progress.update(done, (stop - start) * args.num_steps * len(member_seeds),
                            phase=(done * args.num_steps - 1) // args.change_every,
                            episodic_return=float(nanmean(history["episodic_return"][-1])),
                            friction=float(history["friction"][-1][0, 0, -1]))
            if args.hessian_every_phase and done == num_updates:
                spectra["end"].append(spectrum(spectra["tasks"][-1], 1))
            save_outputs()
            if done == num_updates or time.perf_counter() - last_checkpoint >= 60 * args.checkpoint_minutes:
                save_checkpoint()
                last_checkpoint = time.perf_counter()

    returns = np.concatenate(history["episodic_return"], axis=2)
    tail = returns[:, :, -max(1, num_updates // 20):]
    final = nanmean(tail, axis=2)  # [C, S]; NaN where no episode ended in the tail
    for c, config in enumerate(configs):
        print(f"final episodic return (mean of the last {tail.shape[2]} updates) {config}: mean over seeds "
              f"{float(nanmean(final[c])):.1f}, per seed {np.round(final[c], 1).tolist()}", flush=True)
    return run_dir


if __name__ == "__main__":
    main(common.cli(Args))
