"""Two-task 2-D toy of the paper's Fig. 1 (left) and App. C: plain GD vs curvature-regularized GD.

Each task loss is a soft minimum of a low-curvature "canyon" and a high-curvature "bowl" (eq. 41). Task 1
uses the constants of eq. 42; Task 2 rotates the canyon by phi = 35 deg about mu = (-4.1, 2.0) and moves the
bowl to (1.8, -0.6) (eq. 43). Plain GD (eq. 46) descends the task loss L_t; curvature-regularized GD (eq. 47)
descends F_t = L_t + alpha_t R_curve + beta/2 |theta|^2 (eq. 45), where R_curve = -sum_i log(lambda_i^2 + eps)
is a log-barrier on the Hessian eigenvalues of L_t (eq. 44); App. C.3's constants eps 1e-6, beta 0.006, alpha_1
0.12, alpha_2 0.10 are the defaults (--eps, --beta, --alpha1, --alpha2). Task 2 starts where Task 1 ended, for
each method, with the same step size for both.

Choices where the paper is silent or differs:
- Start point, step size and step counts are not given: both methods run from every point of a start grid
  (--grid-size 8 x 8 over --x-range (-2.5, 2.5) x --y-range (-2, 2), which holds both Task-1 minima; all starts
  vmapped inside one jit per task), --eta 0.02 (GD on these landscapes needs < 2/20 = 0.1), --task1-steps 1000,
  --task2-steps 2000. --plot-start (-0.5, 1.5) is the start drawn in the figure (not counted in the summary).
- Gradients, Hessians and the gradient of R_curve (third derivatives) by JAX autodiff (the paper: finite
  differences). R_curve is computed as -log(det(H)^2 + eps |H|_F^2 + eps^2): equal to eq. 44 for a symmetric
  2x2 H, and differentiable where the two eigenvalues meet.
- Per method: the fraction of starts that end Task 1 in the bowl (the bowl is the smaller component of the
  soft-min at the end point); the median condition number |lambda|max / |lambda|min of the Hessian of L_2 at
  Task 2's start; the Task-2 steps until L_2 <= (Task 2's best loss, 0 to float32 precision) + --tol 0.01,
  unsolved starts counting as --task2-steps.
- The paper's two Fig. 1 claims are judged start by start, as both methods share the grid. Task 1 ("GD finds
  the valley, curvature-regularized GD finds the bowl"): the starts where GD ends in the canyon (the paper's
  "valley") and curvature-regularized GD in the bowl, and the reverse. Task 2 ("curvature-regularized GD
  converges rapidly"): the starts where each method needs strictly fewer Task-2 steps. Verdict from net = for -
  against: "holds" if net > M, "fails" if net < -M, "tie" otherwise, M = max(2, grid_size) starts (why: see
  TIE_MIN_STARTS).

Result on the paper's constants (`python toy.py`, float32): the Fig. 1 story does not hold on the grid.
    method  T1 end in bowl  median cond(H2) at T2 start  mean T2 steps  T2 solved  from T1 bowl / canyon
    gd               0.438                        29.40          453.0      1.000          14.0 / 794.4
    curv             0.453                        15.25         1100.5      0.453          15.0 / 2000.0
- Task 1: tie. The methods end in the same basin from 63 of 64 starts; the one exception, (-0.357, 0.286), lies
  on the ridge between the basins (`--plot-start -0.357 0.286` draws the paper's picture). On a 41 x 41 grid:
  20 starts canyon -> bowl, 16 bowl -> canyon: the regularizer only jitters the basin boundary. In the canyon
  the Hessian of L_1 is about diag(12, 30 a_1 theta_2^4), so R_curve ~ -8 log|theta_2| + const: the barrier
  pushes curvature-regularized GD along the canyon floor to |theta_2| ~ 1.41 (6 a_1 theta_2^5 + beta theta_2 =
  8 alpha_1 / theta_2), where the canyon's own curvature is large enough; it never leaves the canyon.
- Task 2: fails (1 start for, 63 against). From the bowl both methods solve Task 2 in ~15 steps (condition
  number 1.8), from the canyon GD needs ~800 (condition number ~29): the ill-conditioning is real. But
  curvature-regularized GD left in the canyon never solves Task 2: the same barrier drives it along Task 2's
  canyon floor to |v| ~ 3.33 and holds it at L_2 = a_2 v^6 ~ 0.136 > tol.
- Not an artefact of the open choices: --eta 0.05 gives the same basins and mean Task-2 steps 182.3 (gd) vs
  1096.0 (curv); --x-range -4 4 --y-range -3 3 --grid-size 41 gives bowl fractions 0.430 vs 0.428 (9 starts
  canyon -> bowl, 11 bowl -> canyon) and Task-2 steps 457.4 vs 1149.8; float64 prints the same table.

Outputs (runs/toy__gd-vs-curv__<UTC stamp>/ or --out-dir): fig1_left.png (contours of L_1 and L_2, both
methods' trajectories from --plot-start, the grid starts); summary.json (the printed numbers: per method
task1_bowl_fraction, task2_start_cond_median, task2_steps_mean / _median, task2_solved_fraction,
task2_steps_mean_from_bowl / _from_canyon, task2_final_loss_median, diverged_fraction; task1_flips,
task2_fewer_steps, tie_margin, verdicts, claims; `main(args)` returns it); metrics.npz, per start with leading
axes [method (gd, curv), start]: starts [N, 2], task1_end [2, N, 2], task1_in_bowl, task2_start_cond,
task2_steps, task2_solved, task2_final_loss, diverged, and the figure's plot_task1 [2, task1_steps + 1, 2],
plot_task2 [2, task2_steps + 1, 2]; config.json (configs = the two methods; no seeds: nothing is random).

    python toy.py                       # ~10 s on a CPU; writes runs/toy__gd-vs-curv__<stamp>/
    python toy.py --grid-size 41        # 1,681 starts, still ~10 s
"""
import os

