"""plot.py on small synthetic run directories written in the exact run-output format (README).

Checks: every expected PNG is written (and the skip notices), the 95% band equals hand-computed t-intervals
(NaN seeds excluded), Savitzky-Golay smoothing equals the hand-computed filter, the curvature R^2 equals a
hand-computed value, both eps-rank routes (smoothed density, quadrature weights) equal hand-computed values,
and bad input exits with status 1 and one line.
"""
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tyro  # noqa: E402

import plot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_run(path, script, agent, configs, seeds, metrics, hessian=None):
    """A run directory as the experiment scripts write it: config.json, metrics.npz, hessian.npz."""
    path.mkdir(parents=True)
    config = {"script": script, "agent": agent, "args": {"agent": agent, "seed": seeds[0], "seeds": len(seeds)},
              "configs": configs, "seeds": seeds, "git": "synthetic"}
    (path / "config.json").write_text(json.dumps(config))
    np.savez_compressed(path / "metrics.npz", diverged=np.zeros((len(configs), len(seeds)), bool), **metrics)
    if hessian is not None:
        np.savez_compressed(path / "hessian.npz", **hessian)
    return path


def spectra(x):
    """Hessian arrays [C=1, S, K, probes=1, iters=2] whose normalized eps-rank (eps=0.1) is x[s, k]:
    nodes 0 and 1 with weights 1-x and x. Both routes give x: the smoothed density's grid [-0.01, 1.01] is
    symmetric about the two nodes, so each keeps the same share of its kernel mass."""
    x = np.asarray(x, np.float32)[None, :, :, None, None]  # [1, S, K, 1, 1]
    nodes = np.broadcast_to(np.array([0.0, 1.0], np.float32), x.shape[:-1] + (2,)).copy()
    weights = np.concatenate([1.0 - x, x], axis=-1)
    return nodes, weights


# eps-rank and accuracy per measured task, chosen so that the seed means are
# x = [0.2, 0.4] (bp), [0.6, 0.8] (l2) and y = [0.5, 0.6], [0.8, 0.9].
# By hand: mean x 0.5, mean y 0.7, Sxx = 0.2, Syy = 0.1, Sxy = 0.14, R^2 = 0.14^2 / (0.2 * 0.1) = 0.98.
HAND_R2 = 0.98
MEASURED = [1, 5]


def imagenet_run(root, agent, x_means, y_means, T=8, L=2):
    seeds = [0, 1]
    x = np.array([[m - 0.05 for m in x_means], [m + 0.05 for m in x_means]])  # [S, K]
    acc = np.full((1, 2, T), 0.7)
    for k, t in enumerate(MEASURED):
        acc[0, :, t] = [y_means[k] - 0.02, y_means[k] + 0.02]
    rng = np.random.default_rng(len(agent))
    metrics = dict(test_acc=acc, dead_units=rng.integers(0, 5, (1, 2, T, L)).astype(np.float32),
                   effective_rank=rng.uniform(10, 20, (1, 2, T, L)).astype(np.float32))
    init_nodes, init_weights = spectra(x)
    end_nodes, end_weights = spectra(np.clip(x + 0.1, 0, 1))
    hess = dict(tasks=np.array(MEASURED), init_nodes=init_nodes, init_weights=init_weights,
                end_nodes=end_nodes, end_weights=end_weights)
    return write_run(root / f"imagenet__{agent}__x", "imagenet", agent, [{"lr": 0.01}], seeds, metrics, hess)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = [imagenet_run(root, "bp", [0.2, 0.4], [0.5, 0.6]), imagenet_run(root, "l2", [0.6, 0.8], [0.8, 0.9])]
    T, S, L = 6, 3, 2
    acc = np.linspace(0.3, 0.6, T)[None, None, :] + np.zeros((2, S, T))
    acc[1, 2, 3:] = np.nan  # one seed of the second config diverges at task 3
    units = dict(dead_units=np.ones((2, S, T, L)), effective_rank=np.ones((2, S, T, L)))
    runs.append(write_run(root / "cifar__l2_er__x", "cifar", "l2_er",
                          [{"lr": 0.01, "er_lr": 1e-3}, {"lr": 0.01, "er_lr": 1e-4}], list(range(S)),
                          dict(test_acc=acc, **units)))
    runs.append(write_run(root / "cifar__reset__x", "cifar", "reset", [{"lr": 0.01}], list(range(S)),
                          dict(test_acc=acc[:1] - 0.1, **{k: v[:1] for k, v in units.items()})))
    ant_nodes, ant_weights = spectra([[0.3, 0.5], [0.4, 0.6]])
    ant_nodes[0, 1, 1] = np.nan  # seed 1 diverged before phase 1: its spectrum is left out there
    ant_hess = dict(tasks=np.array([0, 1]), init_nodes=ant_nodes, init_weights=ant_weights,
                    end_nodes=ant_nodes, end_weights=ant_weights)
    runs.append(write_run(root / "ant_ppo__bp__x", "ant_ppo", "bp", [{"lr": 3e-4}], [0, 1],
                          dict(episodic_return=np.cumsum(np.ones((1, 2, 20)), axis=-1),
                               friction=np.tile([0.2961] * 7 + [0.2399] * 6 + [0.0387] * 7, (1, 2, 1))),
                          ant_hess))
    out = root / "figures"
    args = plot.Args(run_dirs=tuple(runs), out=out, smooth=5, tasks=(2, 5))  # from 1: measured 2 and 6
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        written, r2 = plot.main(args)
    return dict(out=out, written=written, r2=r2, stdout=stdout.getvalue())


