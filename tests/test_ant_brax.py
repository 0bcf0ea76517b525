"""Tests of ant_ppo.py's --physics brax: Brax's own Ant on its positional pipeline (the authors' engine), with the
friction set on its system every step as their wrapper does, Brax's episode and auto-reset handling, and every
agent training on it. Brax's programs take ~20-40 s each to compile on a CPU, so the env tests share one."""
import ant_ppo  # first: it sets OPENBLAS_NUM_THREADS before jax loads LAPACK
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_ant_ppo import FAST_COMPILE, METRICS, check_outputs, printed_run, run

CFG = ant_ppo.EnvConfig(physics="brax", episode_length=5)
STEPS = 12
# Two starts: key 0 stays healthy under the gait below; key 3's start pops above the healthy height (z > 1) at
# its third step. (About a quarter of Brax positional Ant's random starts do so within 20 steps of zero action,
# and its auto-reset returns to the same start every time.)
START_KEYS = (0, 3)


@pytest.fixture(scope="module")
def stepped():
    """STEPS steps of a fixed gait from both starts at friction 1.0 and 0.02: ours (brax_step) and by hand (Brax's
    wrapped env with its system's geom_friction[:, 0] replaced, as the authors' NonstationaryFrictionBraxWrapper)."""
    env = ant_ppo.brax_ant(CFG.episode_length)
    sys0 = env.unwrapped.sys
    starts = jax.vmap(lambda k: ant_ppo.brax_reset(CFG, k))(jnp.stack([jax.random.key(k) for k in START_KEYS]))
    gait = 0.3 * jnp.sin(jnp.arange(STEPS)[:, None] * 0.5 + jnp.arange(8)[None, :])

    def by_hand(state, action, friction):
        env.unwrapped.sys = sys0.replace(geom_friction=sys0.geom_friction.at[:, 0].set(friction))
        try:
            return env.step(state, action)
        finally:
            env.unwrapped.sys = sys0

    def ours_and_theirs(start, friction):
        ours = jax.lax.scan(lambda s, a: (lambda out: (out[0], out))(ant_ppo.brax_step(CFG, s, a, friction, None)),
                            start, gait)[1]
        theirs = jax.lax.scan(lambda s, a: (by_hand(s, a, friction),) * 2, start.brax, gait)[1]
        return ours, theirs

    both = jax.jit(jax.vmap(ours_and_theirs, in_axes=(0, None)), compiler_options=FAST_COMPILE)
    return starts, {friction: both(starts, friction) for friction in (1.0, 0.02)}, env


def test_brax_friction_reaches_the_system(stepped):
    """brax_step at friction f == Brax's env stepped with its system's sliding friction set to f, step for step;
    the two frictions move the ant differently; the shared system keeps its own friction after tracing."""
    _, runs, env = stepped
    for friction, ((states, _), theirs) in runs.items():
        np.testing.assert_array_equal(states.brax.pipeline_state.q, theirs.pipeline_state.q, err_msg=str(friction))
        np.testing.assert_array_equal(states.brax.reward, theirs.reward, err_msg=str(friction))
        np.testing.assert_array_equal(states.brax.done, theirs.done, err_msg=str(friction))
    rough, slippery = (np.asarray(runs[f][0][0].brax.pipeline_state.q) for f in (1.0, 0.02))
    assert np.abs(rough[0, STEPS - 2, :2] - slippery[0, STEPS - 2, :2]).max() > 1e-3  # x, y before the time-out
    np.testing.assert_array_equal(env.unwrapped.sys.geom_friction[:, 0], 1.0)


def test_brax_episodes_time_out_terminate_and_restart_from_the_first_state(stepped):
    """Brax's episode wrapper: a time-out at episode_length (truncated, not terminated); the healthy-height rule
    (terminated); either way the auto-reset returns to the env's first start state and the return restarts."""
    starts, runs, _ = stepped
    (states, info), _ = runs[1.0]
    steps = np.arange(STEPS)
    # start 0: healthy, episodes of 5 steps
    np.testing.assert_array_equal(info.truncated[0], steps % 5 == 4)
    assert not np.asarray(info.terminated[0]).any()
    np.testing.assert_allclose(info.episode_return[0, 4], np.asarray(info.reward[0, :5]).sum(), rtol=1e-5)
    np.testing.assert_allclose(info.episode_return[0, 9], np.asarray(info.reward[0, 5:10]).sum(), rtol=1e-5)
    # start 1: its torso leaves the healthy range at the third step, and again in every later episode, before
    # the time-out
    popped = np.flatnonzero(info.terminated[1])
    assert popped[0] == 2 and len(popped) >= 3 and not np.asarray(info.truncated[1]).any()
    np.testing.assert_allclose(info.episode_return[1, popped[1]],
                               np.asarray(info.reward[1, popped[0] + 1:popped[1] + 1]).sum(), rtol=1e-5)
    for i, ends in ((0, [4, 9]), (1, popped)):
        for t in ends:
            np.testing.assert_array_equal(states.brax.pipeline_state.q[i, t], starts.brax.pipeline_state.q[i])
            np.testing.assert_array_equal(ant_ppo.brax_observe(jax.tree.map(lambda x: x[i, t], states)),
                                          starts.brax.obs[i])
            assert float(states.ret[i, t]) == 0.0


@pytest.mark.parametrize("agent", ant_ppo.AGENTS)
def test_brax_physics_runs_every_agent(agent, tmp_path):
    out, metrics = printed_run(tmp_path, agent, agent=agent, physics="brax")
    check_outputs(metrics, 1, 1)
    assert f"ant_ppo {agent} on brax" in (out / "stdout.txt").read_text()


def test_brax_same_seed_same_numbers(tmp_path):
    """Seed 1 beside seed 0 == seed 1 alone, and a rerun gives the same numbers bit for bit."""
    _, pair = run(tmp_path, "pair", agent="l2-er", physics="brax", seeds=2, member_batching="map")
    _, alone = run(tmp_path, "alone", agent="l2-er", physics="brax", seed=1, member_batching="map")
    _, again = run(tmp_path, "again", agent="l2-er", physics="brax", seed=1, member_batching="map")
    for k in METRICS:
        np.testing.assert_array_equal(alone[k][0, 0], pair[k][0, 1], err_msg=k)
        np.testing.assert_array_equal(again[k], alone[k], err_msg=k)
    assert not np.allclose(pair["param_norm"][0, 0], pair["param_norm"][0, 1])