# Before jax loads LAPACK (scipy's OpenBLAS): OpenBLAS's threads on top of XLA's oversubscribe the cores
# (two l2-er runs side by side on a 2-core CPU ran 6.8x slower than two bp runs; 1.2x with one thread each).
# A user's own OPENBLAS_NUM_THREADS wins. No effect on GPU runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import math  # noqa: E402 (after the environment is set)
import sys
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import runner

METHODS = ("gd", "curv")

# Task 1 (eq. 42): canyon C1 = cL1 (t1 + 1)^2 + a1 t2^6, bowl B1 = cR1 (t1 - xR1)^2 + b1 (t2 - yR1)^2.
TAU1, A1, B1_, CL1, CR1, XR1, YR1 = 0.13, 0.02, 6.0, 6.0, 2.0, 0.8, 0.25
# Task 2 (eq. 43): canyon in local coordinates (u, v) = R_phi (theta - mu), bowl relocated.
TAU2, PHI_DEG, MU, CU, A2, EPS_V = 0.18, 35.0, (-4.1, 2.0), 10.0, 1e-4, 1e-6
XR2, YR2, BX, BY = 1.8, -0.6, 5.0, 9.0
CANYON1_MIN, BOWL1_MIN = (-1.0, 0.0), (XR1, YR1)
CANYON2_MIN, BOWL2_MIN = MU, (XR2, YR2)
# Tie margin of the claims' verdicts: a net difference of at most max(TIE_MIN_STARTS, grid_size) starts is a
# tie. The grid is deterministic, so there is no sampling noise to test against; what a small difference
# reflects is where the grid cuts the ridge between the basins. A method that moves that boundary by under one
# grid spacing changes the basin of about one start per grid row (or column) the boundary crosses, i.e. up to
# ~grid_size starts for a boundary running once across the box; measured with the defaults, 1, 5 and 36 starts
# change Task-1 basin between the methods on 8 x 8, 16 x 16 and 41 x 41 grids (net +1, +1, +4). The floor of 2
# keeps one or two boundary starts from deciding a claim on any grid.
TIE_MIN_STARTS = 2


