"""Tests of ant_ppo.py: the Ant env, the slippery friction schedule, GAE, time-out bootstrapping, every agent
end to end, seeds/configs trained together, resume and the Hessian measurement.

MJX programs take tens of seconds to compile on a CPU, so every end-to-end run shares one tiny shape
(4 envs x 16 steps per update, 2 updates, width 16) and one compiled program per agent family.
"""
import subprocess
import sys
from pathlib import Path

import ant_ppo  # first: it sets OPENBLAS_NUM_THREADS before jax loads LAPACK
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import common

TINY = dict(num_envs=4, num_steps=64, num_minibatches=4, update_epochs=2, hidden_size=16, total_steps=128,
            change_every=32, episode_length=8, updates_per_chunk=1, hessian_iters=4, fast_compile=True)
METRICS = ("episodic_return", "episodes", "friction", "loss", "dead_units", "effective_rank", "param_norm")
# Programs compile without XLA's backend optimizations here (as --fast-compile): half the compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run(tmp_path, name, **overrides):
    out = tmp_path / name
    ant_ppo.main(ant_ppo.Args(**{**TINY, "out_dir": str(out), **overrides}))
    with np.load(out / "metrics.npz") as f:
        return out, {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------
EPISODE_LENGTH = 1000


@pytest.fixture(scope="module")
def step4():
    """env_step over a batch of 4 envs, each with its own friction (one compiled program for all env tests)."""
    return jax.jit(jax.vmap(lambda s, a, f, k: ant_ppo.env_step(s, a, f, k, EPISODE_LENGTH)),
                   compiler_options=FAST_COMPILE)


def reset4(seed=0):
    return jax.vmap(ant_ppo.env_reset)(jax.random.split(jax.random.key(seed), 4))


def test_model_and_shapes(step4):
    mj_model, model = ant_ppo.ant_model()
    assert (mj_model.nq, mj_model.nv, mj_model.nu) == (15, 14, 8) and ant_ppo.ACT_DIM == mj_model.nu
    assert mj_model.opt.solver == 2 and mj_model.opt.iterations == 1 and mj_model.opt.ls_iterations == 4
    assert mj_model.opt.timestep == 0.01 and ant_ppo.DT == pytest.approx(0.05)
    np.testing.assert_array_equal(mj_model.actuator_gear[:, 0], 150.0)
    state = reset4()
    obs = jax.vmap(ant_ppo.observe)(state)
    assert obs.shape == (4, ant_ppo.OBS_DIM) == (4, 27)
    np.testing.assert_allclose(obs[:, :13], state.qpos[:, 2:])  # x, y left out
    action = jnp.linspace(-2.0, 2.0, 32).reshape(4, 8)
    nxt, info = step4(state, action, jnp.ones(4), jax.random.split(jax.random.key(1), 4))
    assert nxt.qpos.shape == (4, 15) and info.final_obs.shape == (4, 27)
    # reward = forward velocity + 1 - 0.5 |clip(a)|^2 (nothing terminates in one step from a reset)
    assert not np.any(info.terminated | info.truncated)
    velocity = (nxt.qpos[:, 0] - state.qpos[:, 0]) / ant_ppo.DT
    expected = velocity + 1.0 - 0.5 * jnp.sum(jnp.clip(action, -1, 1) ** 2, axis=1)
    np.testing.assert_allclose(info.reward, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nxt.t, 1)


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
    assert 0.6 < nxt.qpos[1, 2] < 0.9          # the env restarted near the initial height (0.75)
    np.testing.assert_allclose(nxt.qpos[0], step4(state, jnp.zeros((4, 8)), jnp.ones(4),
                                                  jax.random.split(jax.random.key(3), 4))[0].qpos[0])


def test_friction_on_every_geom_changes_dynamics(step4):
    _, model = ant_ppo.ant_model()
    slippery = ant_ppo.with_friction(model, 0.05)
    assert model.geom_friction.shape[0] == 14  # floor, torso, 12 leg capsules
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


def test_friction_schedule():
    key = jax.random.key(7)
    rng = (0.02, 2.0)
    values = np.asarray([ant_ppo.phase_friction(key, p, rng, None) for p in range(200)])
    assert np.all((values >= 0.02) & (values <= 2.0)) and len(np.unique(values)) == 200
    # log-uniform: log-frictions spread evenly over [log 0.02, log 2] (mean at the middle, 1/3 below 0.093)
    assert abs(np.log(values).mean() - np.log(0.2)) < 0.35
    assert 0.2 < np.mean(values < 0.02 * 100 ** (1 / 3)) < 0.47
    assert float(ant_ppo.phase_friction(jax.random.key(8), 0, rng, None)) != values[0]  # depends on the seed
    assert float(ant_ppo.phase_friction(key, 3, rng, 1.0)) == 1.0


# ----------------------------------------------------------------------------------------------------------
# Rollout: friction change at exactly --change-every, time-out bootstrap; GAE
# ----------------------------------------------------------------------------------------------------------
def test_rollout_friction_change_and_timeout_bootstrap():
    _, static = ant_ppo.resolve(ant_ppo.Args(**{**TINY, "change_every": 8}))
    member = jax.tree.map(lambda x: x[0], ant_ppo.build(static)[0](jnp.asarray([3])))
    sched = ant_ppo.schedule(static, member.friction_key)
    delta = 0.5

    shifted = jax.tree.map(lambda x: x, member.params)
    shifted["critic"]["out"]["b"] = shifted["critic"]["out"]["b"] + delta
    pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), member.params, shifted)
    go = lambda p: ant_ppo.rollout(static, p, member.env, member.obs_stats, member.steps, jax.random.key(5), sched)
    carry, traj, _ = jax.jit(jax.vmap(go), compiler_options=FAST_COMPILE)(pair)
    traj, traj_shifted = (jax.tree.map(lambda x: x[i], traj) for i in (0, 1))
    carry = jax.tree.map(lambda x: x[0], carry)
    steps_per_update = static.num_steps // static.num_envs
    assert traj.obs.shape == (steps_per_update, 4, 27) and traj.action.shape == (steps_per_update, 4, 8)
    assert int(carry[2]) == static.num_steps
    # The friction switches exactly every change_every = 8 env steps = 2 vector steps of 4 envs.
    expected = [float(ant_ppo.phase_friction(member.friction_key, t * 4 // 8, static.friction_range, None))
                for t in range(steps_per_update)]
    np.testing.assert_allclose(traj.friction[:, 0], expected, rtol=1e-6)
    assert len(set(expected)) == steps_per_update // 2
    # The critic does not act, so both rollouts are the same; their rewards differ by gamma * (V shift) at
    # time-outs only (the bootstrapped value of the final state), never at terminations or other steps.
    np.testing.assert_array_equal(traj.action, traj_shifted.action)
    diff = np.asarray(traj_shifted.reward - traj.reward)
    timeout = np.abs(diff - 0.99 * delta) < 1e-4
    assert timeout.sum() >= 1
    assert np.all(np.asarray(traj.done)[timeout])
    np.testing.assert_allclose(diff[~timeout], 0.0, atol=1e-4)


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
@pytest.fixture(scope="module")
def bp_two_seeds(tmp_path_factory):
    return run(tmp_path_factory.mktemp("bp"), "bp", agent="bp", seeds=2)


def check_outputs(metrics, num_c, num_s, num_updates=2):
    for k in METRICS:
        assert metrics[k].shape[:3] == (num_c, num_s, num_updates), k
    assert metrics["dead_units"].shape[3] == metrics["effective_rank"].shape[3] == 2
    assert np.all(np.isfinite(metrics["loss"])) and np.all(np.isfinite(metrics["param_norm"]))
    assert np.all((metrics["effective_rank"] >= 1) & (metrics["effective_rank"] <= TINY["hidden_size"]))
    assert np.all((metrics["dead_units"] >= 0) & (metrics["dead_units"] <= TINY["hidden_size"]))
    assert np.all((metrics["friction"] >= 0.02) & (metrics["friction"] <= 2.0))
    # Episodes of at most 8 steps end during every 16-step rollout.
    assert np.all(metrics["episodes"] >= TINY["num_envs"]) and np.all(np.isfinite(metrics["episodic_return"]))
    assert not metrics["diverged"].any()
    np.testing.assert_array_equal(metrics["env_steps"], [64, 128])


def test_bp_end_to_end(bp_two_seeds):
    out, metrics = bp_two_seeds
    check_outputs(metrics, 1, 2)
    # A different schedule per seed; change_every 32 < 64 samples per update: phase 1 ends update 0.
    f = metrics["friction"][0]
    assert f[0, 0] != f[1, 0] and f[0, 0] != f[0, 1]
    assert (out / "config.json").exists() and (out / "checkpoint.pkl").exists()


def test_seeds_and_configs_together_match(tmp_path, bp_two_seeds):
    """Seed 1 trained beside seed 0 == seed 1 trained beside an l2 config of itself (a member's results depend
    on its own seed and config only). Same member count, so both runs share one compiled program."""
    _, together = bp_two_seeds
    _, sweep = run(tmp_path, "sweep", agent="l2", seed=1, seeds=1, weight_decay=(0.0, 1e-2))
    check_outputs(sweep, 2, 1)
    for k in METRICS:
        np.testing.assert_allclose(sweep[k][0, 0], together[k][0, 1], rtol=1e-5, atol=1e-5, err_msg=k)
    assert not np.allclose(sweep["param_norm"][1, 0], sweep["param_norm"][0, 0])  # weight decay acts


def test_seed_alone_matches_seed_together(tmp_path):
    """Seed 1 trained alone (a one-member program) == seed 1 trained beside seed 0, to float rounding.

    The two programs differ in batch shape, so XLA may round differently (~1e-7), and contact dynamics amplify
    that chaotically (measured: 1e-3 in the observations after 16 steps with 8-step episodes). One-step episodes
    (every step starts from a reset, then times out) keep the physics short, so any difference larger than
    rounding would be a real dependence on the other seed."""
    short = dict(agent="bp", episode_length=1)
    _, together = run(tmp_path, "together", seeds=2, **short)
    _, alone = run(tmp_path, "alone", seed=1, seeds=1, **short)
    assert (together["episodes"] == TINY["num_steps"]).all()  # every step ended an episode
    for k in METRICS:
        np.testing.assert_allclose(alone[k][0, 0], together[k][0, 1], rtol=1e-4, atol=1e-5, err_msg=k)
    assert not np.allclose(together["param_norm"][0, 0], together["param_norm"][0, 1])  # seeds differ


def test_resume_matches_uninterrupted(tmp_path, bp_two_seeds):
    _, full = bp_two_seeds
    run(tmp_path, "resumed", agent="bp", seeds=2, total_steps=64)
    out, resumed = run(tmp_path, "resumed", agent="bp", seeds=2, total_steps=128, resume=True)
    for k in METRICS:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    with pytest.raises(SystemExit, match="different settings.*gamma"):
        run(tmp_path, "resumed", agent="bp", seeds=2, total_steps=128, resume=True, gamma=0.9)
    with pytest.raises(SystemExit, match="already holds a run"):  # a new run never overwrites one
        run(tmp_path, "resumed", agent="bp", seeds=2)


def test_resume_longer_run_off_the_chunk_edges(tmp_path):
    """3 updates in chunks of 2 (edges 0, 2, 3), resumed to 5 (edges 0, 2, 4, 5): update 3 is not an edge of the
    longer run, and the resumed run must still do exactly updates 4 and 5."""
    longer = dict(agent="bp", updates_per_chunk=2, change_every=640)
    _, full = run(tmp_path, "full", total_steps=320, **longer)
    run(tmp_path, "resumed", total_steps=192, **longer)
    _, resumed = run(tmp_path, "resumed", total_steps=320, resume=True, **longer)
    for k in METRICS:
        assert resumed[k].shape[2] == 5, k
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)


@pytest.mark.parametrize("agent", ["er", "l2-er"])
def test_er_agents_end_to_end(tmp_path, agent):
    _, metrics = run(tmp_path, agent, agent=agent, er_lr=(0.5,))
    check_outputs(metrics, 1, 1)


def test_cbp_end_to_end_with_hessian(tmp_path):
    # A high replacement rate and no maturity wait, so units are replaced in this short run.
    cbp = dict(agent="cbp", replacement_rate=0.05, maturity_threshold=0, change_every=64)
    out, metrics = run(tmp_path, "cbp_h", hessian_every_phase=True, **cbp)
    check_outputs(metrics, 1, 1)
    with np.load(out / "hessian.npz") as f:
        spectra = {k: f[k] for k in f.files}
    np.testing.assert_array_equal(spectra["tasks"], [0, 1])  # one phase per update here
    for k in ("init_nodes", "init_weights", "end_nodes", "end_weights"):
        assert spectra[k].shape == (1, 1, 2, 1, TINY["hessian_iters"]) and np.all(np.isfinite(spectra[k])), k
    np.testing.assert_allclose(spectra["init_weights"].sum(-1), 1.0, rtol=1e-4)
    # Measuring the Hessian (on copies of the envs) leaves training untouched.
    _, plain = run(tmp_path, "cbp", **cbp)
    for k in METRICS:
        np.testing.assert_array_equal(plain[k], metrics[k], err_msg=k)


def test_cbp_replaces_units():
    """With maturity 0 and a high rate, CBP replaces units on the first update: their outgoing weights are
    reset to 0 and their Adam moments zeroed (checked directly on one CBP step)."""
    _, static = ant_ppo.resolve(ant_ppo.Args(**{**TINY, "agent": "cbp", "replacement_rate": 0.5,
                                                "maturity_threshold": 0}))
    hyper = ant_ppo.Hyper(jnp.float32(1e-3), jnp.float32(0.0), jnp.float32(0.0))

    @jax.jit
    def one_cbp_step():
        opt = ant_ppo.optimizer(static, hyper)
        params = ant_ppo.init_params(jax.random.key(0), 16)
        grads = jax.tree.map(jnp.ones_like, params)
        _, opt_state = opt.update(grads, opt.init(params), params)
        cbp = (common.cbp_init(16), common.cbp_init(16))
        hiddens = [jnp.ones((16, 16)), jnp.ones((16, 16))]
        return params, ant_ppo.cbp_step(static, opt, params, opt_state, cbp, hiddens, jax.random.key(1))

    before, (params, opt_state, cbp) = one_cbp_step()
    replaced = np.asarray(cbp[0].age == 0)
    assert replaced.sum() >= 1
    np.testing.assert_array_equal(params["actor"]["out"]["w"][replaced], 0.0)
    assert np.all(np.asarray(params["actor"]["hidden"]["w"] != before["actor"]["hidden"]["w"])[:, replaced])
    np.testing.assert_array_equal(params["actor"]["hidden"]["w"][:, ~replaced], before["actor"]["hidden"]["w"][:, ~replaced])
    mu = opt_state[1][0].mu
    np.testing.assert_array_equal(mu["actor"]["hidden"]["w"][:, replaced], 0.0)
    assert np.all(np.asarray(mu["actor"]["hidden"]["w"][:, ~replaced]) != 0.0)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_envs=3), "multiple of --num-envs"),
    (dict(change_every=30), "--change-every"),
    (dict(agent="bp", er_lr=(1e-3,)), "--er-lr applies"),
    (dict(agent="l2", replacement_rate=1e-4), "--replacement-rate applies"),
    (dict(agent="nope"), "unknown agent"),
    (dict(total_steps=10), "--total-steps"),
    (dict(fixed_friction=0.0), "--fixed-friction"),
    (dict(resume=True, out_dir=None), "--resume needs --out-dir"),
])
def test_bad_input_fails_cleanly(overrides, message):
    with pytest.raises(SystemExit, match=message):
        ant_ppo.main(ant_ppo.Args(**{**TINY, **overrides}))
