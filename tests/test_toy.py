"""Tests for toy.py: the App. C landscapes against hand values, the Task-2 transform, autodiff against finite
differences, the flip counts and three-valued verdicts, and the paper's Fig. 1 claims on the default start grid
(what actually holds is asserted)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy

REPO = Path(__file__).resolve().parents[1]
PHI = math.radians(35.0)
COS, SIN = math.cos(PHI), math.sin(PHI)


# ----------------------------------------------------------------------------------------------------------
# An independent float64 transcription of eqs. 41-44 (plain Python / numpy)
# ----------------------------------------------------------------------------------------------------------
def ref_parts(task, t1, t2):
    if task == 0:
        return 6.0 * (t1 + 1) ** 2 + 0.02 * t2 ** 6, 2.0 * (t1 - 0.8) ** 2 + 6.0 * (t2 - 0.25) ** 2
    u = COS * (t1 + 4.1) + SIN * (t2 - 2.0)
    v = -SIN * (t1 + 4.1) + COS * (t2 - 2.0)
    return 10.0 * u ** 2 + 1e-4 * v ** 6 + 1e-6 * v ** 2, 5.0 * (t1 - 1.8) ** 2 + 9.0 * (t2 + 0.6) ** 2


def ref_loss(task, p):
    c, b = ref_parts(task, *p)
    tau = (0.13, 0.18)[task]
    m = min(c, b)
    return m - tau * math.log(math.exp(-(c - m) / tau) + math.exp(-(b - m) / tau))


def fd_grad(f, p, h):
    p = np.asarray(p, np.float64)
    return np.array([(f(p + h * e) - f(p - h * e)) / (2 * h) for e in np.eye(2)])


def fd_hessian(f, p, h):
    return np.stack([fd_grad(lambda q: fd_grad(f, q, h)[i], p, h) for i in range(2)])


def blend_point(task, a, b):
    """Point on segment a-b where canyon == bowl (the soft-min blends both there), by bisection."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    gap = lambda s: np.subtract(*ref_parts(task, *(a + s * (b - a))))
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.sign(gap(mid)) == np.sign(gap(lo)) else (lo, mid)
    return a + lo * (b - a)


POINTS = {
    0: [blend_point(0, toy.CANYON1_MIN, toy.BOWL1_MIN), (0.2, 0.8), (-1.3, 1.2), (1.5, -0.7)],
    1: [blend_point(1, toy.CANYON2_MIN, toy.BOWL2_MIN), (-2.5, 0.3), (0.5, 0.0), (-1.0, -1.0)],
}


def toy_loss(task):
    return toy.TASKS[task][0]


# ----------------------------------------------------------------------------------------------------------
# Landscapes (eqs. 41-43)
# ----------------------------------------------------------------------------------------------------------
def test_hand_values():
    c1, b1 = toy.task1_parts(jnp.array([0.0, 0.0]))
    assert float(c1) == pytest.approx(6.0) and float(b1) == pytest.approx(1.655)  # 6*1; 2*0.64 + 6*0.0625
    # At (0, 0) the bowl is 4.345 lower: the canyon's weight exp(-4.345/0.13) ~ 3e-15 does not show.
    assert float(toy.task1_loss(jnp.array([0.0, 0.0]))) == pytest.approx(1.655, abs=1e-6)
    c1, b1 = toy.task1_parts(jnp.array([1.0, 1.0]))
    assert float(c1) == pytest.approx(24.02) and float(b1) == pytest.approx(3.455)  # 6*4 + 0.02; 2*.04 + 6*.5625
    # On theta_2 = 0 the two parts are equal where 4 t^2 + 15.2 t + 4.345 = 0: there L1 = C1 - tau1 log 2.
    t = (-15.2 + math.sqrt(15.2 ** 2 - 16 * 4.345)) / 8
    c1, b1 = toy.task1_parts(jnp.array([t, 0.0]))
    assert float(c1) == pytest.approx(6 * (t + 1) ** 2, rel=1e-6)
    assert float(b1) == pytest.approx(float(c1), rel=1e-5)
    expected = 6 * (t + 1) ** 2 - 0.13 * math.log(2)
    assert float(toy.task1_loss(jnp.array([t, 0.0]))) == pytest.approx(expected, rel=1e-5)
    # Task 2 at mu = (-4.1, 2): u = v = 0, B2 = 5 * 5.9^2 + 9 * 2.6^2 = 234.89, L2 = 0.
    c2, b2 = toy.task2_parts(jnp.array(toy.MU))
    assert float(c2) == 0.0 and float(b2) == pytest.approx(234.89)
    assert float(toy.task2_loss(jnp.array(toy.MU))) == pytest.approx(0.0, abs=1e-7)
    # Task 2 at (0, 0): u = 4.1 cos - 2 sin, v = -4.1 sin - 2 cos; B2 = 5 * 3.24 + 9 * 0.36 = 19.44.
    u, v = 4.1 * COS - 2 * SIN, -4.1 * SIN - 2 * COS
    c2, b2 = toy.task2_parts(jnp.array([0.0, 0.0]))
    assert float(c2) == pytest.approx(10 * u * u + 1e-4 * v ** 6 + 1e-6 * v * v, rel=1e-6)
    assert float(c2) == pytest.approx(49.305, abs=1e-3) and float(b2) == pytest.approx(19.44)