@dataclass
class Args:
    eta: float = 0.02
    """step size, the same for both methods (eqs. 46-47; not in the paper); GD needs < 2/20 (top curvature)"""
    task1_steps: int = 1000
    """gradient steps on Task 1 (not given in the paper)"""
    task2_steps: int = 2000
    """gradient steps on Task 2 (from where Task 1 ended); also the count reported for unsolved starts"""
    tol: float = 1e-2
    """Task 2 counts as solved at the first step where L_2(theta) <= (Task 2's best loss) + tol"""
    grid_size: int = 8
    """starts form a grid_size x grid_size grid over x_range x y_range"""
    x_range: tuple[float, float] = (-2.5, 2.5)
    """theta_1 extent of the start grid (Task 1's minima (-1, 0) and (0.8, 0.25) lie inside)"""
    y_range: tuple[float, float] = (-2.0, 2.0)
    """theta_2 extent of the start grid"""
    plot_start: tuple[float, float] = (-0.5, 1.5)
    """start of the trajectories in the figure (run with the grid, not counted in the summary)"""
    alpha1: float = 0.12
    """weight alpha_1 of the curvature regularizer on Task 1 (App. C.3)"""
    alpha2: float = 0.10
    """weight alpha_2 of the curvature regularizer on Task 2 (App. C.3)"""
    beta: float = 0.006
    """isotropic shrinkage beta of curvature-regularized GD (eq. 45)"""
    eps: float = 1e-6
    """epsilon of the log-barrier -sum_i log(lambda_i^2 + epsilon) (eq. 44)"""
    out_dir: str | None = None
    """run directory (default: runs/toy__gd-vs-curv__<UTC stamp>/)"""


# ----------------------------------------------------------------------------------------------------------
# Landscapes (App. C, eqs. 41-43)
# ----------------------------------------------------------------------------------------------------------
def soft_min(c, b, tau):
    """Eq. 41: -tau log(exp(-c/tau) + exp(-b/tau)), computed stably (logaddexp)."""
    return -tau * jnp.logaddexp(-c / tau, -b / tau)


def task1_parts(theta):
    """Canyon C1 and bowl B1 of Task 1 (eq. 42)."""
    t1, t2 = theta[0], theta[1]
    return CL1 * (t1 + 1.0) ** 2 + A1 * t2 ** 6, CR1 * (t1 - XR1) ** 2 + B1_ * (t2 - YR1) ** 2


def task2_local(theta):
    """Task 2's canyon coordinates (u, v) = R_phi (theta - mu), R_phi = [[cos, sin], [-sin, cos]] (eq. 43).
    Task 1's canyon has the same shape in (t1 + 1, t2): its minimum (-1, 0) corresponds to theta = mu."""
    c, s = math.cos(math.radians(PHI_DEG)), math.sin(math.radians(PHI_DEG))
    d1, d2 = theta[0] - MU[0], theta[1] - MU[1]
    return c * d1 + s * d2, -s * d1 + c * d2


def task2_parts(theta):
    """Canyon C2 and bowl B2 of Task 2 (eq. 43)."""
    u, v = task2_local(theta)
    return (CU * u ** 2 + A2 * v ** 6 + EPS_V * v ** 2,
            BX * (theta[0] - XR2) ** 2 + BY * (theta[1] - YR2) ** 2)


def task1_loss(theta):
    return soft_min(*task1_parts(theta), TAU1)


def task2_loss(theta):
    return soft_min(*task2_parts(theta), TAU2)


TASKS = ((task1_loss, task1_parts), (task2_loss, task2_parts))


# ----------------------------------------------------------------------------------------------------------
# Curvature regularizer (eq. 44) and the two update rules (eqs. 45-47). The paper took the gradients and
# Hessians by finite differences of the scalars; here they are exact, by JAX autodiff.
# ----------------------------------------------------------------------------------------------------------
def curvature_penalty(loss, theta, eps):
    """R_curve = -sum_i log(lambda_i^2 + eps), lambda_i the eigenvalues of the Hessian H of `loss` (eq. 44).

    For a symmetric 2x2 H, prod_i (lambda_i^2 + eps) = det(H)^2 + eps |H|_F^2 + eps^2, which is smooth
    everywhere (the gradient of an eigendecomposition is not defined where the two eigenvalues meet).
    """
    h = jax.hessian(loss)(theta)
    det = h[0, 0] * h[1, 1] - h[0, 1] * h[1, 0]
    return -jnp.log(det ** 2 + eps * jnp.sum(h ** 2) + eps ** 2)


