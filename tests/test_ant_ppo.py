"""Tests of ant_ppo.py: the Ant env (Brax's contact set, pose, control cost, resets, friction that acts as its
coefficient), the slippery friction schedule, per-agent Adam betas, GAE, time-outs, every agent end to end,
seeds/configs trained together, resume, interrupts and the Hessian measurement; LayerNorm, the spectral penalty
in the loss (log-std left out) and ReDo's recycling on their own.

MJX programs take tens of seconds to trace and compile on a CPU, and ant_ppo makes each program once per
process (`ant_ppo.programs`; with member batching "map", the default on a CPU, one program serves any number of
members), so the end-to-end runs use few distinct programs: the tiny shape of tests/test_equal_metrics.py
(4 envs x 16 steps per update, 2 updates, width 16; in one pytest process both files share its programs) and
one of 1-step episodes in chunks of 2 updates (SHORT), also vmapped.
"""
import contextlib
import io
import os
import signal
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import ant_ppo  # first: it sets OPENBLAS_NUM_THREADS before jax loads LAPACK
import mujoco
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import common
import runner
from ant_ppo import mjx

# As tests/test_equal_metrics.py's Ant runs, so that the two files share compiled programs.
TINY = dict(num_envs=4, num_steps=64, num_minibatches=4, update_epochs=2, hidden_size=16, total_steps=128,
            change_every=32, episode_length=8, updates_per_chunk=1, fast_compile=True)
CBP = dict(agent="cbp", weight_decay=(0.1,), replacement_rate=0.05, maturity_threshold=0, hessian_iters=4)
# 1-step episodes (every step starts from a reset, then times out: the physics stays short, see
# test_seed_alone_matches_seed_together), chunks of 2 updates, one friction phase; one member at a time.
SHORT = dict(agent="bp", episode_length=1, updates_per_chunk=2, change_every=640, member_batching="map")
METRICS = ("episodic_return", "episodes", "friction", "loss", "dead_units", "effective_rank", "param_norm",
           "step_reward", "ctrl_cost", "action_rms")
CFG = ant_ppo.EnvConfig()  # the env defaults (test_env_defaults_match_the_flags ties them to Args)
# Programs compile without XLA's backend optimizations here (as --fast-compile): half the compile time.
FAST_COMPILE = ant_ppo.FAST_COMPILE