def test_figures_written(result):
    names = {"performance_imagenet.png", "units_rank_imagenet.png", "hessian_imagenet.png",
             "curvature_imagenet.png", "performance_cifar.png", "units_rank_cifar.png", "performance_ant_ppo.png", "hessian_ant_ppo.png"}
    assert {Path(p).name for p in result["written"]} == names
    for name in names:
        assert (result["out"] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = result["stdout"]
    assert "ant_ppo__bp__x: no 'dead_units'" in log  # missing metric: one notice, figure skipped
    assert "cifar: no run has both hessian.npz" in log
    assert "task 5 not measured; nearest measured task 6 drawn" in log
    assert "phase 5 not measured; nearest measured phase 2 drawn" in log
    assert "ant_ppo: no per-task accuracy; curvature figure skipped" in log
    assert "l2_er er_lr=0.0001]: test_acc not finite for seeds [2] at 3 of 6 tasks" in log


def test_ant_friction_phases_are_marked(result):
    """Updates counted from 1: seven at 0.2961, six at 0.2399, seven at 0.0387; a line before updates 8 and 14."""
    import matplotlib.pyplot as plt
    run = plot.load_run(result["out"].parent / "ant_ppo__bp__x")
    phases = plot.friction_phases([run])
    assert [(a, b) for a, b, _ in phases] == [(1, 7), (8, 13), (14, 20)]
    np.testing.assert_allclose([f for *_, f in phases], [0.2961, 0.2399, 0.0387])
    fig, ax = plt.subplots()
    plot.mark_friction_phases(ax, [run])
    assert [line.get_xdata()[0] for line in ax.lines] == [7.5, 13.5]
    assert [text.get_text() for text in ax.texts] == ["friction 0.2961", "friction 0.2399", "friction 0.0387"]
    ax.plot([1, 20], [0, 1], label="bp")
    plot.legend(ax, below=True)  # the friction labels hold the top edge: the legend must not cover them
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().y1 < ax.get_window_extent().y0
    plt.close(fig)


def test_r2_matches_hand_computed(result):
    assert result["r2"] == {"imagenet": pytest.approx(HAND_R2, abs=1e-5)}
    assert "curvature vs accuracy [imagenet], eps=0.1: R^2 = 0.9800" in result["stdout"]
    assert "eps-rank from the smoothed density" in result["stdout"]  # the default route
    slope, intercept, r2 = plot.line_fit([0.2, 0.4, 0.6, 0.8], [0.5, 0.6, 0.8, 0.9])
    assert (slope, intercept, r2) == pytest.approx((0.7, 0.35, HAND_R2))  # slope = Sxy / Sxx = 0.14 / 0.2


def normal_cdf(z):
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def test_eps_rank_routes_match_hand_computed():
    # Spectrum 0: all mass on 0.102, eps 0.1. Its grid is 0.102 +- 0.01 and the kernel variance 1e-5, so the
    # smoothed density keeps [Phi(0.01/s) - Phi(-0.002/s)] / [Phi(0.01/s) - Phi(-0.01/s)] = 0.73683 beyond
    # eps (s = sqrt(1e-5)); the weights put all of it there. Spectrum 1: nodes 0 and 1, weights 0.6 and 0.4:
    # 0.4 by both routes (symmetric grid). Spectrum 2 has diverged (NaN): NaN by both routes.
    s = math.sqrt(1e-5)
    hand = (normal_cdf(0.01 / s) - normal_cdf(-0.002 / s)) / (normal_cdf(0.01 / s) - normal_cdf(-0.01 / s))
    nodes = np.array([[[0.102, 0.102]], [[0.0, 1.0]], [[np.nan, 1.0]]], np.float32)  # [N, probes, iters]
    weights = np.array([[[0.5, 0.5]], [[0.6, 0.4]], [[0.5, 0.5]]], np.float32)
    density = plot.eps_ranks(nodes, weights, 0.1, "density")
    assert density[:2] == pytest.approx([hand, 0.4], abs=1e-4) and np.isnan(density[2])
    weights_route = plot.eps_ranks(nodes, weights, 0.1, "weights")
    assert weights_route[:2] == pytest.approx([1.0, 0.4], abs=1e-6) and np.isnan(weights_route[2])
    assert plot.eps_ranks(nodes[:0], weights[:0], 0.1, "density").shape == (0,)


def test_curvature_figure_uses_the_chosen_route(tmp_path):
    # Two nodes, 0.102 (weight 1-x) and 1 (weight x): the weights put all mass above eps = 0.1 in every task,
    # so their eps-rank has no spread and no line is fitted. The smoothed density keeps a share
    # q = Phi(-0.002/s) / Phi(0.01/s) of the node at 0.102 below eps (both nodes lie 0.01 inside the grid's
    # ends, so each keeps Phi(0.01/s) of its kernel): x' = 1 - q (1 - x), affine in x, so R^2 stays 0.98.
    run = plot.load_run(imagenet_run(tmp_path, "bp", [0.2, 0.4], [0.5, 0.6]))
    other = plot.load_run(imagenet_run(tmp_path, "l2", [0.6, 0.8], [0.8, 0.9]))
    for r in (run, other):
        for when in ("init", "end"):
            r.hessian[f"{when}_nodes"][..., 0] = 0.102
    plot.set_labels([run, other])
    out = tmp_path / "figures"
    out.mkdir()
    for route, want in (("density", HAND_R2), ("weights", None)):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            files, r2 = plot.plot_curvature("imagenet", [run, other], out, plot.Args(run_dirs=(), eps_rank_from=route))
        assert [Path(f).name for f in files] == ["curvature_imagenet.png"]
        if want is None:
            assert np.isnan(r2) and "curvature fit undefined" in stdout.getvalue()
        else:
            assert r2 == pytest.approx(want, abs=2e-3)
            assert "eps-rank from the smoothed density" in stdout.getvalue()


def test_ci_band_matches_hand_computed():
    # Columns: 4 finite seeds; one NaN seed (excluded); a single finite seed (no band).
    values = np.array([[0.80, 0.5, 1.0], [0.84, np.nan, np.nan], [0.90, 0.7, np.nan], [0.86, 0.6, np.nan]])
    # Hand: col 0 mean 0.85, sd = sqrt(0.0052 / 3), t_{0.975,3} = 3.182446305284263 (t table);
    #       col 1 mean 0.6, sd = 0.1, n = 3, t_{0.975,2} = 4.302652729749464.
    half0 = 3.182446305284263 * math.sqrt(0.0052 / 3) / 2
    half1 = 4.302652729749464 * 0.1 / math.sqrt(3)
    mean, half, n = plot.mean_ci(values)
    assert mean == pytest.approx([0.85, 0.6, 1.0])
    assert half[:2] == pytest.approx([half0, half1], rel=1e-9)
    assert np.isnan(half[2]) and list(n) == [4, 3, 1]
    # The drawn line and band are these numbers.
    fig, ax = plt.subplots()
    plot.draw_curve(ax, values[:, :2], "bp", dict(color="C0"), plot.Args(run_dirs=()))
    assert ax.lines[0].get_ydata() == pytest.approx([0.85, 0.6])
    assert list(ax.lines[0].get_xdata()) == [1, 2]  # tasks count from 1, as in the console
    band_y = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band_y.min() == pytest.approx(0.6 - half1) and band_y.max() == pytest.approx(0.85 + half0)
    plt.close(fig)


def test_task_axis_of_a_few_tasks_has_integer_ticks():
    """Three tasks: ticks at whole tasks, not 1.25, 1.50 (matplotlib's default on a short axis)."""
    fig, ax = plt.subplots()
    plot.draw_curve(ax, np.array([[0.5, 0.6, 0.7], [0.6, 0.7, 0.8]]), "bp", dict(color="C0"), plot.Args(run_dirs=()))
    fig.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert len(ticks) >= 2 and all(t == round(t) for t in ticks), ticks
    plt.close(fig)


def test_savgol_matches_hand_computed():
    y = np.array([1.0, 4.0, 2.0, 8.0, 5.0, 7.0, 3.0, 6.0])
    got = plot.savgol(y, 5, 2)
    # Interior: the classic 5-point quadratic weights (-3, 12, 17, 12, -3) / 35.
    for i in range(2, 6):
        assert got[i] == pytest.approx(np.dot([-3, 12, 17, 12, -3], y[i - 2 : i + 3]) / 35)
    # Edges: the quadratic fitted to the first / last 5 points, evaluated there.
    assert got[:2] == pytest.approx(np.polyval(np.polyfit(np.arange(5), y[:5], 2), [0, 1]))
    assert got[-2:] == pytest.approx(np.polyval(np.polyfit(np.arange(5), y[-5:], 2), [3, 4]))
    # A quadratic passes unchanged; NaN splits the series, a 3-point segment (window shrunk to 3) is exact.
    quad = 0.5 * np.arange(9.0) ** 2 - np.arange(9.0)
    assert plot.savgol(quad, 7, 2) == pytest.approx(quad)
    split = np.concatenate([y[:3], [np.nan], y])
    got = plot.savgol(split, 5, 2)
    assert got[:3] == pytest.approx(y[:3]) and np.isnan(got[3]) and got[4:] == pytest.approx(plot.savgol(y, 5, 2))


def test_cli_parses():
    args = tyro.cli(plot.Args, args=["a", "b", "--out", "o", "--smooth", "11", "--tasks", "50", "300", "790", "--eps", "0.2"])
    assert args.run_dirs == (Path("a"), Path("b")) and args.tasks == (50, 300, 790) and args.eps == 0.2
    assert args.eps_rank_from == "density"
    assert tyro.cli(plot.Args, args=["a", "--eps-rank-from", "weights"]).eps_rank_from == "weights"


def test_bad_input(tmp_path):
    not_run = tmp_path / "not_a_run"
    not_run.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in sys.path if p]))
    proc = subprocess.run([sys.executable, "plot.py", str(not_run)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "not a run directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    # In-process: a missing dir, a broken config.json, arrays that do not match config.json, a bad window.
    broken = write_run(tmp_path / "broken", "pmnist", "bp", [{"lr": 0.01}], [0], {"online_acc": np.zeros((1, 1, 3))})
    (broken / "config.json").write_text("{not json")
    mismatch = write_run(tmp_path / "mismatch", "pmnist", "bp", [{"lr": 0.01}], [0, 1], {"online_acc": np.zeros((1, 1, 3))})
    good = write_run(tmp_path / "good", "pmnist", "bp", [{"lr": 0.01}], [0], {"online_acc": np.zeros((1, 1, 3))})
    for args in [plot.Args(run_dirs=(tmp_path / "missing",)), plot.Args(run_dirs=(broken,)),
                 plot.Args(run_dirs=(mismatch,)), plot.Args(run_dirs=(good,), smooth=4), plot.Args(run_dirs=()),
                 plot.Args(run_dirs=(good,), eps=-0.1), plot.Args(run_dirs=(good,), phase_window=0)]:
        with pytest.raises(SystemExit) as e:
            plot.main(args)
        assert e.value.code not in (0, None)


def test_dead_unit_band_is_clipped_to_its_range():
    fig, ax = plt.subplots()
    values = np.array([[0.0, 1.0], [0.0, 0.0], [3.0, 0.0]])  # a wide band around small counts
    plot.draw_curve(ax, values, "bp", dict(color="C0"), plot.Args(run_dirs=()), bounds=(0, 3))
    band_y = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band_y.min() == 0.0 and band_y.max() == 3.0
    plt.close(fig)


def test_window_table_by_hand(tmp_path):
    acc = np.array([[[0.8, 0.9, 0.5, 0.7], [0.6, 0.7, 0.7, 0.9]]])  # [C=1, S=2, T=4]
    run = plot.load_run(write_run(tmp_path / "pmnist__bp__x", "pmnist", "bp", [{"lr": 0.01}], [0, 1],
                                  {"online_acc": acc}))
    plot.set_labels([run])
    lines = plot.window_table("pmnist", [run], ("1-2", "3-4", "2-9")).splitlines()
    # window 1-2: seed means 0.85, 0.65 -> mean 0.75, sd 0.1414, t_{0.975,1} = 12.7062 -> half 1.2706
    # window 3-4: seed means 0.6, 0.8 -> mean 0.7, the same half-width
    assert lines[0] == ("| pmnist run [config] | seeds | online accuracy, tasks 1-2 | online accuracy, tasks 3-4 | "
                        "online accuracy, tasks 2-9 |")
    assert lines[2] == "| pmnist__bp__x [bp] | 2 | 0.7500 +- 1.2706 | 0.7000 +- 1.2706 | n/a (4 done) |"
    proc = subprocess.run([sys.executable, "plot.py", str(tmp_path / "pmnist__bp__x"), "--table", "3-1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--table windows" in proc.stderr


def test_ant_phase_table_by_hand(tmp_path):
    """Two seeds, 2,048 env steps per update, window 4,096 steps = 2 updates; phases at updates 1-4, 5-8, 9-10."""
    friction = np.array([0.3] * 4 + [0.04] * 4 + [0.3] * 2)
    ret = np.array([[1, 2, 3, 4, 2, 2, 6, 6, 5, 5], [3, 4, 5, 6, 1, 3, 8, np.nan, 7, 7]], np.float64)
    dead = np.stack([np.where(np.arange(10) < 4, 1.0, 3.0), np.full(10, 2.0)], -1)
    metrics = {"episodic_return": ret[None], "friction": np.broadcast_to(friction, (1, 2, 10)),
               "env_steps": 2048 * np.arange(1, 11), "dead_units": np.broadcast_to(dead, (1, 2, 10, 2)),
               "effective_rank": np.broadcast_to(np.array([10.0, 20.0]), (1, 2, 10, 2))}
    run = plot.load_run(write_run(tmp_path / "ant", "ant_ppo", "bp", [{"lr": 1e-4}], [0, 1], metrics))
    plot.set_labels([run])
    rows = plot.phase_table(run, 4096).splitlines()[2:]
    # phase 1 ends (updates 3-4): seed means 3.5, 5.5 -> 4.5 +- t_{0.975,1} x 1 = 12.7
    assert rows[0] == "| ant [bp] | 2 | 1 | 0.3 | 1-4 | 4.5 +- 13 | - | 1, 2 | 10, 20 |"
    # after the change (updates 5-6: 2, 2) over before (3.5, 5.5): ratios 4/7, 4/11 -> 0.4675 +- 12.706 x 0.2078 / 2;
    # phase 2 ends (updates 7-8, seed 1's NaN left out): 6, 8
    assert rows[1] == "| ant [bp] | 2 | 2 | 0.04 | 5-8 | 7 +- 13 | 0.4675 +- 1.3 (2 +- 0 vs 4.5 +- 13) | 3, 2 | 10, 20 |"
    # phase 3, shorter than phase 1 (the run is still in it): 5, 7 after 6, 8 -> ratios 5/6, 7/8
    assert rows[2] == "| ant [bp] | 2 | 3 | 0.3 | 9-10 so far | 6 +- 13 | 0.8542 +- 0.26 (6 +- 13 vs 7 +- 13) | 3, 2 | 10, 20 |"
    # a ratio of returns that are not all positive means nothing
    run.metrics["episodic_return"][0, 0, 2:4] = -1.0
    # (seed 0's updates 3-4 at -1: before = -1, 5.5 -> 2.25 +- 12.706 x 6.5 / 2)
    assert "| n/a (return <= 0) (2 +- 0 vs 2.25 +- 41) |" in plot.phase_table(run, 4096).splitlines()[3]
    # the env's reward, control cost and action RMS per env step, where recorded: phase 1's last 2 updates
    run.metrics.update(step_reward=np.broadcast_to(np.arange(10.0), (1, 2, 10)),
                       ctrl_cost=np.broadcast_to(np.array([[0.5] * 10, [1.5] * 10]), (1, 2, 10)),
                       action_rms=np.full((1, 2, 10), 0.25))
    lines = plot.phase_table(run, 4096).splitlines()
    assert lines[0].endswith("| effective rank (actor, critic) | reward / control cost per step (action RMS) |")
    assert lines[1].count("---") == 10 and lines[2].endswith("| 10, 20 | 2.5 / 1 (0.25) |")


def test_ant_runs_split_over_seeds_keep_their_phase_table(tmp_path):
    """Slippery Ant seeds run as separate processes pool into one run that still has its env steps (shared by all
    members, not per member), cut to the shorter run, so plot.py prints the per-phase table of both seeds."""
    friction = np.array([0.3] * 4 + [0.04] * 4)

    def ant(name, seed, ret):
        updates = len(ret)
        metrics = {"episodic_return": np.asarray(ret, np.float64)[None, None],
                   "friction": friction[None, None, :updates], "env_steps": 2048 * np.arange(1, updates + 1),
                   "dead_units": np.zeros((1, 1, updates, 2)), "effective_rank": np.full((1, 1, updates, 2), 5.0),
                   "layer_names": np.array(["actor", "critic"])}
        return plot.load_run(write_run(tmp_path / name, "ant_ppo", "bp", [{"lr": 1e-4}], [seed], metrics))

    runs = plot.pool_seed_runs([ant("ant_s0", 0, [1, 2, 3, 4, 2, 2, 6, 6]), ant("ant_s1", 1, [3, 4, 5, 6, 1, 3, 8])])
    assert len(runs) == 1 and plot.PHASE_KEYS <= runs[0].metrics.keys()
    run = runs[0]
    np.testing.assert_array_equal(run.metrics["env_steps"], 2048 * np.arange(1, 8))
    assert run.metrics["layer_names"].tolist() == ["actor", "critic"]
    plot.set_labels(runs)
    rows = plot.phase_table(run, 4096).splitlines()[2:]
    # as test_ant_phase_table_by_hand: phase 1's last 2 updates, seed means 3.5, 5.5 -> 4.5 +- 12.7
    assert rows[0] == "| ant_s0+ant_s1 [bp] | 2 | 1 | 0.3 | 1-4 | 4.5 +- 13 | - | 0, 0 | 5, 5 |"
    # phase 2 so far (updates 6-7): 4, 5.5 -> 4.75 +- 12.706 x 1.0607 / sqrt(2); the change as there
    assert rows[1] == ("| ant_s0+ant_s1 [bp] | 2 | 2 | 0.04 | 5-7 so far | 4.75 +- 9.5 "
                       "| 0.4675 +- 1.3 (2 +- 0 vs 4.5 +- 13) | 0, 0 | 5, 5 |")
    # runs whose shared arrays disagree (another --num-steps) would not pool; if forced, the array is dropped
    other = ant("ant_s2", 2, [1, 2, 3])
    other.metrics["env_steps"] = 64 * np.arange(1, 4)
    assert "env_steps" not in plot.merge_runs([run, other]).metrics


def test_ant_units_rank_marks_phases_and_keeps_counts_nonnegative(tmp_path, monkeypatch):
    """The dead-units panel of an Ant run (no width in its config) marks the friction changes like the return
    figure, and its band is clipped at 0 units: two seeds of 0 and 6 dead units have a t-interval reaching -35."""
    import types
    friction = np.array([0.3] * 3 + [0.04] * 3)
    dead = np.stack([np.zeros((6, 2)), np.full((6, 2), 3.0)])  # [seeds, updates, layers]
    metrics = {"episodic_return": np.ones((1, 2, 6)), "friction": np.broadcast_to(friction, (1, 2, 6)),
               "env_steps": 2048 * np.arange(1, 7), "dead_units": dead[None],
               "effective_rank": np.full((1, 2, 6, 2), 10.0)}
    run = plot.load_run(write_run(tmp_path / "ant", "ant_ppo", "bp", [{"lr": 1e-4}], [0, 1], metrics))
    plot.set_labels([run])
    figures = []
    monkeypatch.setattr(plot, "save", lambda fig, out, name: figures.append(fig) or out / name)
    plot.plot_units_rank("ant_ppo", [run], tmp_path, types.SimpleNamespace(smooth=None, polyorder=2))
    dead_ax, rank_ax = figures[0].axes
    for ax in (dead_ax, rank_ax):
        assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [3.5]
        assert [t.get_text() for t in ax.texts] == ["friction 0.3", "friction 0.04"]
    band = dead_ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == 0.0 and band[:, 1].max() > 6

def test_labels_tell_runs_apart_without_repeating_what_they_show():
    """Two sweeps of one agent over the same lr values: each line names the lr it shows once, then its run
    directory; runs whose configs differ in a value the labels do not show get that value instead."""
    def run(name, configs):
        return plot.Run(Path(name), "pmnist", "spectral-reg", configs, [0], {}, None, [], [])

    a = run("lambda1e-2", [{"lr": 1e-3}, {"lr": 1e-4}])
    b = run("lambda1e-3", [{"lr": 1e-3}, {"lr": 1e-4}])
    plot.set_labels([a, b])
    assert a.labels == ["spectral-reg lr=0.001 [lambda1e-2]", "spectral-reg lr=0.0001 [lambda1e-2]"]
    assert b.labels == ["spectral-reg lr=0.001 [lambda1e-3]", "spectral-reg lr=0.0001 [lambda1e-3]"]
    c = run("c", [{"lr": 1e-3, "spectral_lambda": 1e-2}])
    d = run("d", [{"lr": 1e-3, "spectral_lambda": 1e-3}])
    plot.set_labels([c, d])
    assert c.labels == ["spectral-reg [lr=0.001, spectral_lambda=0.01]"]
    assert d.labels == ["spectral-reg [lr=0.001, spectral_lambda=0.001]"]


def test_labels_name_the_arguments_that_set_runs_of_one_agent_apart():
    """A control run (bp with other Adam betas) beside plain bp: the control's label names its betas, plain bp's
    names nothing it left at the agent's default (None), and plain bp keeps bp's colour whatever the order."""
    def run(name, args):
        base = {"agent": "bp", "seed": 0, "out_dir": name, "lr": [1e-4], "beta1": None, "beta2": None, "num_envs": 1}
        return plot.Run(Path(name), "ant_ppo", "bp", [{"lr": 1e-4}], [0], {}, None, [], [], args={**base, **args})

    control, plain, wide = run("c", {"beta1": 0.99, "beta2": 0.99}), run("p", {"seed": 1}), run("w", {"num_envs": 64})
    l2er = plot.Run(Path("l"), "ant_ppo", "l2-er", [{"lr": 1e-4}], [0], {}, None, [], [], args={"beta1": None})
    plot.set_labels([control, l2er, plain])
    assert [control.labels, l2er.labels, plain.labels] == [["bp [beta1=0.99, beta2=0.99]"], ["l2-er"], ["bp"]]
    assert plain.colors == [plot.AGENT_COLORS["bp"]] and l2er.colors == [plot.AGENT_COLORS["l2-er"]]
    assert control.colors[0] not in (plot.AGENT_COLORS["bp"], plot.AGENT_COLORS["l2-er"])
    plot.set_labels([plain, control, wide])
    assert [plain.labels, control.labels, wide.labels] == [
        ["bp [num_envs=1]"], ["bp [beta1=0.99, beta2=0.99, num_envs=1]"], ["bp [num_envs=64]"]]
    assert len({plain.colors[0], control.colors[0], wide.colors[0]}) == 3


def test_runs_split_over_seeds_are_pooled(tmp_path, capsys):
    """Two `--seeds 1` runs of one experiment become one line of both seeds (time cut to the shorter, common
    Hessian measurements only); another config, or a seed already present, stays a separate run."""
    acc_a, acc_b = np.array([[[0.8, 0.9, 0.5, 0.7]]]), np.array([[[0.6, 0.7, 0.7]]])  # [C=1, S=1, T]
    nodes, weights = spectra([[0.2, 0.4]])  # [1, 1, K=2, 1, 2]
    hess_a = {"tasks": np.array([0, 2]), "init_nodes": nodes, "init_weights": weights, "end_nodes": nodes,
              "end_weights": weights}
    hess_b = {k: (np.array([2]) if k == "tasks" else v[:, :, 1:]) for k, v in hess_a.items()}
    lr = [{"lr": 0.01}]
    a = write_run(tmp_path / "a", "pmnist", "bp", lr, [0], {"online_acc": acc_a}, hess_a)
    b = write_run(tmp_path / "b", "pmnist", "bp", lr, [1], {"online_acc": acc_b}, hess_b)
    other = write_run(tmp_path / "c", "pmnist", "bp", [{"lr": 0.1}], [1], {"online_acc": acc_b})
    again = write_run(tmp_path / "d", "pmnist", "bp", lr, [0], {"online_acc": acc_a})
    fork = write_run(tmp_path / "e", "pmnist", "bp", lr, [2], {"online_acc": acc_b})  # a fork's run: other code
    config = json.loads((fork / "config.json").read_text())
    (fork / "config.json").write_text(json.dumps({**config, "script": "my_idea", "benchmark": "pmnist"}))
    runs = plot.pool_seed_runs([plot.load_run(p) for p in (a, b, other, again, fork)])
    assert [r.path.name for r in runs] == ["a+b", "c", "d", "e"]
    both = runs[0]
    assert both.seeds == [0, 1]
    np.testing.assert_array_equal(both.metrics["online_acc"], [[[0.8, 0.9, 0.5], [0.6, 0.7, 0.7]]])
    assert both.metrics["diverged"].shape == (1, 2)
    assert both.hessian["tasks"].tolist() == [2]
    np.testing.assert_array_equal(both.hessian["init_weights"][0, :, 0], [weights[0, 0, 1], weights[0, 0, 1]])
    assert "pooled a+b as one run of seeds [0, 1]; cut to the shortest, 3 of 4" in capsys.readouterr().out
    plot.set_labels(runs[:1])  # alone: "d" would share its label
    # window 1-2: seed means 0.85, 0.65 -> 0.75 +- 12.7062 * 0.1414 / sqrt(2), as in test_window_table_by_hand
    assert plot.window_table("pmnist", runs[:1], ("1-2",)).splitlines()[2] == "| a+b [bp] | 2 | 0.7500 +- 1.2706 |"