def regularized_objective(loss, alpha, beta, eps):
    """F_t = L_t + alpha_t R_curve + beta/2 |theta|^2 (eq. 45)."""
    def objective(theta):
        return loss(theta) + alpha * curvature_penalty(loss, theta, eps) + 0.5 * beta * jnp.sum(theta ** 2)

    return objective


def descend(objective, theta0, eta, steps):
    """`steps` plain gradient steps theta <- theta - eta grad(objective); returns [steps + 1, 2] iterates."""
    grad = jax.grad(objective)

    def step(theta, _):
        theta = theta - eta * grad(theta)
        return theta, theta

    _, path = jax.lax.scan(step, theta0, None, length=steps)
    return jnp.concatenate([theta0[None], path])


@partial(jax.jit, static_argnames=("task", "steps"))
def run_task(starts, eta, alpha, beta, eps, *, task, steps):
    """Both methods on one task: starts [2 (gd, curv), N, 2] -> trajectories [2, N, steps + 1, 2]."""
    loss = TASKS[task][0]
    regularized = regularized_objective(loss, alpha, beta, eps)
    gd = jax.vmap(lambda t0: descend(loss, t0, eta, steps))(starts[0])
    curv = jax.vmap(lambda t0: descend(regularized, t0, eta, steps))(starts[1])
    return jnp.stack([gd, curv])


@jax.jit
def hessian_condition(theta):
    """|lambda|_max / |lambda|_min of the Task-2 loss Hessian at each point of [..., 2] (inf if singular)."""
    h = jnp.vectorize(jax.hessian(task2_loss), signature="(2)->(2,2)")(theta)
    lam = jnp.abs(jnp.linalg.eigvalsh(h))
    return lam[..., 1] / lam[..., 0]


# ----------------------------------------------------------------------------------------------------------
# Grid, summary, figure
# ----------------------------------------------------------------------------------------------------------
def start_grid(args):
    """[grid_size^2, 2] start points, row-major in theta_2 then theta_1."""
    xs = np.linspace(*args.x_range, args.grid_size)
    ys = np.linspace(*args.y_range, args.grid_size)
    return np.stack(np.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2).astype(np.float32)