def run(tmp_path, name, **overrides):
    out = tmp_path / name
    ant_ppo.main(ant_ppo.Args(**{**TINY, "out_dir": str(out), **overrides}))
    with np.load(out / "metrics.npz") as f:
        return out, {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------
EPISODE_LENGTH = CFG.episode_length
FLIPPED = (0.0, 0.0, 0.35, 0.0, 1.0, 0.0, 0.0) + ant_ppo.CROUCHED_QPOS[7:]  # upside down (180 deg about x)


@pytest.fixture(scope="module")
def step4():
    """env_step over a batch of 4 envs, each with its own friction (one compiled program for all env tests)."""
    return jax.jit(jax.vmap(lambda s, a, f, k: ant_ppo.env_step(CFG, s, a, f, k)), compiler_options=FAST_COMPILE)


def reset4(seed=0, cfg=CFG):
    return jax.vmap(lambda k: ant_ppo.env_reset(cfg, k))(jax.random.split(jax.random.key(seed), 4))


def test_env_defaults_match_the_flags():
    args = ant_ppo.Args()
    assert ant_ppo.env_config(args) == CFG == ant_ppo.EnvConfig(10, 20, "feet", "crouched", False, False, 1000)
    assert args.normalize_obs is False and args.bootstrap_timeouts is False
    assert (args.num_envs, args.num_steps, args.num_minibatches) == (1, 2048, 128)  # Table 8's rollout
    assert ant_ppo.phase_frictions(args) == ant_ppo.AUTHORS_FRICTIONS == (0.2961, 0.2399, 0.0387, 0.3528, 0.0829)
    assert ant_ppo.resolve(ant_ppo.Args(agent="cbp"))[0]["cbp_utility"] == "contribution"


def test_model_and_shapes(step4):
    mj_model, model = ant_ppo.env_model(CFG)
    assert (mj_model.nq, mj_model.nv, mj_model.nu) == (15, 14, 8) and ant_ppo.ACT_DIM == mj_model.nu
    assert mj_model.opt.solver == 2 and mj_model.opt.iterations == 10 and mj_model.opt.ls_iterations == 20
    assert mj_model.opt.timestep == 0.01 and ant_ppo.DT == pytest.approx(0.05)
    np.testing.assert_array_equal(mj_model.actuator_gear[:, 0], 150.0)
    state = reset4()
    obs = jax.vmap(ant_ppo.observe)(state)
    assert obs.shape == (4, ant_ppo.OBS_DIM) == (4, 27)
    np.testing.assert_allclose(obs[:, :13], state.qpos[:, 2:])  # x, y left out
    action = jnp.linspace(-2.0, 2.0, 32).reshape(4, 8)
    nxt, info = step4(state, action, jnp.ones(4), jax.random.split(jax.random.key(1), 4))
    assert nxt.qpos.shape == (4, 15) and info.final_obs.shape == (4, 27)
    # reward = forward velocity + 1 - 0.5 |a|^2 on the raw action (nothing terminates in one step from a reset)
    assert not np.any(info.terminated | info.truncated)
    velocity = (nxt.qpos[:, 0] - state.qpos[:, 0]) / ant_ppo.DT
    expected = velocity + 1.0 - 0.5 * jnp.sum(action ** 2, axis=1)
    np.testing.assert_allclose(info.reward, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nxt.t, 1)


def test_control_cost_on_the_raw_action():
    action = jnp.asarray([[2.0, -3.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0]])
    # raw (default, as Brax's ant): 0.5 * (4 + 9 + 0.25 + 1); clipped to [-1, 1]: 0.5 * (1 + 1 + 0.25 + 1)
    np.testing.assert_allclose(ant_ppo.ctrl_cost(CFG, action), [7.125])
    np.testing.assert_allclose(ant_ppo.ctrl_cost(CFG._replace(ctrl_cost_clipped=True), action), [1.625])


def test_brax_contact_set():
    """Only the four foot spheres (massless, at the lower legs' ends) collide, and only with the floor; with
    contacts="all" the torso and every leg capsule collide with the floor (the old model, no feet)."""
    feet, _ = ant_ppo.ant_model(contacts="feet")
    every, _ = ant_ppo.ant_model(contacts="all")
    assert feet.ngeom == 18 and every.ngeom == 14  # floor, torso, 12 leg capsules (+ 4 feet)
    collide = lambda m, i, j: bool(m.geom_contype[i] & m.geom_conaffinity[j] or m.geom_contype[j] & m.geom_conaffinity[i])
    pairs = lambda m: {(i, j) for i in range(m.ngeom) for j in range(i + 1, m.ngeom) if collide(m, i, j)}
    sphere = mujoco.mjtGeom.mjGEOM_SPHERE
    foot = [i for i in range(feet.ngeom) if feet.geom_type[i] == sphere and feet.geom_size[i, 0] == 0.08]
    assert len(foot) == 4 and pairs(feet) == {(0, i) for i in foot}
    assert pairs(every) == {(0, i) for i in range(1, 14)}
    np.testing.assert_allclose(feet.body_mass, every.body_mass)  # the feet add no mass
    np.testing.assert_allclose(np.abs(feet.geom_pos[foot, :2]), 0.4)  # at the lower legs' ends


def test_flipped_ant_ends_its_episode(step4):
    """Upside down, nothing touches the floor: the ant falls through it and its torso leaves the healthy range
    (Brax). With every geom colliding it would rest on its back at z ~ 0.27, healthy, forever (checked with
    MuJoCo's C engine on the same models)."""
    state = reset4()
    state = state._replace(qpos=jnp.broadcast_to(jnp.asarray(FLIPPED), state.qpos.shape), qvel=jnp.zeros_like(state.qvel))
    ended = np.zeros(4, bool)
    for _ in range(10):
        state, info = step4(state, jnp.zeros((4, 8)), 0.3 * jnp.ones(4), jax.random.split(jax.random.key(9), 4))
        ended |= np.asarray(info.terminated)
    assert ended.all()
    for contacts, healthy in (("feet", False), ("all", True)):
        mj_model, _ = ant_ppo.ant_model(contacts=contacts)
        data = mujoco.MjData(mj_model)
        data.qpos[:] = FLIPPED
        for _ in range(200):  # 2 s
            mujoco.mj_step(mj_model, data)
        assert (data.qpos[2] > ant_ppo.HEALTHY_Z[0]) == healthy, contacts


def test_crouched_start_inside_the_joint_ranges():
    mj_model, _ = ant_ppo.env_model(CFG)
    qpos = np.asarray(reset4(3).qpos)
    crouched = np.asarray(ant_ppo.CROUCHED_QPOS)
    np.testing.assert_array_equal(crouched[[2, 8, 10, 12, 14]], [0.55, 1.0, -1.0, -1.0, 1.0])  # z, ankles (rad)
    assert np.all(np.abs(qpos[:, :3] - crouched[:3]) <= 0.1) and np.all(np.abs(qpos[:, 7:] - crouched[7:]) <= 0.1)
    assert len({tuple(q) for q in qpos}) == 4  # reset noise
    hinges = mj_model.jnt_range[1:]
    assert np.all((qpos[:, 7:] > hinges[:, 0]) & (qpos[:, 7:] < hinges[:, 1]))
    standing = np.asarray(reset4(3, CFG._replace(init_pose="standing")).qpos)
    assert np.all(np.abs(standing[:, 2] - 0.75) <= 0.1) and np.all(np.abs(standing[:, 7:]) <= 0.1)
    # standing: the ankles (30-70 degrees) start outside their ranges
    assert np.all(standing[:, [8, 14]] < hinges[[1, 7], 0])


def test_auto_reset_returns_to_the_first_start():
    """Default (Brax's AutoResetWrapper): an ended episode restarts from the env's first start state, the same
    every time; fresh_resets draws new noise each time."""
    start = reset4(5)
    moved = start._replace(qpos=start.qpos + 0.3, qvel=start.qvel - 1.0, warmstart=start.warmstart + 2.0,
                           t=start.t + 7, ret=start.ret + 5.0)
    done = jnp.asarray([True, False, True, True])
    key = jax.random.key(6)
    out = jax.vmap(lambda s, d, k: ant_ppo.auto_reset(CFG, s, d, k))(moved, done, jax.random.split(key, 4))
    for i in range(4):
        source = start if done[i] else moved
        np.testing.assert_array_equal(out.qpos[i], source.qpos[i])
        np.testing.assert_array_equal(out.qvel[i], source.qvel[i])
        np.testing.assert_array_equal(out.t[i], 0 if done[i] else 7)
    np.testing.assert_array_equal(out.start_qpos, start.qpos)  # the start state is kept for the next episode
    fresh_cfg = CFG._replace(fresh_resets=True)
    fresh = jax.vmap(lambda s, d, k: ant_ppo.auto_reset(fresh_cfg, s, d, k))(moved, done, jax.random.split(key, 4))
    assert not np.allclose(fresh.qpos[0], start.qpos[0])
    np.testing.assert_allclose(fresh.qpos[0, 2], 0.55, atol=0.1)
    np.testing.assert_array_equal(fresh.qpos[1], moved.qpos[1])


def test_termination_and_timeout(step4):
    state = reset4()
    # env 1: torso lifted above the healthy range (terminates); env 2: last step of an episode (time-out).
    qpos = state.qpos.at[1, 2].set(1.5)
    state = state._replace(qpos=qpos, t=jnp.asarray([3, 3, EPISODE_LENGTH - 1, 0], jnp.int32),
                           ret=jnp.asarray([1.0, 2.0, 3.0, 4.0]))
    nxt, info = step4(state, jnp.zeros((4, 8)), jnp.ones(4), jax.random.split(jax.random.key(2), 4))
    np.testing.assert_array_equal(info.terminated, [False, True, False, False])
    np.testing.assert_array_equal(info.truncated, [False, False, True, False])
    np.testing.assert_array_equal(nxt.t, [4, 0, 0, 1])  # auto-reset where done
    np.testing.assert_allclose(info.episode_return, state.ret + info.reward, rtol=1e-6)
    np.testing.assert_array_equal(nxt.ret[1:3], 0.0)
    assert info.final_obs[1, 0] > 1.0           # the observation before the reset is the terminal one
    np.testing.assert_array_equal(nxt.qpos[1:3], state.start_qpos[1:3])  # back to each env's first start
    np.testing.assert_array_equal(nxt.qvel[1:3], state.start_qvel[1:3])
    np.testing.assert_allclose(nxt.qpos[0], step4(state, jnp.zeros((4, 8)), jnp.ones(4),
                                                  jax.random.split(jax.random.key(3), 4))[0].qpos[0])


def test_friction_on_every_geom_changes_dynamics(step4):
    _, model = ant_ppo.env_model(CFG)
    slippery = ant_ppo.with_friction(model, 0.05)
    assert model.geom_friction.shape[0] == 18  # floor, torso, 12 leg capsules, 4 feet
    np.testing.assert_allclose(slippery.geom_friction[:, 0], 0.05)
    np.testing.assert_array_equal(slippery.geom_friction[:, 1:], model.geom_friction[:, 1:])
    # Same start and actions at four frictions: the gait moves the torso differently.
    state = jax.tree.map(lambda x: jnp.stack([x[0]] * 4), reset4())
    frictions = jnp.asarray([0.02, 0.02, 0.2, 2.0])
    keys = jnp.stack([jax.random.key(4)] * 4)
    for t in range(25):
        action = jnp.broadcast_to(0.3 * jnp.sin(0.3 * t + jnp.arange(8.0)), (4, 8))
        state, info = step4(state, action, frictions, keys)
        assert not np.any(info.terminated | info.truncated)
    xy = np.asarray(state.qpos[:, :2])
    np.testing.assert_array_equal(xy[0], xy[1])  # deterministic
    assert np.all(np.isfinite(xy))
    assert np.linalg.norm(xy[0] - xy[2]) > 1e-2 and np.linalg.norm(xy[2] - xy[3]) > 1e-2


def test_tilted_ant_slides_at_its_friction_coefficient():
    """Coulomb friction: a rigid body on a plane tilted by angle theta starts to slide when tan(theta) exceeds
    the friction coefficient. The ant holds its crouched pose (PD control), gravity tilts slowly to a ratio
    r = tan(theta) and stays there: at 0.75 x the friction it must stand (only the soft contacts' creep of
    mm/s), at 1.3 x it must slide. With MJX's 1 Newton iteration it slid at friction 0.05 even untilted."""
    _, model = ant_ppo.env_model(CFG)
    hinges = jnp.asarray(ant_ppo.CROUCHED_QPOS[7:])
    settle, ramp, hold = 50, 100, 100  # physics steps of 0.01 s

    def final_speed(mu, ratio):
        m = ant_ppo.with_friction(model, mu)
        data = mjx.make_data(m).replace(qpos=jnp.asarray(ant_ppo.CROUCHED_QPOS))

        def step(data, r):
            tilt = 1.0 / jnp.sqrt(1.0 + r * r)
            tilted = m.replace(opt=m.opt.replace(gravity=9.81 * jnp.stack([r * tilt, 0.0, -tilt])))
            ctrl = jnp.clip(1.0 * (hinges - data.qpos[7:]) - 0.1 * data.qvel[6:], -1.0, 1.0)
            data = mjx.step(tilted, data.replace(ctrl=ctrl))
            return data, data.qvel[0]

        ratios = ratio * jnp.concatenate([jnp.zeros(settle), jnp.linspace(0.0, 1.0, ramp), jnp.ones(hold)])
        _, vx = jax.lax.scan(step, data, ratios)
        return vx[-hold // 2:]

    mus = jnp.asarray([0.05, 0.05, 0.3, 0.3])
    ratios = mus * jnp.asarray([0.75, 1.3, 0.75, 1.3])
    vx = np.asarray(jax.jit(jax.vmap(final_speed), compiler_options=FAST_COMPILE)(mus, ratios))
    stands, slides = vx[[0, 2]], vx[[1, 3]]
    assert np.abs(stands).max() < 0.02, np.abs(stands).max(1)
    assert np.all(slides[:, -1] > 0.1) and np.all(slides[:, -1] > slides[:, 0]), slides[:, [0, -1]]  # accelerating


def test_friction_schedule():
    key = jax.random.key(7)
    rng = (0.02, 2.0)
    values = np.asarray([ant_ppo.phase_friction(key, p, None, rng) for p in range(200)])
    assert np.all((values >= 0.02) & (values <= 2.0)) and len(np.unique(values)) == 200
    # log-uniform: log-frictions spread evenly over [log 0.02, log 2] (mean at the middle, 1/3 below 0.093)
    assert abs(np.log(values).mean() - np.log(0.2)) < 0.35
    assert 0.2 < np.mean(values < 0.02 * 100 ** (1 / 3)) < 0.47
    assert float(ant_ppo.phase_friction(jax.random.key(8), 0, None, rng)) != values[0]  # depends on the seed
    # A list: phase k uses value k mod len, whatever the seed.
    listed = [float(ant_ppo.phase_friction(key, p, (0.5, 0.1, 0.3), rng)) for p in range(5)]
    np.testing.assert_allclose(listed, [0.5, 0.1, 0.3, 0.5, 0.1], rtol=1e-6)
    assert float(ant_ppo.phase_friction(key, 3, (1.0,), rng)) == 1.0


def test_every_seed_gets_the_authors_frictions_by_default():
    seeds = jnp.arange(3)
    table = ant_ppo.friction_table(ant_ppo.Args(), seeds, 5)
    np.testing.assert_allclose(table, [[0.2961, 0.2399, 0.0387, 0.3528, 0.0829]] * 3, rtol=1e-6)
    table = ant_ppo.friction_table(ant_ppo.Args(frictions=(0.1, 0.2)), seeds, 3)
    np.testing.assert_allclose(table, [[0.1, 0.2, 0.1]] * 3, rtol=1e-6)
    np.testing.assert_allclose(ant_ppo.friction_table(ant_ppo.Args(fixed_friction=1.0), seeds, 2), 1.0)
    drawn = ant_ppo.friction_table(ant_ppo.Args(random_frictions=True), seeds, 5)
    assert np.all((drawn >= 0.02) & (drawn <= 2.0)) and len(np.unique(drawn)) == 15  # its own per seed
    # the same draws as the schedule inside training: a function of the seed's friction key and the phase
    key = ant_ppo.member_keys(2)[3]
    np.testing.assert_allclose(drawn[2], [ant_ppo.phase_friction(key, p, None, (0.02, 2.0)) for p in range(5)],
                               rtol=1e-6)


def test_adam_betas_per_agent():
    """As the authors ran Slippery Ant: bp 0.9 / 0.999 (Table 8); l2, er, l2-er, cbp, layernorm-l2 0.99 / 0.99;
    spectral-reg (their runs set none: their default) 0.9 / 0.999; redo 0.99 / 0.99 (Dohare et al.'s Ant config)."""
    expected = {"bp": (0.9, 0.999), "l2": (0.99, 0.99), "er": (0.99, 0.99), "l2-er": (0.99, 0.99),
                "cbp": (0.99, 0.99), "layernorm-l2": (0.99, 0.99), "spectral-reg": (0.9, 0.999), "redo": (0.99, 0.99)}
    assert set(expected) == set(ant_ppo.AGENTS)
    betas = lambda **flags: tuple(ant_ppo.resolve(ant_ppo.Args(**flags))[0][b] for b in ("beta1", "beta2"))
    for agent, pair in expected.items():
        assert betas(agent=agent) == pair, agent
    assert betas(agent="bp", beta1=0.99, beta2=0.99) == (0.99, 0.99)
    assert betas(agent="l2-er", beta2=0.999) == (0.99, 0.999)


# ----------------------------------------------------------------------------------------------------------
# Rollout: friction change at exactly --change-every, time-out bootstrap; GAE
# ----------------------------------------------------------------------------------------------------------
def test_cbp_paper_variant_step():
    """--cbp-variant paper on the actor and the critic: each replaces its highest 0.01 |mean h| x mean|w_out| unit
    (pending just below 1: one per net), redraws its incoming column in U(+-sqrt(6 / obs dim)) and re-randomizes its
    outgoing row (not 0) in U(+-sqrt(6 / hidden)); Adam's mu and nu are zeroed at exactly those entries, its
    scalar count kept; log_std untouched. Passing --cbp-utility with the paper variant fails in one line."""
    agent = {**ant_ppo.AGENTS["cbp"], "replacement_rate": 1e-4, "maturity_threshold": 0, "cbp_variant": "paper"}
    params = ant_ppo.init_params(jax.random.key(0), 16)
    obs = jax.random.normal(jax.random.key(1), (8, ant_ppo.OBS_DIM))
    hiddens = ant_ppo.hidden_features(params, obs)
    opt = common.adam(1e-3, 0.99, 0.99)
    opt_state = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)[1]
    cbp = tuple(common.cbp_init(16)._replace(pending=jnp.array(0.9999)) for _ in range(2))
    new, new_opt, new_cbp = jax.jit(lambda *a: ant_ppo.cbp_step(agent, opt, *a))(params, opt_state, cbp, hiddens,
                                                                                 jax.random.key(2))
    adam = new_opt[1][0]
    assert int(adam.count) == 1
    for net, h, state in zip(("actor", "critic"), hiddens, new_cbp):
        utility = 0.01 * np.abs(np.asarray(h).mean(0)) * np.abs(np.asarray(params[net]["out"]["w"])).mean(1)
        j = int(np.argmax(utility))
        assert np.flatnonzero(np.asarray(state.age) == 0).tolist() == [j]
        w_in, w_out = np.asarray(new[net]["hidden"]["w"]), np.asarray(new[net]["out"]["w"])
        assert np.all(np.abs(w_in[:, j]) <= np.sqrt(6 / ant_ppo.OBS_DIM)) and new[net]["hidden"]["b"][j] == 0
        assert np.all(w_in[:, j] != np.asarray(params[net]["hidden"]["w"])[:, j])
        assert np.all(np.abs(w_out[j]) <= np.sqrt(6 / 16)) and np.all(w_out[j] != 0)
        np.testing.assert_array_equal(np.delete(w_out, j, 0), np.delete(np.asarray(params[net]["out"]["w"]), j, 0))
        for moments in (adam.mu[net], adam.nu[net]):
            np.testing.assert_array_equal(np.asarray(moments["hidden"]["w"])[:, j], 0.0)
            np.testing.assert_array_equal(np.asarray(moments["out"]["w"])[j], 0.0)
            assert np.all(np.delete(np.asarray(moments["out"]["w"]), j, 0) != 0)
    np.testing.assert_array_equal(new["actor"]["log_std"], params["actor"]["log_std"])
    with pytest.raises(SystemExit, match="--cbp-utility does not apply to --cbp-variant paper"):
        ant_ppo.resolve(ant_ppo.Args(agent="cbp", cbp_variant="paper", cbp_utility="contribution"))


def test_rollout_friction_change_raw_obs_and_terminal_timeouts():
    args = ant_ppo.Args(**{**TINY, "change_every": 8})
    agent, _ = ant_ppo.resolve(args)
    member = ant_ppo.make_train(args, agent)[0](3)  # init, eagerly
    sched = ant_ppo.schedule(args, ant_ppo.member_keys(3)[3])
    delta = 0.5

    shifted = jax.tree.map(lambda x: x, member["params"])
    shifted["critic"]["out"]["b"] = shifted["critic"]["out"]["b"] + delta
    pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), member["params"], shifted)
    go = lambda p: ant_ppo.rollout(args, p, member["env"], member["obs_stats"], member["steps"], jax.random.key(5),
                                   sched)
    carry, traj, _ = jax.jit(jax.vmap(go), compiler_options=FAST_COMPILE)(pair)
    traj, traj_shifted = (jax.tree.map(lambda x: x[i], traj) for i in (0, 1))
    carry = jax.tree.map(lambda x: x[0], carry)
    steps_per_update = args.num_steps // args.num_envs
    assert traj.obs.shape == (steps_per_update, 4, 27) and traj.action.shape == (steps_per_update, 4, 8)
    assert int(carry[2]) == args.num_steps
    # Raw observations (no normalization by default): the first is the env's state itself.
    np.testing.assert_array_equal(traj.obs[0], jax.vmap(ant_ppo.observe)(member["env"]))
    # The friction switches exactly every change_every = 8 env steps = 2 vector steps of 4 envs, through the
    # authors' five values (then from the first again).
    expected = [ant_ppo.AUTHORS_FRICTIONS[(t * 4 // 8) % 5] for t in range(steps_per_update)]
    np.testing.assert_allclose(traj.friction[:, 0], expected, rtol=1e-6)
    # The critic does not act, so both rollouts are the same; time-outs (8-step episodes) are terminal, so no
    # reward depends on the critic (with --bootstrap-timeouts they would differ by gamma * delta there).
    np.testing.assert_array_equal(traj.action, traj_shifted.action)
    assert np.asarray(traj.done).sum() >= 4
    np.testing.assert_array_equal(traj_shifted.reward, traj.reward)
    # What the step_reward, ctrl_cost and action_rms metrics average: the env's reward (here the training reward),
    # its control cost 0.5 |a|^2 on the emitted action, the square of the policy's mean
    np.testing.assert_array_equal(traj.env_reward, traj.reward)
    np.testing.assert_allclose(traj.ctrl_cost, 0.5 * np.sum(np.square(np.asarray(traj.action, np.float64)), -1),
                               rtol=1e-5)
    mean = ant_ppo.actor_apply(member["params"]["actor"], traj.obs)[0]
    np.testing.assert_allclose(traj.mean_sq, np.mean(np.square(np.asarray(mean, np.float64)), -1), rtol=1e-4)


def test_timeout_bootstrap_flag():
    """training_reward: a time-out adds gamma * V(final obs) only with bootstrap_timeouts; terminations and
    other steps never do."""
    args = ant_ppo.Args(**TINY)
    critic = ant_ppo.init_params(jax.random.key(0), 16)["critic"]
    critic["out"]["b"] = critic["out"]["b"] + 2.0
    final_obs = jax.random.normal(jax.random.key(1), (3, 27))
    info = ant_ppo.StepInfo(reward=jnp.asarray([1.0, 2.0, 3.0]), terminated=jnp.asarray([False, True, False]),
                            truncated=jnp.asarray([True, False, False]), final_obs=final_obs,
                            episode_return=jnp.zeros(3))
    stats = ant_ppo.obs_stats_init()
    np.testing.assert_array_equal(ant_ppo.training_reward(args, critic, stats, info), [1.0, 2.0, 3.0])
    value = ant_ppo.critic_apply(critic, final_obs[0])[0]
    boot = ant_ppo.training_reward(replace(args, bootstrap_timeouts=True), critic, stats, info)
    np.testing.assert_allclose(boot, [1.0 + 0.99 * float(value), 2.0, 3.0], rtol=1e-6)


def test_gae_matches_python_loop():
    rng = np.random.default_rng(0)
    T, N, gamma, lam = 12, 3, 0.99, 0.95
    values, rewards = rng.normal(size=(T, N)).astype(np.float32), rng.normal(size=(T, N)).astype(np.float32)
    dones = rng.random((T, N)) < 0.2
    last = rng.normal(size=N).astype(np.float32)
    adv, targets = ant_ppo.gae(jnp.asarray(values), jnp.asarray(rewards), jnp.asarray(dones), jnp.asarray(last),
                               gamma, lam)
    expected = np.zeros((T, N))
    for n in range(N):
        running, next_value = 0.0, last[n]
        for t in reversed(range(T)):
            keep = 0.0 if dones[t, n] else 1.0
            delta = rewards[t, n] + gamma * next_value * keep - values[t, n]
            running = delta + gamma * lam * keep * running
            expected[t, n], next_value = running, values[t, n]
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, expected + values, rtol=1e-5, atol=1e-5)


def test_vmapped_rank_computations_do_not_stall_on_cpu():
    """Two seeds at the real width: the ER step and the rank metrics (batched LAPACK calls) once deadlocked
    XLA's CPU thread pool when they ran concurrently. Run in a fresh process so a regression fails, not hangs."""
    code = """if True:
        import jax, jax.numpy as jnp, ant_ppo, common
        params = jax.vmap(lambda k: ant_ppo.init_params(k, 256))(jax.random.split(jax.random.key(0), 2))
        obs = jax.random.normal(jax.random.key(1), (2, 2048, 27))
        def go(p, o):
            p, _ = common.er_ascent(p, ant_ppo.hidden_features, o, 1e-3)
            return common.effective_ranks(ant_ppo.hidden_features(p, o))
        f = jax.jit(jax.vmap(go))
        for i in range(5):
            r = f(params, obs + i)
        print(float(r.sum()))
    """
    root = Path(ant_ppo.__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert np.isfinite(float(out.stdout.split()[-1]))


# ----------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------
def printed_run(tmp_path, name, **overrides):
    """run(), also keeping what it printed, in <run dir>/stdout.txt."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out, metrics = run(tmp_path, name, **overrides)
    (out / "stdout.txt").write_text(printed.getvalue())
    return out, metrics


@pytest.fixture(scope="module")
def cbp_two_seeds(tmp_path_factory):
    """tests/test_equal_metrics.py's cbp run: CBP (a high replacement rate and no maturity wait, so units are
    replaced in this short run) with L2, and the spectra at each friction phase's start and end."""
    return printed_run(tmp_path_factory.mktemp("cbp"), "cbp", seeds=2, hessian_every_phase=True, **CBP)


@pytest.fixture(scope="module")
def short_full(tmp_path_factory):
    """5 updates of the SHORT program (seed 1 alone, member batching map), in calls of 2, 2 and 1 updates: the
    uninterrupted reference of the resume and interrupt tests."""
    return run(tmp_path_factory.mktemp("short"), "full", seed=1, total_steps=320, **SHORT)


def check_outputs(metrics, num_c, num_s, num_updates=2, change_every=TINY["change_every"]):
    for k in METRICS:
        assert metrics[k].shape[:3] == (num_c, num_s, num_updates), k
    assert metrics["dead_units"].shape[3] == metrics["effective_rank"].shape[3] == 2
    assert metrics["layer_names"].tolist() == ["actor_hidden", "critic_hidden"]
    assert np.all(np.isfinite(metrics["loss"])) and np.all(np.isfinite(metrics["param_norm"]))
    assert np.all((metrics["effective_rank"] >= 1) & (metrics["effective_rank"] <= TINY["hidden_size"]))
    assert np.all((metrics["dead_units"] >= 0) & (metrics["dead_units"] <= TINY["hidden_size"]))
    assert np.all((metrics["friction"] >= 0.02) & (metrics["friction"] <= 2.0))
    assert np.all(metrics["ctrl_cost"] > 0) and np.all(metrics["action_rms"] > 0)
    assert np.all(np.isfinite(metrics["step_reward"]))
    # Episodes of at most 8 steps end during every 16-step rollout.
    assert np.all(metrics["episodes"] >= TINY["num_envs"]) and np.all(np.isfinite(metrics["episodic_return"]))
    assert not metrics["diverged"].any()
    np.testing.assert_array_equal(metrics["env_steps"], [64, 128])
    # 128 env steps in phases of change_every env steps (32: four phases), the first of the authors' frictions
    phases = 128 // change_every
    np.testing.assert_allclose(metrics["friction_schedule"],
                               np.broadcast_to(ant_ppo.AUTHORS_FRICTIONS[:phases], (num_c, num_s, phases)), rtol=1e-6)


def test_end_to_end(cbp_two_seeds):
    out, metrics = cbp_two_seeds
    check_outputs(metrics, 1, 2)
    # Both seeds share the schedule; change_every 32 < 64 samples per update: update 0 ends in phase 1
    # (env step 63), update 1 in phase 3 (env step 127).
    np.testing.assert_allclose(metrics["friction"][0], [[0.2399, 0.3528]] * 2, rtol=1e-6)
    assert (out / "config.json").exists() and (out / "checkpoint.pkl").exists()
    printed = (out / "stdout.txt").read_text()
    assert "Adam betas 0.99 / 0.99" in printed and "2 members (1 configs x 2 seeds)" in printed
    assert "friction schedule (every seed), one value per 32 env steps: 0.2961, 0.2399, 0.0387, 0.3528" in printed
    assert "update 2/2 | phase 3 | episodic_return" in printed and "final episodic return" in printed


def test_seeds_and_configs_together_match(tmp_path, cbp_two_seeds):
    """Seed 1 trained beside seed 0 == seed 1 trained beside a config of itself without weight decay (a member's
    results depend on its own seed and config only, not on the other members or its place among them). Both
    runs have 2 members, so they share one compiled program with either member batching."""
    _, together = cbp_two_seeds
    _, sweep = run(tmp_path, "sweep", seed=1, seeds=1, **{**CBP, "weight_decay": (0.1, 0.0)})
    check_outputs(sweep, 2, 1)
    for k in METRICS:
        np.testing.assert_allclose(sweep[k][0, 0], together[k][0, 1], rtol=1e-5, atol=1e-5, err_msg=k)
    assert not np.allclose(sweep["param_norm"][1, 0], sweep["param_norm"][0, 0])  # weight decay acts


def test_seed_alone_matches_seed_together(tmp_path, short_full):
    """Seed 1 trained alone (member batching map: a one-member program) == seed 1 trained beside seed 0 in one
    vmapped program, to float rounding: vmap and map compute the same, and a member depends on nothing else.

    The two programs differ in batch shape, so XLA may round differently (~1e-7), and contact dynamics amplify
    that chaotically (measured: 1e-3 in the observations after 16 steps with 8-step episodes). One-step episodes
    (every step starts from a reset, then times out) keep the physics short, so any difference larger than
    rounding would be a real dependence on the other seed. Also bp's Adam betas and its outputs."""
    out, together = printed_run(tmp_path, "together", seeds=2, **{**SHORT, "member_batching": "vmap"})
    _, alone = short_full  # its first two updates: one call, as here
    assert (together["episodes"] == TINY["num_steps"]).all()  # every step ended an episode
    for k in METRICS:
        np.testing.assert_allclose(alone[k][0, 0, :2], together[k][0, 1], rtol=1e-4, atol=1e-5, err_msg=k)
    assert not np.allclose(together["param_norm"][0, 0], together["param_norm"][0, 1])  # seeds differ
    assert np.isfinite(together["loss"]).all() and not together["diverged"].any()
    np.testing.assert_allclose(together["friction"], 0.2961, rtol=1e-6)  # one phase
    assert "Adam betas 0.9 / 0.999" in (out / "stdout.txt").read_text()


def test_two_devices_equal_one(tmp_path, short_full):
    """3 members on 2 (forced host) devices in one process (padded to 4, one after another on each device):
    seed 1, the first of them, equals seed 1 run alone on one device to float rounding (see above); the
    padding member is in no output."""
    code = (f"import ant_ppo\nant_ppo.main(ant_ppo.Args(**{ {**TINY, **SHORT}!r}, seed=1, seeds=3, "
            f"out_dir={str(tmp_path / 'two')!r}))\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    root = Path(ant_ppo.__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "3 members (1 configs x 3 seeds, 1 padding), 2 x cpu, member batching map" in out.stdout
    with np.load(tmp_path / "two" / "metrics.npz") as f:
        two = {k: f[k] for k in f.files}
    _, alone = short_full
    for k in METRICS:
        assert two[k].shape[:3] == (1, 3, 2), k
        np.testing.assert_allclose(alone[k][0, 0, :2], two[k][0, 0], rtol=1e-4, atol=1e-5, err_msg=k)
    assert not np.allclose(two["param_norm"][0, 0], two["param_norm"][0, 2])  # seeds 1 and 3 differ


def test_resume_matches_uninterrupted(tmp_path, cbp_two_seeds):
    """One update, then resumed to two: the metrics and spectra of the uninterrupted run."""
    out, full = cbp_two_seeds
    cbp = dict(seeds=2, hessian_every_phase=True, **CBP)
    run(tmp_path, "resumed", total_steps=64, **cbp)
    with np.load(tmp_path / "resumed" / "hessian.npz") as f:
        assert f["tasks"].tolist() == [0] and np.isfinite(f["end_nodes"]).all()  # measured at that run's end
    _, resumed = run(tmp_path, "resumed", total_steps=128, resume=True, **cbp)
    for k in METRICS:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    with np.load(out / "hessian.npz") as a, np.load(tmp_path / "resumed" / "hessian.npz") as b:
        for k in a.files:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    with pytest.raises(SystemExit, match="different settings.*gamma"):
        run(tmp_path, "resumed", total_steps=128, resume=True, gamma=0.9, **cbp)
    with pytest.raises(SystemExit, match="already holds a run"):  # a new run never overwrites one
        run(tmp_path, "resumed", **cbp)
    with pytest.raises(SystemExit, match="already has 2 updates, more than 1"):
        run(tmp_path, "resumed", total_steps=64, resume=True, **cbp)


def test_resume_longer_run_off_the_chunk_edges(tmp_path, short_full):
    """3 updates in chunks of 2 (edges 0, 2, 3), resumed to 5 (edges 0, 2, 4, 5): update 3 is not an edge of the
    longer run, and the resumed run must still do exactly updates 4 and 5."""
    _, full = short_full
    run(tmp_path, "resumed", seed=1, total_steps=192, **SHORT)
    _, resumed = run(tmp_path, "resumed", seed=1, total_steps=320, resume=True, **SHORT)
    for k in METRICS:
        assert resumed[k].shape[2] == 5, k
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)


class SignalAfterFirstChunk(runner.Progress):
    """runner.Progress that sends this process a SIGTERM after the first chunk's line (as `kill` would)."""

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        if not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_interrupt_then_resume_equals_uninterrupted(tmp_path, short_full, monkeypatch, capsys):
    """A SIGTERM during a run stops it at the end of the chunk of updates in progress: it checkpoints, prints
    the command that resumes it and exits 143; that command finishes the run with the uninterrupted metrics."""
    import tyro

    _, full = short_full
    args = ant_ppo.Args(**{**TINY, **SHORT, "seed": 1, "total_steps": 320, "out_dir": str(tmp_path / "cut")})
    monkeypatch.setattr(runner, "Progress", SignalAfterFirstChunk)
    with pytest.raises(SystemExit) as e:
        ant_ppo.main(args)
    assert e.value.code == 143
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("interrupted after")]
    assert len(lines) == 1 and lines[0].startswith("interrupted after update 2/5; resume with: python ant_ppo.py ")
    with np.load(tmp_path / "cut" / "metrics.npz") as f:
        assert f["loss"].shape == (1, 1, 2)
    command = lines[0].split("resume with: ")[1].split()
    resumed = tyro.cli(ant_ppo.Args, args=command[2:])
    assert resumed == replace(args, resume=True)
    monkeypatch.undo()
    ant_ppo.main(resumed)
    with np.load(tmp_path / "cut" / "metrics.npz") as f:
        for k in full:
            np.testing.assert_array_equal(f[k], full[k], err_msg=k)


def test_er_agent_end_to_end(tmp_path):
    """l2-er (er runs the same program with its weight decay at 0; its outputs, which pass these checks, are
    pinned by tests/test_equal_metrics.py)."""
    _, metrics = run(tmp_path, "l2-er", agent="l2-er", seeds=2, er_lr=(0.5,), weight_decay=(0.1,))
    check_outputs(metrics, 1, 2)


def test_cbp_end_to_end_with_hessian(tmp_path, cbp_two_seeds):
    out, metrics = cbp_two_seeds  # its outputs: test_end_to_end
    with np.load(out / "hessian.npz") as f:
        spectra = {k: f[k] for k in f.files}
    # Spectra where phases start, at update boundaries: update 0 (phase 0) and update 1 (phases 1 and 2 began
    # during update 0: the first of them).
    np.testing.assert_array_equal(spectra["tasks"], [0, 1])
    for k in ("init_nodes", "init_weights", "end_nodes", "end_weights"):
        assert spectra[k].shape == (1, 2, 2, 1, CBP["hessian_iters"]) and np.all(np.isfinite(spectra[k])), k
    np.testing.assert_allclose(spectra["init_weights"].sum(-1), 1.0, rtol=1e-4)
    # Measuring the Hessian (on copies of the envs) leaves training untouched.
    _, plain = run(tmp_path, "cbp", seeds=2, **CBP)
    for k in METRICS:
        np.testing.assert_array_equal(plain[k], metrics[k], err_msg=k)


# The agents beyond the paper's table, with strengths raised so that each mechanism moves these two updates (as
# tests/test_equal_metrics.py raises them): LayerNorm with weight decay 0.1 beside 0 (two configs, one seed: the
# same program as two seeds); lambda 0.1; tau 16 = the width, so every hidden unit scores <= tau and all are
# recycled after the 12th of the run's 16 Adam steps (score_i = 16 m_i / sum_k m_k <= 16).
NEW_AGENTS = {"layernorm-l2": dict(seeds=1, weight_decay=(0.1, 0.0)),
              "spectral-reg": dict(seeds=2, spectral_lambda=0.1), "redo": dict(seeds=2, redo_tau=16.0, redo_every=12)}


def checkpoint_params(out, args):
    """The members' parameters [members, ...] from a run's checkpoint.pkl (which holds the state's leaves)."""
    agent, _ = ant_ppo.resolve(args)
    structure = jax.tree.structure(jax.eval_shape(ant_ppo.make_train(args, agent)[0], 0))
    return jax.tree.unflatten(structure, runner.load_checkpoint(out)["state"])["params"]


@pytest.mark.parametrize("agent", NEW_AGENTS)
def test_new_agents_end_to_end(agent, tmp_path):
    out, metrics = printed_run(tmp_path, agent, agent=agent, **NEW_AGENTS[agent])
    check_outputs(metrics, *((2, 1) if agent == "layernorm-l2" else (1, 2)))
    betas = {"layernorm-l2": "0.99 / 0.99", "spectral-reg": "0.9 / 0.999", "redo": "0.99 / 0.99"}[agent]
    assert f"Adam betas {betas}" in (out / "stdout.txt").read_text()
    params = checkpoint_params(out, ant_ppo.Args(**{**TINY, "agent": agent, **NEW_AGENTS[agent]}))
    if agent == "layernorm-l2":
        for net in ("actor", "critic"):  # LayerNorm on the hidden layers only, trained
            assert set(params[net]["hidden"]) == {"w", "b", "scale", "shift"} and set(params[net]["out"]) == {"w", "b"}
            assert np.all(np.asarray(params[net]["hidden"]["scale"][0]) != 1.0)  # (config 0: weight decay 0.1)
        assert not np.allclose(metrics["param_norm"][0], metrics["param_norm"][1])  # weight decay 0.1 vs 0 acts
    if agent == "redo":
        # Every unit recycled after Adam step 12 (outgoing weights set to 0), then 4 Adam steps of lr 1e-4 (< 2e-3
        # in all): the critic's output weights, LeCun-uniform in +-0.43 before, are all near 0.
        assert np.abs(np.asarray(params["critic"]["out"]["w"])).max() < 0.01


# ----------------------------------------------------------------------------------------------------------
# The agents beyond the paper's table on their own: LayerNorm, the spectral penalty in the loss, ReDo
# ----------------------------------------------------------------------------------------------------------
def test_layer_norm_on_hidden_layers_only():
    params = ant_ppo.init_params(jax.random.key(0), 16, layer_norm=True)
    plain = ant_ppo.init_params(jax.random.key(0), 16)
    for net in ("actor", "critic"):
        np.testing.assert_array_equal(params[net]["hidden"]["scale"], 1.0)
        np.testing.assert_array_equal(params[net]["hidden"]["shift"], 0.0)
        assert set(params[net]["out"]) == {"w", "b"}
    np.testing.assert_array_equal(params["actor"]["hidden"]["w"], plain["actor"]["hidden"]["w"])  # same draws
    scale = jnp.linspace(0.5, 2.0, 16)
    params["actor"]["hidden"] = {**params["actor"]["hidden"], "scale": scale, "shift": jnp.full(16, 0.1)}
    obs = jax.random.normal(jax.random.key(1), (8, ant_ppo.OBS_DIM))
    pre = np.asarray(obs @ params["actor"]["hidden"]["w"] + params["actor"]["hidden"]["b"], np.float64)
    normed = (pre - pre.mean(-1, keepdims=True)) / np.sqrt(pre.var(-1, keepdims=True) + 1e-6)
    mean, _, h = ant_ppo.actor_apply(params["actor"], obs)
    np.testing.assert_allclose(h, np.maximum(normed * np.asarray(scale) + 0.1, 0.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, np.asarray(h) @ params["actor"]["out"]["w"] + params["actor"]["out"]["b"],
                               rtol=1e-5, atol=1e-6)  # no LayerNorm on the output layer
    pre = np.asarray(obs @ params["critic"]["hidden"]["w"] + params["critic"]["hidden"]["b"], np.float64)
    normed = (pre - pre.mean(-1, keepdims=True)) / np.sqrt(pre.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ant_ppo.critic_apply(params["critic"], obs)[1], np.maximum(normed, 0.0), rtol=1e-5,
                               atol=1e-5)  # the critic's too, at its init scale 1 and shift 0
    agent, _ = ant_ppo.resolve(ant_ppo.Args(agent="layernorm-l2"))
    assert agent["layer_norm"] is True and agent["weight_decay"] == 1e-3


def toy_batch(params, key, n=32):
    """A PPO batch of n random samples, its log-probs under the actor in `params`."""
    k_obs, k_act, k_adv, k_target = jax.random.split(key, 4)
    obs = jax.random.normal(k_obs, (n, ant_ppo.OBS_DIM))
    mean, log_std, _ = ant_ppo.actor_apply(params["actor"], obs)
    action = mean + jnp.exp(log_std) * jax.random.normal(k_act, mean.shape)
    value = ant_ppo.critic_apply(params["critic"], obs)[0]
    return ant_ppo.Batch(obs, action, ant_ppo.gaussian_log_prob(action, mean, log_std) + 0.1, value,
                         jax.random.normal(k_adv, (n,)), value + jax.random.normal(k_target, (n,)))


def test_spectral_start_vectors_are_the_authors():
    """The penalty's start vectors come from PRNGKey(i), i the authors' counter over kernels (a_0, a_1, c_0,
    c_1; log_std is no kernel): our leaf order lists the kernels in their order, so the default keys are theirs,
    and the penalty equals their power iteration by hand."""
    from authors_spectral import authors_penalty, kernel_paths
    params = ant_ppo.spectral_params(jax.tree.map(lambda x: x + 0.05, ant_ppo.init_params(jax.random.key(0), 16)))
    table = {"['actor']['hidden']['w']": 0, "['actor']['out']['w']": 1, "['critic']['hidden']['w']": 2,
             "['critic']['out']['w']": 3}
    assert kernel_paths(params) == list(table)
    for iters in (1, 10):
        np.testing.assert_allclose(float(common.spectral_penalty(params, 2.0, 2.0, iters)[0]),
                                   authors_penalty(params, table, iters=iters), rtol=1e-5)


def test_spectral_penalty_in_the_loss_without_log_std():
    """spectral-reg's training loss = PPO loss + lambda x the penalty over the actor's and critic's kernels and
    biases; the policy's log-std is not in it (the authors' penalty skips it; common.spectral_penalty would take it
    for a bias). So on the same batch its gradient differs from bp's in every kernel, by 2 lambda b in every bias,
    and not at all in log_std."""
    args = ant_ppo.Args(**TINY)
    bp, _ = ant_ppo.resolve(replace(args, agent="bp"))
    spectral, _ = ant_ppo.resolve(replace(args, agent="spectral-reg"))
    assert (spectral["spectral_lambda"], spectral["spectral_k"], spectral["spectral_target"], spectral["power_iters"],
            spectral["spectral_persistent"]) == (1e-4, 2.0, 2.0, 10, False) and "weight_decay" not in spectral
    spectral, _ = ant_ppo.resolve(replace(args, agent="spectral-reg", spectral_lambda=1e-3))  # float32 shows 1e-3

    @partial(jax.jit, compiler_options=FAST_COMPILE)  # one program (eager ops would each compile)
    def losses_and_grads():
        params = ant_ppo.init_params(jax.random.key(0), 16)
        params = jax.tree.map(lambda x: x + 0.05, params)  # nonzero biases, log_std 0.05
        batch = toy_batch(params, jax.random.key(1))
        grads = {name: jax.value_and_grad(lambda p: ant_ppo.train_loss(p, batch, args, agent), has_aux=True)(params)
                 for name, agent in (("bp", bp), ("spectral", spectral))}
        penalty = common.spectral_penalty(ant_ppo.spectral_params(params), 2.0, 2.0, 10)[0]
        return params, grads, penalty, ant_ppo.ppo_loss(params, batch, args)[0]

    params, grads, penalty, ppo = losses_and_grads()
    (loss_bp, (ppo_bp, _, _)), grad_bp = grads["bp"]
    (loss_spectral, (ppo_spectral, _, vectors)), grad_spectral = grads["spectral"]
    np.testing.assert_allclose([loss_bp, ppo_bp, ppo_spectral], float(ppo), rtol=1e-6)  # recorded loss: PPO's only
    np.testing.assert_allclose(loss_spectral - ppo, 1e-3 * penalty, rtol=1e-4)
    assert float(penalty) > 1.0 and len(vectors) == 4  # a power iteration per kernel: 2 networks x 2 layers
    np.testing.assert_array_equal(grad_spectral["actor"]["log_std"], grad_bp["actor"]["log_std"])
    # given the whole tree, common.spectral_penalty would take log_std for a bias: 8 x 0.05^2
    np.testing.assert_allclose(common.spectral_penalty({"log_std": np.full(8, 0.05, np.float32)})[0], 0.02, rtol=1e-5)
    for net in ("actor", "critic"):
        for layer in ("hidden", "out"):
            diff = lambda leaf: np.asarray(grad_spectral[net][layer][leaf] - grad_bp[net][layer][leaf])
            assert np.abs(diff("w")).max() > 1e-5, (net, layer)  # the penalty acts on every kernel
            np.testing.assert_allclose(diff("b"), 2e-3 * np.asarray(params[net][layer]["b"]), rtol=1e-2, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# The authors' PPO details: init, value loss, the ER step's objective and place, metrics before the update
# ----------------------------------------------------------------------------------------------------------
def test_init_is_lecun_uniform_everywhere_as_the_authors():
    """Every layer U(+-sqrt(3 / fan-in)) (Flax's lecun_uniform in the authors' models.py), zero biases and log-std;
    the policy head is not scaled down (a head x 0.01 would put its largest weight near 0.001)."""
    params = ant_ppo.init_params(jax.random.key(0), 256)
    for net, layer, fan_in in (("actor", "hidden", 27), ("actor", "out", 256), ("critic", "hidden", 27),
                               ("critic", "out", 256)):
        w, bound = np.asarray(params[net][layer]["w"], np.float64), np.sqrt(3.0 / fan_in)
        assert 0.95 * bound < np.abs(w).max() <= bound, (net, layer)
        np.testing.assert_allclose(w.std(), bound / np.sqrt(3.0), rtol=0.1, err_msg=f"{net} {layer}")
        np.testing.assert_array_equal(params[net][layer]["b"], 0.0)
    np.testing.assert_array_equal(params["actor"]["log_std"], 0.0)


def test_value_loss_is_the_clipped_max_without_a_half():
    """The value part of ppo_loss (vf_coef 1 minus vf_coef 0) = mean of max((v - R)^2, (v_old + clip(v - v_old,
    +-0.2) - R)^2), the authors' form, by hand in float64; half the samples' values moved by 1 from the rollout's
    (the clipped error counts there), the others by 0.05 (inside the clip)."""
    args = ant_ppo.Args(**TINY)
    params = ant_ppo.init_params(jax.random.key(0), 16)
    batch = toy_batch(params, jax.random.key(1))
    shift = jnp.where(jnp.arange(32) < 16, 1.0, 0.05)
    batch = batch._replace(value=batch.value - shift, target=batch.value + jnp.linspace(-2.0, 2.0, 32))
    value_part = float(ant_ppo.ppo_loss(params, batch, args)[0] - ant_ppo.ppo_loss(params, batch,
                                                                                     replace(args, vf_coef=0.0))[0])
    v = np.asarray(ant_ppo.critic_apply(params["critic"], batch.obs)[0], np.float64)
    old, target = np.asarray(batch.value, np.float64), np.asarray(batch.target, np.float64)
    clipped = old + np.clip(v - old, -0.2, 0.2)
    expected = np.mean(np.maximum((v - target) ** 2, (clipped - target) ** 2))
    np.testing.assert_allclose(value_part, expected, rtol=1e-5)
    assert abs(expected - 0.5 * np.mean((v - target) ** 2)) > 0.1 * expected  # not PureJaxRL's 0.5 x MSE
    assert abs(expected - np.mean((v - target) ** 2)) > 0.01 * expected  # the clipped term matters here


def test_er_step_ascends_the_sum_of_actor_and_critic_ranks():
    """The authors' ER objective on Ant is the actor's effective rank plus the critic's: each network's step is
    er_lr x the gradient of its own rank (a mean of the two would halve it)."""
    params = ant_ppo.init_params(jax.random.key(0), 16)
    obs = jax.random.normal(jax.random.key(1), (64, ant_ppo.OBS_DIM))
    stepped = jax.jit(lambda p: ant_ppo.er_step(p, obs, 1e-2), compiler_options=FAST_COMPILE)(params)
    for i, net in enumerate(("actor", "critic")):
        own = jax.grad(lambda p: common.effective_rank(ant_ppo.hidden_features(p, obs)[i]))(params)
        for layer in ("hidden", "out"):
            for leaf in ("w", "b"):
                np.testing.assert_allclose(stepped[net][layer][leaf] - params[net][layer][leaf],
                                           1e-2 * np.asarray(own[net][layer][leaf]), rtol=2e-3, atol=1e-7,
                                           err_msg=f"{net} {layer} {leaf}")
        assert np.abs(np.asarray(own[net]["hidden"]["w"])).max() > 1e-3


def test_er_step_before_the_epoch_and_metrics_of_the_acting_policy():
    """One update of one epoch of one minibatch (the whole rollout) with a large ER step: the PPO loss recorded
    for its Adam step is that of the parameters after the ER step (the authors take it before each epoch's Adam
    steps), and the dead units and effective ranks are the acting parameters' on the rollout (before the update,
    as the authors record them), not the updated ones'."""
    args = ant_ppo.Args(**{**TINY, "agent": "er", "update_epochs": 1, "num_minibatches": 1})
    agent, _ = ant_ppo.resolve(args)
    init, train, _ = ant_ppo.make_train(args, agent)
    state = init(0)
    hp = {"lr": jnp.float32(1e-4), "weight_decay": jnp.float32(0.0), "er_lr": jnp.float32(0.5)}
    new_state, metrics = jax.jit(train, compiler_options=FAST_COMPILE)(state, hp, 0, 1)

    @partial(jax.jit, compiler_options=FAST_COMPILE)
    def by_hand(state, new_params):  # the update's rollout again (same key), then what each order would record
        _, k_roll, _ = jax.random.split(jax.random.wrap_key_data(state["key"]), 3)
        _, traj, last_obs = ant_ppo.rollout(args, state["params"], state["env"], state["obs_stats"], state["steps"],
                                            k_roll, ant_ppo.schedule(args, ant_ppo.member_keys(0)[3]))
        batch = ant_ppo.make_batch(args, state["params"], traj, last_obs)
        after_er = ant_ppo.er_step(state["params"], batch.obs, 0.5)
        losses = [ant_ppo.ppo_loss(p, batch, args)[0] for p in (after_er, state["params"])]
        acting = ant_ppo.hidden_features(state["params"], batch.obs)
        return (losses, common.effective_ranks(acting), jnp.stack([common.dead_units(f) for f in acting]),
                common.effective_ranks(ant_ppo.hidden_features(new_params, batch.obs)))

    (loss_after_er, loss_before), acting_ranks, acting_dead, updated = by_hand(state, new_state["params"])
    np.testing.assert_allclose(metrics["loss"][0], loss_after_er, rtol=1e-4)
    assert abs(loss_after_er - loss_before) > 10 * 1e-4 * abs(loss_before)  # 10x the tolerance above
    np.testing.assert_allclose(metrics["effective_rank"][0], acting_ranks, rtol=1e-5)
    np.testing.assert_array_equal(metrics["dead_units"][0], acting_dead)
    assert np.abs(np.asarray(updated) - metrics["effective_rank"][0]).max() > 1e-2


@pytest.fixture(scope="module")
def redo_case():
    """Actor and critic (width 16) with planted dormant units, and ReDo at tau 0.025 on the activations of 64
    observations, due and not due."""
    args = ant_ppo.Args(**TINY)
    agent, _ = ant_ppo.resolve(replace(args, agent="redo"))
    assert (agent["redo_tau"], agent["redo_every"], agent["weight_decay"]) == (0.1, 100, 1e-4)  # Dohare et al.'s
    agent = {**agent, "redo_tau": 0.025}
    params = ant_ppo.init_params(jax.random.key(0), 16)
    actor, critic = params["actor"]["hidden"], params["critic"]["hidden"]
    # actor units 0, 1 dead (bias -100); unit 2 barely active (incoming weights x 1e-3); critic unit 5 dead
    params["actor"]["hidden"] = {"w": actor["w"].at[:, 2].multiply(1e-3), "b": actor["b"].at[:2].set(-100.0)}
    params["critic"]["hidden"] = {**critic, "b": critic["b"].at[5].set(-100.0)}
    params["critic"]["out"]["b"] = params["critic"]["out"]["b"] + 0.3
    params["actor"]["log_std"] = params["actor"]["log_std"] - 0.2
    obs = jax.random.normal(jax.random.key(1), (64, ant_ppo.OBS_DIM))
    step = jax.jit(lambda p, due: ant_ppo.redo_step(agent, p, ant_ppo.hidden_features(p, obs), jax.random.key(2), due),
                   compiler_options=FAST_COMPILE)
    return params, obs, step(params, True), step(params, False)


def test_redo_recycles_only_dormant_units_keeping_the_outputs(redo_case):
    """The Adam moments are not the step's to touch (Dohare et al.'s GnTredo keeps them): it takes none."""
    before, obs, params, idle_params = redo_case
    recycled = {}
    for net, planted in (("actor", [0, 1, 2]), ("critic", [5])):
        h = np.asarray(ant_ppo.hidden_features(before, obs)[0 if net == "actor" else 1], np.float64)
        score = np.abs(h).mean(0) / np.abs(h).mean(0).mean()  # Sokar et al.'s score, by hand
        dormant = score <= 0.025
        np.testing.assert_array_equal(np.flatnonzero(dormant), planted)
        recycled[net] = dormant
        old, new = before[net], params[net]
        # dormant units: fresh incoming weights, bias 0, outgoing weights 0; every other entry untouched
        assert np.all(np.asarray(new["hidden"]["w"] != old["hidden"]["w"])[:, dormant])
        np.testing.assert_array_equal(new["hidden"]["w"][:, ~dormant], old["hidden"]["w"][:, ~dormant])
        np.testing.assert_array_equal(new["hidden"]["b"], np.where(dormant, 0.0, old["hidden"]["b"]))
        np.testing.assert_array_equal(new["out"]["w"], np.where(dormant[:, None], 0.0, old["out"]["w"]))
        np.testing.assert_array_equal(new["out"]["b"], old["out"]["b"])  # output layer never recycled
        fresh = np.abs(np.asarray(new["hidden"]["w"])[:, dormant])  # Dohare's bound sqrt(6 / fan-in), fan-in 27
        assert fresh.max() <= common.kaiming_bound(ant_ppo.OBS_DIM) and fresh.max() > np.sqrt(3 / ant_ppo.OBS_DIM)
    np.testing.assert_array_equal(params["actor"]["log_std"], before["actor"]["log_std"])
    # the policy and the value lose only what the dormant units added (outgoing weights 0: the fresh units add
    # nothing), on these observations and on others
    for x in (obs, 3.0 * jax.random.normal(jax.random.key(7), (32, ant_ppo.OBS_DIM))):
        for i, (apply, net) in enumerate(((ant_ppo.actor_apply, "actor"), (ant_ppo.critic_apply, "critic"))):
            h = np.asarray(ant_ppo.hidden_features(before, x)[i], np.float64)[:, recycled[net]]
            lost = (h @ np.asarray(before[net]["out"]["w"], np.float64)[recycled[net]]).reshape(
                np.shape(apply(before[net], x)[0]))
            np.testing.assert_allclose(apply(params[net], x)[0], np.asarray(apply(before[net], x)[0]) - lost,
                                       rtol=1e-5, atol=1e-5)
    # recycled units are alive again on the observations
    assert np.all(np.asarray(ant_ppo.hidden_features(params, obs)[0])[:, :2].max(0) > 0)
    # not due: nothing changes
    for a, b in zip(jax.tree.leaves(idle_params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


# 16 samples of 16 units, each unit on its own scale, so the two utilities rank units differently.
CBP_HIDDEN = np.asarray(jax.random.uniform(jax.random.key(2), (16, 16)) * jnp.linspace(0.5, 2.0, 16)[::-1]
                        + 0.3 * jnp.arange(16))


@pytest.fixture(scope="module")
def cbp_steps():
    """{utility: (params before, (params, Adam state, CBP states) after one CBP step)}, with maturity 0 and
    rate 0.5, both utilities in one compiled program."""
    args = ant_ppo.Args(**{**TINY, "agent": "cbp", "replacement_rate": 0.5, "maturity_threshold": 0})
    agents = {u: ant_ppo.resolve(replace(args, cbp_utility=u))[0] for u in common.CBP_UTILITIES}
    assert [agent["cbp_utility"] for agent in agents.values()] == list(common.CBP_UTILITIES)

    @partial(jax.jit, compiler_options=FAST_COMPILE)
    def steps():
        params = ant_ppo.init_params(jax.random.key(0), 16)
        out = {}
        for utility, agent in agents.items():
            opt = common.adam(1e-3, agent["beta1"], agent["beta2"], args.adam_eps, 0.0)
            _, opt_state = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)
            cbp = (common.cbp_init(16), common.cbp_init(16))
            out[utility] = (params, ant_ppo.cbp_step(agent, opt, params, opt_state, cbp, [jnp.asarray(CBP_HIDDEN)] * 2,
                                                     jax.random.key(1)))
        return out

    return steps()


@pytest.mark.parametrize("utility", common.CBP_UTILITIES)
def test_cbp_replaces_units(utility, cbp_steps):
    """With maturity 0 and a high rate, CBP replaces units on the first update: their outgoing weights are
    reset to 0 and their Adam moments zeroed (checked directly on one CBP step), with either utility."""
    before, (params, opt_state, cbp) = cbp_steps[utility]
    h = CBP_HIDDEN
    replaced = np.asarray(cbp[0].age == 0)
    # First step (age 1): the bias-corrected utility is this step's utility; rate 0.5 x 16 mature units = the
    # 8 lowest are replaced.
    w_in, w_out = np.asarray(before["actor"]["hidden"]["w"]), np.asarray(before["actor"]["out"]["w"])
    if utility == "contribution":
        expected = np.abs(h).mean(0) * np.abs(w_out).mean(1)
    else:
        expected = np.abs(h - h.mean(0)).mean(0) * np.abs(w_out).mean(1) / np.abs(w_in).mean(0)
    np.testing.assert_array_equal(np.flatnonzero(replaced), np.sort(np.argsort(expected)[:8]))
    np.testing.assert_array_equal(params["actor"]["out"]["w"][replaced], 0.0)
    assert np.all(np.asarray(params["actor"]["hidden"]["w"] != before["actor"]["hidden"]["w"])[:, replaced])
    np.testing.assert_array_equal(params["actor"]["hidden"]["w"][:, ~replaced], before["actor"]["hidden"]["w"][:, ~replaced])
    mu = opt_state[1][0].mu
    np.testing.assert_array_equal(mu["actor"]["hidden"]["w"][:, replaced], 0.0)
    assert np.all(np.asarray(mu["actor"]["hidden"]["w"][:, ~replaced]) != 0.0)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_envs=3), "multiple of --num-envs"),
    (dict(change_every=30), "--change-every"),
    (dict(agent="bp", er_lr=(1e-3,)), "--er-lr does not apply to agent bp \\(only er, l2-er\\)"),
    (dict(agent="bp", weight_decay=(1e-3,)),
     "--weight-decay does not apply to agent bp \\(only l2, l2-er, cbp, layernorm-l2, redo\\)"),
    (dict(agent="l2", replacement_rate=1e-4), "--replacement-rate does not apply to agent l2"),
    (dict(agent="er", decay_rate=0.9), "--decay-rate does not apply to agent er"),
    (dict(agent="bp", spectral_lambda=1e-3), "--spectral-lambda does not apply to agent bp \\(only spectral-reg\\)"),
    (dict(agent="l2", layer_norm=True), "--layer-norm does not apply to agent l2 \\(only layernorm-l2\\)"),
    (dict(agent="spectral-reg", redo_tau=0.1), "--redo-tau does not apply to agent spectral-reg \\(only redo\\)"),
    (dict(agent="spectral-reg", power_iters=0), "--power-iters >= 1"),
    (dict(agent="redo", redo_every=0), "--redo-every >= 1"),
    (dict(agent="nope"), "unknown agent"),
    (dict(total_steps=10), "--total-steps"),
    (dict(fixed_friction=0.0), "--fixed-friction"),
    (dict(frictions=(0.3, -0.1)), "--frictions must be > 0"),
    (dict(random_frictions=True, fixed_friction=1.0), "exclude each other"),
    (dict(solver_iterations=0), "--solver-iterations"),
    (dict(physics="brax", contacts="all"), "--contacts applies only to --physics mjx"),
    (dict(physics="brax", bootstrap_timeouts=True), "--bootstrap-timeouts applies only to --physics mjx"),
    (dict(agent="cbp", cbp_utility="nope"), "--cbp-utility must be one of contribution, adaptable_contribution"),
    (dict(agent="cbp", replacement_rate=2.0), "--replacement-rate must be in"),
    (dict(beta1=1.0), "--beta1 and --beta2"),
    (dict(lr=(0.0,)), "--lr needs"),
    (dict(resume=True, out_dir=None), "--resume needs --out-dir"),
])
def test_bad_input_fails_cleanly(overrides, message):
    with pytest.raises(SystemExit, match=message):
        ant_ppo.main(ant_ppo.Args(**{**TINY, **overrides}))


def test_command_line_error_is_one_line():
    root = Path(ant_ppo.__file__).resolve().parent
    proc = subprocess.run([sys.executable, "ant_ppo.py", "--agent", "bp", "--er-lr", "1e-3"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --er-lr does not apply to agent bp (only er, l2-er)"