@pytest.mark.parametrize("task", [0, 1])
def test_matches_reference(task):
    rng = np.random.default_rng(0)
    points = list(POINTS[task]) + list(rng.uniform([-4.5, -2.5], [3.0, 2.5], size=(20, 2)))
    for p in points:
        got = float(toy_loss(task)(jnp.asarray(p, jnp.float32)))
        assert got == pytest.approx(ref_loss(task, np.float32(p).astype(float)), rel=2e-6, abs=2e-6), p


def test_task2_transform():
    """(u, v) = R_phi (theta - mu): Task 1's canyon minimum (-1, 0) (local (0, 0)) goes to mu, the canyon floor
    (Task 1: direction e2) turns to (-sin phi, cos phi); the bowl moves from (0.8, 0.25) to (1.8, -0.6)."""
    local = lambda p: np.array([float(x) for x in toy.task2_local(jnp.asarray(p, jnp.float32))])
    mu = np.array(toy.MU)
    np.testing.assert_allclose(local(mu), [0, 0], atol=1e-6)
    np.testing.assert_allclose(local(mu + [COS, SIN]), [1, 0], atol=1e-6)
    np.testing.assert_allclose(local(mu + [-SIN, COS]), [0, 1], atol=1e-6)
    # C2(mu + R^T (a, b)) = cu a^2 + a2 b^6 + eps b^2: Task 1's canyon cL1 a^2 + a1 b^6 around (-1, 0), rotated.
    for a, b in [(0.3, 0.0), (0.0, 2.0), (-0.2, 1.5)]:
        c2, _ = toy.task2_parts(jnp.asarray(mu + a * np.array([COS, SIN]) + b * np.array([-SIN, COS]), jnp.float32))
        assert float(c2) == pytest.approx(10 * a * a + 1e-4 * b ** 6 + 1e-6 * b * b, rel=1e-4, abs=1e-6)

    for task, minima in [(0, (toy.CANYON1_MIN, toy.BOWL1_MIN)), (1, (toy.CANYON2_MIN, toy.BOWL2_MIN))]:
        for p in minima:
            assert np.abs(np.asarray(jax.grad(toy_loss(task))(jnp.asarray(p)))).max() < 1e-5
    assert tuple(toy.CANYON2_MIN) == (-4.1, 2.0) and tuple(toy.BOWL2_MIN) == (1.8, -0.6)
    # Curvature: Task 1 canyon diag(12, 0) with the flat direction e2; Task 2 canyon 20 across, 2e-6 along
    # (-sin phi, cos phi); bowls diag(4, 12) -> diag(10, 18).
    lam, vec = np.linalg.eigh(np.asarray(jax.hessian(toy.task1_loss)(jnp.array(toy.CANYON1_MIN))))
    np.testing.assert_allclose(lam, [0, 12], atol=1e-4)
    assert abs(vec[:, 0] @ [0, 1]) == pytest.approx(1, abs=1e-6)
    lam, vec = np.linalg.eigh(np.asarray(jax.hessian(toy.task2_loss)(jnp.array(toy.MU))))
    np.testing.assert_allclose(lam, [2e-6, 20], atol=1e-4)
    assert abs(vec[:, 0] @ [-SIN, COS]) == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(np.asarray(jax.hessian(toy.task1_loss)(jnp.array(toy.BOWL1_MIN))), np.diag([4, 12]),
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(jax.hessian(toy.task2_loss)(jnp.array(toy.BOWL2_MIN))), np.diag([10, 18]),
                               atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Autodiff against finite differences (the paper's own way of taking these derivatives)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", [0, 1])
def test_gradient_and_hessian_match_finite_differences(task):
    f = lambda p: ref_loss(task, p)
    grad, hess = jax.jit(jax.grad(toy_loss(task))), jax.jit(jax.hessian(toy_loss(task)))
    for p in POINTS[task]:
        x = jnp.asarray(p, jnp.float32)
        q = np.asarray(x, np.float64)
        g_fd, h_fd = fd_grad(f, q, 1e-6), fd_hessian(f, q, 1e-4)
        np.testing.assert_allclose(np.asarray(grad(x)), g_fd, rtol=1e-4, atol=1e-4 * (1 + np.abs(g_fd).max()))
        np.testing.assert_allclose(np.asarray(hess(x)), h_fd, rtol=1e-3, atol=1e-3 * (1 + np.abs(h_fd).max()))


@pytest.mark.parametrize("task", [0, 1])
def test_curvature_penalty(task):
    """Eq. 44 in closed form equals -sum log(lambda^2 + eps) over eigenvalues, and its gradient matches finite
    differences of that eigenvalue form on a finite-difference Hessian of the float64 reference."""
    eps = 1e-6
    penalty = jax.jit(lambda x: toy.curvature_penalty(toy_loss(task), x, eps))
    penalty_grad = jax.jit(jax.grad(lambda x: toy.curvature_penalty(toy_loss(task), x, eps)))

    def ref_penalty(p):
        lam = np.linalg.eigvalsh(fd_hessian(lambda q: ref_loss(task, q), p, 2e-4))
        return -np.sum(np.log(lam ** 2 + eps))

    for p in POINTS[task]:
        x = jnp.asarray(p, jnp.float32)
        q = np.asarray(x, np.float64)
        lam = np.linalg.eigvalsh(np.asarray(jax.hessian(toy_loss(task))(x), np.float64))
        assert float(penalty(x)) == pytest.approx(-np.sum(np.log(lam ** 2 + eps)), rel=1e-4, abs=1e-4)
        g_fd = fd_grad(ref_penalty, q, 1e-3)
        scale = 1 + np.abs(g_fd).max()
        np.testing.assert_allclose(np.asarray(penalty_grad(x)), g_fd, rtol=2e-2, atol=2e-2 * scale)


# ----------------------------------------------------------------------------------------------------------
# The default run on the start grid
# ----------------------------------------------------------------------------------------------------------
GRID = toy.start_grid(toy.Args())
# The one default-grid start whose Task-1 outcome differs between the methods (a boundary start), drawn in the
# figure so that the extra plot member can be checked against the grid member.
DIFFERING_START = 35


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    args = toy.Args(out_dir=str(out), plot_start=tuple(float(x) for x in GRID[DIFFERING_START]))
    summary = toy.main(args)
    with np.load(out / "metrics.npz") as data:
        metrics = {k: data[k] for k in data.files}
    return out, summary, metrics


def barrier_equilibrium(slope, alpha, beta, shift):
    """Root r > 0 of the stationarity of curvature-regularized GD along a canyon floor a s^6 (+ tiny eps s^2):
    6 a r^5 - 8 alpha / r + beta (r + shift) = 0, since there R_curve ~ -2 log(30 a r^4) + const (eq. 44)."""
    g = lambda r: slope * 6 * r ** 5 - 8 * alpha / r + beta * (r + shift)
    lo, hi = 0.5, 10.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
    return lo


def test_outputs(run):
    out, summary, metrics = run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert json.loads((out / "config.json").read_text())["args"]["eta"] == 0.02
    assert (out / "fig1_left.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n = len(GRID)
    assert summary["grid_starts"] == n and metrics["task1_end"].shape == (2, n, 2)
    assert metrics["plot_task1"].shape == (2, 1001, 2) and metrics["plot_task2"].shape == (2, 2001, 2)
    assert not metrics["diverged"].any()
    # The figure's start runs as an extra batch member: same path as the grid member with that start.
    np.testing.assert_array_equal(metrics["plot_task1"][:, -1], metrics["task1_end"][:, DIFFERING_START])


def test_task1_claim_does_not_hold(run):
    """Paper: curvature-regularized GD finds the bowl where GD finds the canyon. Measured: with the paper's
    constants the log-barrier moves a start along the canyon floor to |theta_2| ~ 1.41, where the canyon's own
    curvature 30 a1 theta_2^4 is high enough, and never out of the canyon; the two methods end Task 1 in the
    same basin from every grid start but one next to the basin boundary."""
    _, summary, metrics = run
    in_bowl, end = metrics["task1_in_bowl"], metrics["task1_end"]
    assert summary["gd"]["task1_bowl_fraction"] == 28 / 64 and summary["curv"]["task1_bowl_fraction"] == 29 / 64
    assert np.flatnonzero(in_bowl[0] != in_bowl[1]).tolist() == [DIFFERING_START]
    assert in_bowl[1, DIFFERING_START] and not in_bowl[0, DIFFERING_START]
    assert abs(GRID[DIFFERING_START][1] - toy.YR1) < 0.05  # on the ridge between the basins (theta_2 ~ y_R1)
    r = barrier_equilibrium(0.02, 0.12, 0.006, 0.0)
    assert r == pytest.approx(1.411, abs=1e-3)
    canyon = end[1, ~in_bowl[1]]
    np.testing.assert_allclose(canyon[:, 0], -1.0, atol=1e-3)
    np.testing.assert_allclose(np.abs(canyon[:, 1]), r, atol=2e-3)
    assert (np.abs(end[0, ~in_bowl[0], 1]) < 1.0).all()  # GD stops further down the flat canyon floor
    bowl = end[:, in_bowl[0] & in_bowl[1]]
    np.testing.assert_allclose(bowl, np.broadcast_to([toy.XR1, toy.YR1], bowl.shape), atol=2e-3)


def test_task2_claims(run):
    """Paper: curvature-regularized GD needs fewer Task-2 steps. Measured: it needs more on average. From the
    bowl both methods solve Task 2 in ~15 steps and from the canyon GD needs ~50x more (the ill-conditioning the
    paper describes does show); but curvature-regularized GD, left in the canyon, never solves Task 2: the
    barrier pushes it outward along Task 2's canyon floor to |v| ~ 3.33, where L2 = a2 v^6 ~ 0.136 > tol."""
    _, summary, metrics = run
    gd, curv = summary["gd"], summary["curv"]
    assert not summary["claims"]["curv_needs_fewer_task2_steps"]
    assert curv["task2_steps_mean"] > 2 * gd["task2_steps_mean"]
    assert gd["task2_solved_fraction"] == 1.0 and curv["task2_solved_fraction"] == curv["task1_bowl_fraction"]
    assert max(gd["task2_steps_mean_from_bowl"], curv["task2_steps_mean_from_bowl"]) < 30
    assert gd["task2_steps_mean_from_canyon"] > 20 * gd["task2_steps_mean_from_bowl"]
    assert curv["task2_steps_mean_from_canyon"] == summary["task2_steps"]
    # The stall point: stationarity along v, with beta's pull towards 0 entering through mu . (-sin, cos).
    r = barrier_equilibrium(1e-4, 0.10, 0.006, -(toy.MU[0] * -SIN + toy.MU[1] * COS))
    stalled = metrics["task2_final_loss"][1, ~metrics["task1_in_bowl"][1]]
    np.testing.assert_allclose(stalled, 1e-4 * r ** 6, rtol=2e-2)
    # The condition number at Task 2's start: ~1.8 from the bowl, worse from the canyon.
    cond, in_bowl = metrics["task2_start_cond"], metrics["task1_in_bowl"]
    np.testing.assert_allclose(cond[in_bowl], 1.8, rtol=0.05)
    assert (cond[~in_bowl] > 10).all()
    assert curv["task2_start_cond_median"] < gd["task2_start_cond_median"]


# ----------------------------------------------------------------------------------------------------------
# Flip counts and three-valued verdicts
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid_size, margin", [(1, 2), (2, 2), (3, 3), (8, 8), (41, 41)])
def test_tie_margin(grid_size, margin):
    assert toy.tie_margin(grid_size) == margin


@pytest.mark.parametrize("n_for, n_against, margin, expected", [
    (0, 0, 2, "tie"), (1, 0, 2, "tie"), (2, 0, 2, "tie"), (3, 0, 2, "holds"),  # one or two starts: a tie
    (0, 2, 2, "tie"), (0, 3, 2, "fails"), (5, 3, 2, "tie"), (6, 3, 2, "holds"), (3, 6, 2, "fails"),
    (8, 0, 8, "tie"), (9, 0, 8, "holds"), (0, 8, 8, "tie"), (0, 9, 8, "fails"),  # at and just past the margin
    (30, 22, 8, "tie"), (31, 22, 8, "holds"), (22, 31, 8, "fails"), (1, 63, 8, "fails"), (20, 16, 41, "tie")])
def test_verdict(n_for, n_against, margin, expected):
    assert toy.verdict(n_for, n_against, margin) == expected


def test_basin_flips_and_fewer_steps_by_hand():
    gd = [True, True, False, False, False, True, False]
    curv = [True, False, True, True, False, True, False]
    # GD canyon -> curv bowl at starts 2 and 3; GD bowl -> curv canyon at start 1; starts 0, 4, 5, 6 agree.
    assert toy.basin_flips(gd, curv) == {"canyon_to_bowl": 2, "bowl_to_canyon": 1, "same_basin": 4}
    assert toy.basin_flips(curv, gd) == {"canyon_to_bowl": 1, "bowl_to_canyon": 2, "same_basin": 4}
    assert toy.basin_flips(np.ones(5, bool), np.zeros(5, bool)) == {
        "canyon_to_bowl": 0, "bowl_to_canyon": 5, "same_basin": 0}
    assert toy.fewer_steps([14, 800, 2000, 15, 14], [15, 2000, 2000, 3, 14]) == {"curv": 1, "gd": 2, "equal": 2}


def test_summary_flips_and_verdicts(run):
    """The new summary keys against each other, against the old ones and against the per-start metrics."""
    out, summary, metrics = run
    assert json.loads((out / "summary.json").read_text())["verdicts"] == summary["verdicts"]
    n, flips, fewer = summary["grid_starts"], summary["task1_flips"], summary["task2_fewer_steps"]
    gd, curv = summary["gd"], summary["curv"]
    assert flips["canyon_to_bowl"] + flips["bowl_to_canyon"] + flips["same_basin"] == n
    assert fewer["curv"] + fewer["gd"] + fewer["equal"] == n
    for m in toy.METHODS:
        assert summary[m]["task1_bowl_count"] == round(summary[m]["task1_bowl_fraction"] * n)
    assert curv["task1_bowl_count"] - gd["task1_bowl_count"] == flips["canyon_to_bowl"] - flips["bowl_to_canyon"]
    assert (flips["canyon_to_bowl"], flips["bowl_to_canyon"]) == (
        summary["task1_only_curv_in_bowl"], summary["task1_only_gd_in_bowl"])
    in_bowl, steps = metrics["task1_in_bowl"], metrics["task2_steps"]
    assert flips == toy.basin_flips(in_bowl[0], in_bowl[1])
    assert fewer["curv"] == int((steps[1] < steps[0]).sum()) and fewer["gd"] == int((steps[0] < steps[1]).sum())
    # Default grid: one start flips canyon -> bowl (+1 of a margin of 8): a tie, although the bare comparison
    # of bowl fractions in `claims` says True. Task 2: curv is faster only from that start.
    assert summary["tie_margin"] == 8 and (flips["canyon_to_bowl"], flips["bowl_to_canyon"]) == (1, 0)
    assert summary["claims"]["curv_ends_task1_in_bowl_more_often"]
    assert summary["verdicts"] == {
        "curv_ends_task1_in_bowl_more_often": {"verdict": "tie", "net": 1, "starts_for": 1, "starts_against": 0},
        "curv_needs_fewer_task2_steps": {"verdict": "fails", "net": -62, "starts_for": 1, "starts_against": 63}}
    assert np.flatnonzero(steps[1] < steps[0]).tolist() == [DIFFERING_START]


def test_print_claims(capsys):
    summary = {"grid_starts": 100, "task1_flips": {"canyon_to_bowl": 30, "bowl_to_canyon": 3, "same_basin": 67},
               "task2_fewer_steps": {"curv": 12, "gd": 4, "equal": 84}, "tie_margin": 10,
               "verdicts": {"a": {"verdict": "holds", "net": 27, "starts_for": 30, "starts_against": 3},
                            "b": {"verdict": "tie", "net": 8, "starts_for": 12, "starts_against": 4}}}
    toy.print_claims(summary)
    assert capsys.readouterr().out.splitlines() == [
        "Task-1 basin, GD -> curv (of 100 starts): canyon -> bowl 30, bowl -> canyon 3, same basin 67",
        "Task-2 starts where curv / gd needs fewer steps: 12 / 4 (equal: 84)",
        "claims (paper, Fig. 1): net = starts for - starts against; holds if net > M, fails if net < -M, else tie; "
        "M = max(2, grid_size) = 10 starts",
        "  a: holds (net +27 = 30 for - 3 against)",
        "  b: tie (net +8 = 12 for - 4 against)"]


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [
    dict(eta=0.0), dict(eta=float("nan")), dict(task1_steps=0), dict(task2_steps=-3), dict(tol=-1.0),
    dict(grid_size=0), dict(x_range=(1.0, -1.0)), dict(alpha1=-0.1), dict(eps=0.0)])
def test_bad_input_fails(change, tmp_path):
    with pytest.raises(SystemExit) as e:
        toy.main(toy.Args(out_dir=str(tmp_path / "run"), **change))
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_bad_input_cli(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "toy.py"), "--eta=-0.1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error" in line] == [
        "error: --eta must be a positive finite number, got -0.1"]
    assert not (tmp_path / "runs").exists()