def validate(args):
    for name in ("eta", "tol", "eps"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            runner.fail(f"--{name.replace('_', '-')} must be a positive finite number, got {value}")
    for name in ("task1_steps", "task2_steps", "grid_size"):
        if getattr(args, name) < 1:
            runner.fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("alpha1", "alpha2", "beta"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            runner.fail(f"--{name} must be a finite number >= 0, got {value}")
    for name in ("x_range", "y_range"):
        lo, hi = getattr(args, name)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            runner.fail(f"--{name.replace('_', '-')} must be two finite numbers LO HI with LO < HI, got {lo} {hi}")
    if not all(math.isfinite(x) for x in args.plot_start):
        runner.fail(f"--plot-start must be two finite numbers, got {args.plot_start}")


def tie_margin(grid_size):
    """Largest net number of starts that still counts as a tie (see TIE_MIN_STARTS)."""
    return max(TIE_MIN_STARTS, grid_size)


def verdict(n_for, n_against, margin):
    """Three-valued verdict of a claim from the starts for and against it: "holds" / "tie" / "fails"."""
    net = n_for - n_against
    return "holds" if net > margin else "fails" if net < -margin else "tie"


def basin_flips(gd_in_bowl, curv_in_bowl):
    """Task-1 end basins GD -> curvature-regularized GD, from boolean in-bowl flags [N] of each method."""
    gd_in_bowl, curv_in_bowl = np.asarray(gd_in_bowl, bool), np.asarray(curv_in_bowl, bool)
    return {"canyon_to_bowl": int((~gd_in_bowl & curv_in_bowl).sum()),
            "bowl_to_canyon": int((gd_in_bowl & ~curv_in_bowl).sum()),
            "same_basin": int((gd_in_bowl == curv_in_bowl).sum())}


def fewer_steps(gd_steps, curv_steps):
    """Starts where each method needs strictly fewer Task-2 steps than the other, and ties."""
    gd_steps, curv_steps = np.asarray(gd_steps), np.asarray(curv_steps)
    return {"curv": int((curv_steps < gd_steps).sum()), "gd": int((gd_steps < curv_steps).sum()),
            "equal": int((gd_steps == curv_steps).sum())}


def first_hit(losses, target):
    """Steps until `losses` [..., K + 1] (index 0 = start) first reaches <= target, and whether it does."""
    hit = losses <= target
    reached = hit.any(-1)
    return np.where(reached, hit.argmax(-1), losses.shape[-1] - 1), reached


def print_table(summary):
    head = (f"{'method':<6} {'T1 end in bowl':>14} {'median cond(H2) at T2 start':>28} {'mean T2 steps':>14} "
            f"{'T2 solved':>10} {'mean T2 steps from T1 bowl / canyon':>36}")
    print(head)
    print("-" * len(head))
    for m in METHODS:
        s = summary[m]
        split = f"{_fmt(s['task2_steps_mean_from_bowl'])} / {_fmt(s['task2_steps_mean_from_canyon'])}"
        print(f"{m:<6} {s['task1_bowl_fraction']:>14.3f} {s['task2_start_cond_median']:>28.2f} "
              f"{s['task2_steps_mean']:>14.1f} {s['task2_solved_fraction']:>10.3f} {split:>36}")
    print(f"({summary['grid_starts']} starts; T2 steps = steps until L2 <= best + {summary['tol']:g}, "
          f"unsolved starts count as {summary['task2_steps']})")


def print_claims(summary):
    """The flip counts and the three-valued verdicts of the paper's two Fig. 1 claims."""
    flips, fewer, n = summary["task1_flips"], summary["task2_fewer_steps"], summary["grid_starts"]
    print(f"Task-1 basin, GD -> curv (of {n} starts): canyon -> bowl {flips['canyon_to_bowl']}, "
          f"bowl -> canyon {flips['bowl_to_canyon']}, same basin {flips['same_basin']}")
    print(f"Task-2 starts where curv / gd needs fewer steps: {fewer['curv']} / {fewer['gd']} "
          f"(equal: {fewer['equal']})")
    print(f"claims (paper, Fig. 1): net = starts for - starts against; holds if net > M, fails if net < -M, "
          f"else tie; M = max({TIE_MIN_STARTS}, grid_size) = {summary['tie_margin']} starts")
    for claim, v in summary["verdicts"].items():
        print(f"  {claim}: {v['verdict']} (net {v['net']:+d} = {v['starts_for']} for - "
              f"{v['starts_against']} against)")


def _fmt(x):
    return "-" if x is None else f"{x:.1f}"


def _mean_or_none(x):
    return float(np.mean(x)) if x.size else None


def plot(path, traj1, traj2, starts, args):
    """Fig. 1 (left): contours of both tasks, both methods' trajectories from `args.plot_start`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = np.linspace(-4.6, 3.0, 301), np.linspace(-2.6, 2.6, 221)
    grid = jnp.asarray(np.stack(np.meshgrid(xs, ys, indexing="xy"), -1), jnp.float32)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    colors = {"gd": "tab:red", "curv": "tab:blue"}
    labels = {"gd": "GD (eq. 46)", "curv": "curvature-regularized GD (eq. 47)"}
    for task, (ax, traj) in enumerate(zip(axes, (traj1, traj2))):
        loss = np.asarray(jax.vmap(jax.vmap(TASKS[task][0]))(grid))
        ax.contourf(xs, ys, np.log10(loss - loss.min() + 1e-3), levels=30, cmap="viridis")
        ax.contour(xs, ys, np.log10(loss - loss.min() + 1e-3), levels=15, colors="white", linewidths=0.4)
        for m, path_m in zip(METHODS, traj):
            ax.plot(path_m[:, 0], path_m[:, 1], ".-", color=colors[m], ms=2, lw=1, label=labels[m])
            ax.plot(*path_m[0], "o", color=colors[m], mfc="none", ms=8)
            ax.plot(*path_m[-1], "*", color=colors[m], mec="k", ms=13)
        minima = (CANYON1_MIN, BOWL1_MIN) if task == 0 else (CANYON2_MIN, BOWL2_MIN)
        for name, point in zip(("canyon", "bowl"), minima):
            ax.annotate(name, point, color="w", fontsize=9, ha="center", va="bottom")
        ax.set(xlim=(xs[0], xs[-1]), ylim=(ys[0], ys[-1]), xlabel=r"$\theta_1$", ylabel=r"$\theta_2$",
               title=f"Task {task + 1}: log10(L{task + 1} - min + 1e-3)" +
               (", start ({:.3g}, {:.3g})".format(*args.plot_start) if task == 0 else ", from each method's Task-1 end"))
        ax.set_aspect("equal")
    axes[0].plot(starts[:, 0], starts[:, 1], "+", color="lightgray", ms=5, label="grid starts")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def summarize(args, grid_metrics, best2):
    """summary.json: per method, Task 1's basins and Task 2's steps to solve it from the grid's starts
    (`grid_metrics`: metrics.npz's [methods, starts] arrays), and the paper's two Fig. 1 claims, compared in total
    and start by start."""
    in_bowl, steps2, solved2 = (grid_metrics[k] for k in ("task1_in_bowl", "task2_steps", "task2_solved"))
    cond, final_loss, diverged = (grid_metrics[k] for k in ("task2_start_cond", "task2_final_loss", "diverged"))
    summary = {"grid_starts": in_bowl.shape[1], "task2_best_loss": best2, "tol": args.tol, "eta": args.eta,
               "task1_steps": args.task1_steps, "task2_steps": args.task2_steps,
               "task1_only_curv_in_bowl": int((in_bowl[1] & ~in_bowl[0]).sum()),
               "task1_only_gd_in_bowl": int((in_bowl[0] & ~in_bowl[1]).sum())}
    for i, m in enumerate(METHODS):
        bowl, steps = in_bowl[i], steps2[i]
        summary[m] = {
            "task1_bowl_fraction": float(bowl.mean()),
            "task1_bowl_count": int(bowl.sum()),
            "task2_start_cond_median": float(np.median(cond[i])),
            "task2_steps_mean": float(steps.mean()),
            "task2_steps_median": float(np.median(steps)),
            "task2_solved_fraction": float(solved2[i].mean()),
            "task2_steps_mean_from_bowl": _mean_or_none(steps[bowl]),
            "task2_steps_mean_from_canyon": _mean_or_none(steps[~bowl]),
            "task2_final_loss_median": float(np.median(final_loss[i])),
            "diverged_fraction": float(diverged[i].mean()),
        }
    gd, curv = summary["gd"], summary["curv"]
    summary["claims"] = {  # the paper's Fig. 1 story, as bare comparisons on this grid (no tie margin)
        "curv_ends_task1_in_bowl_more_often": curv["task1_bowl_fraction"] > gd["task1_bowl_fraction"],
        "curv_needs_fewer_task2_steps": curv["task2_steps_mean"] < gd["task2_steps_mean"],
    }
    # The same claims judged start by start, with a tie margin (TIE_MIN_STARTS says why).
    flips = basin_flips(in_bowl[0], in_bowl[1])
    fewer = fewer_steps(steps2[0], steps2[1])
    margin = tie_margin(args.grid_size)
    summary.update(task1_flips=flips, task2_fewer_steps=fewer, tie_margin=margin, verdicts={})
    for claim, n_for, n_against in (
            ("curv_ends_task1_in_bowl_more_often", flips["canyon_to_bowl"], flips["bowl_to_canyon"]),
            ("curv_needs_fewer_task2_steps", fewer["curv"], fewer["gd"])):
        summary["verdicts"][claim] = {"verdict": verdict(n_for, n_against, margin), "net": n_for - n_against,
                                      "starts_for": n_for, "starts_against": n_against}
    return summary


def main(args):
    validate(args)
    run_dir = runner.make_run_dir("toy", "gd-vs-curv", args.out_dir)
    runner.save_config(run_dir, args, [{"method": m} for m in METHODS], [])
    grid = start_grid(args)
    n = len(grid)
    # The figure's start rides along as member n of the batch (one compilation per task).
    starts = np.concatenate([grid, np.asarray([args.plot_start], np.float32)])
    members = np.broadcast_to(starts, (2,) + starts.shape)
    clock = time.perf_counter()  # each task's call compiles its own program: seconds, not a rate
    hyper = dict(eta=args.eta, beta=args.beta, eps=args.eps)

    traj1 = np.asarray(run_task(members, alpha=args.alpha1, task=0, steps=args.task1_steps, **hyper))
    end1 = traj1[:, :, -1]
    canyon1, bowl1 = jax.vmap(jax.vmap(task1_parts))(jnp.asarray(end1))
    # "In the bowl" = the bowl is the active (smaller) component of the soft-min at Task 1's end.
    in_bowl = np.asarray(bowl1 < canyon1)
    print(f"task 1/2 | bowl_gd {in_bowl[0, :n].mean():.4g} | bowl_curv {in_bowl[1, :n].mean():.4g} | "
          f"{time.perf_counter() - clock:.1f} s with compiling", flush=True)
    clock = time.perf_counter()

    traj2 = np.asarray(run_task(jnp.asarray(end1), alpha=args.alpha2, task=1, steps=args.task2_steps, **hyper))
    cond = np.asarray(hessian_condition(jnp.asarray(end1)))
    losses2 = np.asarray(jax.jit(jax.vmap(jax.vmap(jax.vmap(task2_loss))))(jnp.asarray(traj2)))
    # Task 2's best loss: the lower of L2 at the two component minima (both are 0 to float32 precision;
    # the two minima are too far apart for the soft-min to dip below them).
    best2 = float(min(task2_loss(jnp.asarray(p)) for p in (CANYON2_MIN, BOWL2_MIN))) + 0.0  # no -0.0
    steps2, solved2 = first_hit(losses2, best2 + args.tol)
    diverged = ~(np.isfinite(traj1).all((-1, -2)) & np.isfinite(traj2).all((-1, -2)))
    print(f"task 2/2 | solved_gd {solved2[0, :n].mean():.4g} | solved_curv {solved2[1, :n].mean():.4g} | "
          f"{time.perf_counter() - clock:.1f} s with compiling", flush=True)
    for i, m in enumerate(METHODS):
        if diverged[i, :n].any():
            print(f"warning: {m} diverged (non-finite iterates) from {int(diverged[i, :n].sum())} of {n} starts; "
                  f"lower --eta", file=sys.stderr, flush=True)

    grid_metrics = dict(task1_end=end1[:, :n], task1_in_bowl=in_bowl[:, :n], task2_start_cond=cond[:, :n],
                        task2_steps=steps2[:, :n], task2_solved=solved2[:, :n], task2_final_loss=losses2[:, :n, -1],
                        diverged=diverged[:, :n])  # the grid's starts, without the figure's
    summary = summarize(args, grid_metrics, best2)
    print_table(summary)
    print_claims(summary)

    runner.save_npz(run_dir / "metrics.npz", methods=np.asarray(METHODS), starts=grid, **grid_metrics,
                    plot_task1=traj1[:, n], plot_task2=traj2[:, n])
    runner.save_json(run_dir / "summary.json", summary)
    plot(run_dir / "fig1_left.png", traj1[:, n], traj2[:, n], grid, args)
    print(f"wrote {run_dir}/ (summary.json, metrics.npz, fig1_left.png, config.json)")
    return summary


if __name__ == "__main__":
    with runner.quiet_on_closed_pipe():
        main(runner.cli(Args))
