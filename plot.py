"""Draw the paper's figures from run directories.

    python plot.py runs/pmnist__bp__* runs/pmnist__l2_er__* --smooth 11 --tasks 50 300 790

Reads what every experiment script writes (config.json, metrics.npz and, when spectra were taken,
hessian.npz; format in the README) and writes one PNG per figure and per benchmark script:
- performance_<script>.png   mean over seeds with a 95% t-interval band (Fig. 3)
- units_rank_<script>.png    dead units and effective rank over tasks (Fig. 6)
- hessian_<script>.png       Hessian spectral density at task init and end, log y (Figs. 10, 12, 13)
- curvature_<script>.png     accuracy vs normalized eps-rank at task init with a least-squares line (Figs. 2, 7);
                             the eps-rank integrates the smoothed density, as the authors computed Fig. 2
Runs of several agents and scripts can be mixed: runs of one script share its figures; runs of one experiment
split over seeds (e.g. one `--seed S --seeds 1` per core) are pooled into one line. For Slippery Ant runs
it also prints a per-phase table (return at each phase's end, the drop after each friction change, dead units
and effective rank); --table prints one of chosen windows for any script.
"""

import json
import itertools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import scipy.signal  # noqa: E402
import scipy.stats  # noqa: E402
import tyro  # noqa: E402

import hessian  # noqa: E402
import runner  # noqa: E402


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[Annotated[tuple[Path, ...], tyro.conf.arg(metavar="RUN_DIR [RUN_DIR ...]")]]
    """run directories written by pmnist.py, imagenet.py, cifar.py or ant_ppo.py (several may be mixed)"""
    out: Path | None = None
    """folder for the PNGs; default: the run directory itself, or the common parent folder of several"""
    smooth: int | None = None
    """Savitzky-Golay window (odd number of tasks/updates) applied to every seed's curve before averaging; default: no smoothing"""
    polyorder: int = 2
    """polynomial order of the Savitzky-Golay filter"""
    tasks: tuple[int, ...] | None = None
    """tasks (counted from 1, as in the console) whose Hessian spectra are drawn (nearest measured task is used); default: first, middle and last measured"""
    eps: float = 0.1
    """epsilon of the epsilon-rank (fraction of spectral mass with |eigenvalue| > eps) in the curvature figure (paper: 0.1)"""
    eps_rank_from: Literal["density", "weights"] = "density"
    """curvature figure's eps-rank from the smoothed density (as the authors computed Fig. 2) or the raw quadrature weights"""
    hessian_seed: int | None = None
    """seed (as in config.json) whose spectrum is drawn; default: the probes of all finite seeds pooled"""
    table: tuple[str, ...] | None = None
    """also print a markdown table of the primary metric over these windows of tasks (updates), each FIRST-LAST counted from 1, e.g. 1-10 191-200: per run and config, the mean over seeds of each seed's window mean, with its 95% t-interval half-width"""
    phase_window: int = 100_000
    """Slippery Ant runs: env steps averaged at the end of each friction phase (and after each change) in the
    printed per-phase table"""


# script -> (primary metric key, y label, name of the metric's time axis)   (paper Fig. 3)
PRIMARY = {
    "pmnist": ("online_acc", "online accuracy", "task"),
    "imagenet": ("test_acc", "test accuracy", "task"),
    "cifar": ("test_acc", "test accuracy", "task"),
    "ant_ppo": ("episodic_return", "episodic return", "update"),
}
# what one Hessian measurement index means: a task, or a friction phase for Ant (paper App. G.4)
HESSIAN_UNIT = {"ant_ppo": "phase"}
PLOTTED = {key for key, _, _ in PRIMARY.values()} | {"dead_units", "effective_rank"}
HESSIAN_KEYS = ("tasks", "init_nodes", "init_weights", "end_nodes", "end_weights")


def notice(msg):
    print(f"notice: {msg}", flush=True)


def one_line(err):
    return " ".join(str(err).split())


# ---------------------------------------------------------------- statistics
def savgol(y, window, polyorder):
    """Savitzky-Golay smoothing of a 1-D series (scipy.signal.savgol_filter, polynomial fits at the edges).
    Non-finite entries split the series into segments smoothed separately (window shrunk to the segment;
    too short: left as is)."""
    y = np.asarray(y, dtype=np.float64)
    out = y.copy()
    finite = np.isfinite(y)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], finite.astype(np.int8), [0]])))
    for start, stop in zip(edges[::2], edges[1::2]):
        n = stop - start
        w = min(window, n if n % 2 else n - 1)
        if w > polyorder:
            out[start:stop] = scipy.signal.savgol_filter(y[start:stop], w, polyorder, mode="interp")
    return out


def mean_ci(values, level=0.95):
    """Per column of values [seeds, T]: mean over the finite seeds, the half-width of the two-sided
    t-interval t_{(1+level)/2, n-1} * sd / sqrt(n) (NaN where fewer than 2 finite seeds), and n."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    n = finite.sum(axis=0)
    filled = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / n
        sd = np.sqrt(np.where(finite, (filled - mean) ** 2, 0.0).sum(axis=0) / (n - 1))
        crit = np.where(n >= 2, scipy.stats.t.ppf((1 + level) / 2, np.maximum(n - 1, 1)), np.nan)
        half = crit * sd / np.sqrt(n)
    return mean, half, n


def line_fit(x, y):
    """Least-squares line y = slope * x + intercept and its R^2 = 1 - SS_res / SS_tot."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xm, ym = x.mean(), y.mean()
    sxx, syy = ((x - xm) ** 2).sum(), ((y - ym) ** 2).sum()
    if len(x) < 2 or sxx == 0 or syy == 0:
        return np.nan, np.nan, np.nan
    slope = ((x - xm) * (y - ym)).sum() / sxx
    intercept = ym - slope * xm
    r2 = 1.0 - ((y - slope * x - intercept) ** 2).sum() / syy
    return slope, intercept, r2


# ---------------------------------------------------------------- run directories
@dataclass
class Run:
    path: Path
    script: str
    agent: str
    configs: list
    seeds: list
    metrics: dict
    hessian: dict | None
    labels: list  # one legend label per config
    colors: list  # one line colour per config
    width: int | None = None  # units per hidden layer, when the run recorded it
    args: dict | None = None  # the script's arguments, as config.json records them
    source: str | None = None  # the script that wrote the run (a fork of pmnist.py names itself, not pmnist)


def load_run(path):
    path = Path(path)
    if not path.is_dir():
        runner.fail(f"{path}: not a directory")
    if not (path / "config.json").is_file():
        runner.fail(f"{path}: not a run directory (no config.json)")
    if not (path / "metrics.npz").is_file():
        runner.fail(f"{path}: no metrics.npz (a run writes it after its first task)")
    try:
        cfg = json.loads((path / "config.json").read_text())
        # the benchmark the run belongs to (a fork of pmnist.py records "pmnist"), else its script's name
        script, agent = str(cfg.get("benchmark", cfg["script"])), str(cfg["agent"])
        configs, seeds = [dict(c) for c in cfg["configs"]], [int(s) for s in cfg["seeds"]]
        run_args, source = dict(cfg.get("args", {})), str(cfg["script"])
        width = run_args.get("width")
    except (ValueError, KeyError, TypeError) as e:
        runner.fail(f"{path}/config.json: not a run config ({type(e).__name__}: {one_line(e)})")
    if not configs or not seeds:
        runner.fail(f"{path}/config.json: empty 'configs' or 'seeds'")
    try:
        with np.load(path / "metrics.npz") as f:
            metrics = {k: f[k] for k in f.files}
    except Exception as e:  # a truncated or foreign file
        runner.fail(f"{path}/metrics.npz: unreadable ({type(e).__name__}: {one_line(e)})")
    shape = (len(configs), len(seeds))
    for key in PLOTTED & metrics.keys():
        arr = metrics[key]
        if arr.shape[:2] != shape:
            runner.fail(f"{path}/metrics.npz: '{key}' has shape {arr.shape}, expected leading {shape} (configs, seeds)")
    hess = None
    if (path / "hessian.npz").is_file():
        try:
            with np.load(path / "hessian.npz") as f:
                hess = {k: f[k] for k in f.files}
        except Exception as e:  # a truncated or foreign file: the other figures can still be drawn
            notice(f"{path.name}: hessian.npz unreadable ({type(e).__name__}: {one_line(e)}); spectra skipped")
            return Run(path, script, agent, configs, seeds, metrics, None, [], [], width, run_args, source)
        missing = [k for k in HESSIAN_KEYS if k not in hess]
        bad = [k for k in HESSIAN_KEYS[1:] if k in hess and hess[k].shape[:3] != (*shape, len(hess["tasks"]))]
        if missing or bad:
            notice(f"{path.name}: hessian.npz lacks {missing} or has misshapen {bad}; spectra skipped")
            hess = None
    return Run(path, script, agent, configs, seeds, metrics, hess, [], [], width, run_args, source)


# Arguments that may differ between runs of one experiment that were split over seeds (several processes,
# machines or sessions) and are pooled into one line: where each run went, and how it was run, not what it did.
POOL_FREE = ("seed", "seeds", "out_dir", "resume", "data_dir", "manual_dir", "checkpoint_minutes",
             "member_batching", "tasks", "total_steps")


def pool_seed_runs(runs):
    """Runs of one experiment split over seeds (same script, agent, configs and arguments but for POOL_FREE,
    disjoint seeds) become one run with all their seeds, e.g. `--seed 2024 --seeds 1` and `--seed 2025 --seeds 1`
    on two cores; a seed trains the same alone as beside others. Time axes are cut to the shortest run, and only
    the Hessian measurements every run has are kept."""
    def key(r):
        kept = sorted((k, repr(v)) for k, v in (r.args or {}).items() if k not in POOL_FREE)
        return r.source, r.script, r.agent, repr(r.configs), repr(kept)
    pooled = []
    for run in runs:
        home = next((p for p in pooled if key(p[0]) == key(run)
                     and not {s for r in p for s in r.seeds} & set(run.seeds)), None)
        if home is None:
            pooled.append([run])
        else:
            home.append(run)
    return [group[0] if len(group) == 1 else merge_runs(group) for group in pooled]


def merge_runs(group):
    """One Run holding the seeds of every run in group (all of one experiment, see pool_seed_runs)."""
    first, C = group[0], len(group[0].configs)
    keys = set.intersection(*(set(r.metrics) for r in group))
    metrics = {}
    for k in sorted(keys):
        arrays = [r.metrics[k] for r in group]
        if any(a.shape[:2] != (C, len(r.seeds)) for a, r in zip(arrays, group)):
            # shared by all members (Ant's env_steps [U], layer_names): kept where every run agrees on its
            # first T entries, T the shortest run's
            if arrays[0].ndim and all(a.ndim == arrays[0].ndim for a in arrays):
                T = min(len(a) for a in arrays)
                if all(np.array_equal(a[:T], arrays[0][:T]) for a in arrays):
                    metrics[k] = arrays[0][:T]
            continue
        if arrays[0].ndim >= 3:  # [C, S, T, ...]: the time axis of the shortest run
            T = min(a.shape[2] for a in arrays)
            arrays = [a[:, :, :T] for a in arrays]
        if len({a.shape[2:] for a in arrays}) == 1:
            metrics[k] = np.concatenate(arrays, axis=1)
    primary = PRIMARY.get(first.script, (None,))[0]
    lengths = sorted({r.metrics[primary].shape[2] for r in group if primary in r.metrics})
    hess = None
    if all(r.hessian is not None for r in group):
        common_tasks = sorted(set.intersection(*(set(r.hessian["tasks"].tolist()) for r in group)))
        if common_tasks:
            hess = {"tasks": np.asarray(common_tasks)}
            for k in HESSIAN_KEYS[1:]:
                hess[k] = np.concatenate([r.hessian[k][:, :, [r.hessian["tasks"].tolist().index(t)
                                                                 for t in common_tasks]] for r in group], axis=1)
    names = "+".join(r.path.name for r in group)
    notice(f"pooled {names} as one run of seeds {[s for r in group for s in r.seeds]}"
           + (f"; cut to the shortest, {lengths[0]} of {lengths[-1]}" if len(lengths) > 1 else ""))
    return Run(first.path.parent / names, first.script, first.agent, first.configs,
               [s for r in group for s in r.seeds], metrics, hess, [], [], first.width, first.args, first.source)


def _fmt(value):
    """An argument's value as a label shows it: 0.99, 64, 0.2961 0.0387."""
    if isinstance(value, (list, tuple)):
        return " ".join(_fmt(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def set_labels(runs):
    """Agent name, plus the config values that vary when a run has several configs; lines that would still
    share a label get the arguments that set them apart (e.g. `bp [beta1=0.99, beta2=0.99]` beside plain bp; an
    unset argument, the agent's default, is not shown), then the config values their run's labels do not show,
    then the run directory's name. Also fixes each line's colour (an agent's own colour in every figure of a
    script, for its plainest run; RESET, the CIFAR baseline, in black as in the paper)."""
    def varying(run):  # the config keys a run's labels show
        return [k for k in run.configs[0] if len({repr(c.get(k)) for c in run.configs}) > 1]

    def differing_args(run, c, label, group):  # arguments in which the runs sharing this label differ
        peers = [r.args or {} for r in group if label in r.labels]
        args = run.args or {}
        keys = sorted({k for a in peers for k in a} - set(POOL_FREE) - set(run.configs[c]))
        return ", ".join(f"{k}={_fmt(args[k])}" for k in keys
                         if args.get(k) is not None and len({repr(a.get(k)) for a in peers}) > 1)

    def extra(fallback, run, c, label, group):  # what a label that is still shared gets, per fallback
        if fallback == "args":
            return differing_args(run, c, label, group)
        if fallback == "all":
            return ", ".join(f"{k}={v}" for k, v in run.configs[c].items() if k not in varying(run))
        return run.path.name

    for run in runs:
        run.labels = [" ".join([run.agent] + [f"{k}={_fmt(c.get(k))}" for k in varying(run)]) for c in run.configs]
    for script in {r.script for r in runs}:
        group = [r for r in runs if r.script == script]
        for fallback in ("args", "all", "dir"):
            seen = [lab for r in group for lab in r.labels]
            new = {}
            for run in group:
                for c, lab in enumerate(run.labels):
                    if seen.count(lab) > 1:
                        more = extra(fallback, run, c, lab, group)
                        new[id(run), c] = f"{lab} [{more}]" if more else lab
            for run in group:  # after the loop: differing_args compares the labels as they were
                run.labels = [new.get((id(run), c), lab) for c, lab in enumerate(run.labels)]
        # A known agent's single-config run keeps its colour in every figure; other lines (a second run of
        # that agent too) take the tab10 colours no known agent of this group uses, in order.
        used = {AGENT_COLORS[r.agent.lower()] for r in group if r.agent.lower() in AGENT_COLORS}
        free = itertools.cycle([c for c in [f"C{i}" for i in range(10)] if c not in used] or ["C0"])
        owner = {}  # agent -> its single-config run with the shortest label (plain bp, not bp [beta1=0.99, ...])
        for run in group:
            a = run.agent.lower()
            if len(run.configs) == 1 and (a not in owner or len(run.labels[0]) < len(owner[a].labels[0])):
                owner[a] = run
        for run in group:
            known = AGENT_COLORS.get(run.agent.lower()) if owner.get(run.agent.lower()) is run else None
            run.colors = [known or next(free) for _ in run.configs]


# One colour per agent in every figure; RESET, the CIFAR baseline, in black as in the paper.
AGENT_COLORS = {"bp": "C0", "l2": "C1", "er": "C2", "l2-er": "C3", "cbp": "C4", "snp": "C5", "snp-l2": "C6",
                "spectral-reg": "C7", "layernorm-l2": "C8", "redo": "C9", "reset": "black"}


def line_style(run, c):
    return dict(color=run.colors[c], linestyle="--" if run.agent.lower() == "reset" else "-")


def report_nonfinite(run, c, values, what, axis_name):
    """One line naming the seeds excluded somewhere because their value was not finite."""
    bad = ~np.isfinite(values)  # [S, T]
    if bad.any():
        seeds = [run.seeds[s] for s in np.flatnonzero(bad.any(axis=1))]
        notice(f"{run.path.name} [{run.labels[c]}]: {what} not finite for seeds {seeds} at "
               f"{int(bad.any(axis=0).sum())} of {values.shape[1]} {axis_name}s; excluded there from mean and CI")


def draw_curve(ax, values, label, style, args, bounds=(None, None)):
    """Mean over seeds and 95% band (clipped to `bounds`, e.g. counts >= 0); values [S, T], each seed smoothed
    first when asked. The x axis counts tasks (updates) from 1, as the scripts' progress lines do."""
    if args.smooth:
        values = np.stack([savgol(v, args.smooth, args.polyorder) for v in values])
    mean, half, _ = mean_ci(values)
    x = np.arange(1, values.shape[1] + 1)
    ax.plot(x, mean, label=label, lw=1.2, **style)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # a few tasks: 1, 2, 3, not 1.25
    ax.fill_between(x, np.clip(mean - half, *bounds), np.clip(mean + half, *bounds), alpha=0.2,
                    color=style["color"], lw=0)


def save(fig, out, name):
    path = out / name
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}", flush=True)
    return path


def smooth_note(args):
    return f" (Savitzky-Golay window {args.smooth}, order {args.polyorder})" if args.smooth else ""


# ---------------------------------------------------------------- figures
def plot_performance(script, runs, out, args):
    """Fig. 3: the benchmark's primary metric, mean over seeds with a 95% confidence band."""
    if script not in PRIMARY:
        notice(f"{script}: no primary metric known; performance figure skipped")
        return []
    key, ylabel, unit = PRIMARY[script]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for run in runs:
        if key not in run.metrics:
            notice(f"{run.path.name}: no '{key}' in metrics.npz; left out of performance_{script}.png")
            continue
        if run.metrics[key].ndim != 3:
            notice(f"{run.path.name}: '{key}' has shape {run.metrics[key].shape}, not [config, seed, {unit}]; left out")
            continue
        for c in range(len(run.configs)):
            values = run.metrics[key][c].astype(np.float64)
            report_nonfinite(run, c, values, key, unit)
            draw_curve(ax, values, run.labels[c], line_style(run, c), args)
            drawn += 1
    if not drawn:
        plt.close(fig)
        notice(f"{script}: no run has '{key}'; performance figure skipped")
        return []
    ax.set(xlabel=unit, ylabel=ylabel, title=f"{script}: {ylabel}, mean and 95% CI over seeds{smooth_note(args)}")
    legend(ax, below=mark_friction_phases(ax, runs))
    ax.grid(alpha=0.3)
    return [save(fig, out, f"performance_{script}.png")]


def friction_phases(runs):
    """Slippery Ant's phases as [(first update, last update, friction)], updates counted from 1, from the first
    run's first member that records `friction` (with the authors' schedule every seed has the same one)."""
    friction = next((r.metrics["friction"][0, 0] for r in runs
                     if r.metrics.get("friction", np.zeros(0)).ndim == 3), None)
    if friction is None:
        return []
    friction = friction[np.isfinite(friction)]
    starts = [0] + [u for u in range(1, len(friction)) if friction[u] != friction[u - 1]]
    return [(s + 1, e, float(friction[s])) for s, e in zip(starts, starts[1:] + [len(friction)])]


def mark_friction_phases(ax, runs):
    """A dotted line where the friction changes and each phase's friction along the top (App. J's schedule).
    Returns the phases, empty when the runs have none."""
    phases = friction_phases(runs)
    for first, last, friction in phases:
        if first > 1:
            ax.axvline(first - 0.5, color="0.35", ls=":", lw=1)
        ax.text((first + last) / 2, 0.98, f"friction {friction:.4g}", transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7, color="0.25")
    return phases


def legend(ax, below):
    """Below the axes when friction labels take the top edge, where it would cover them."""
    ax.legend(fontsize=8, **(dict(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3) if below else {}))


def plot_units_rank(script, runs, out, args):
    """Fig. 6: dead units (sum over hidden layers) and effective rank (mean over layers) over tasks."""
    panels = [("dead_units", "dead units (sum over hidden layers)", np.sum),
              ("effective_rank", "effective rank (mean over layers)", np.mean)]
    unit = PRIMARY.get(script, (None, None, "task"))[2]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    drawn = 0
    for ax, (key, ylabel, reduce) in zip(axes, panels):
        n_lines = 0
        for run in runs:
            if key not in run.metrics:
                notice(f"{run.path.name}: no '{key}' in metrics.npz; left out of units_rank_{script}.png")
                continue
            for c in range(len(run.configs)):
                arr = run.metrics[key][c].astype(np.float64)
                values = reduce(arr, axis=-1) if arr.ndim == 3 else arr  # [S, T, L] -> [S, T]
                report_nonfinite(run, c, values, key, unit)
                bounds = ((0, arr.shape[-1] * run.width if run.width else None) if key == "dead_units"
                          else (None, None))  # a count's band stays in [0, units]
                draw_curve(ax, values, run.labels[c], line_style(run, c), args, bounds)
                n_lines += 1
        if n_lines:
            ax.set(xlabel=unit, ylabel=ylabel)
            legend(ax, below=mark_friction_phases(ax, runs))  # Slippery Ant: do units die at the changes?
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, f"no '{key}' in these runs", ha="center", va="center", transform=ax.transAxes)
        drawn += n_lines
    if not drawn:
        plt.close(fig)
        notice(f"{script}: no run has dead_units or effective_rank; units/rank figure skipped")
        return []
    fig.suptitle(f"{script}: dead units and effective rank, mean and 95% CI over seeds{smooth_note(args)}")
    return [save(fig, out, f"units_rank_{script}.png")]


def finite_seeds(h, c, k, args, run):
    """Seed indices whose init and end spectra at measurement k are finite (and match --hessian-seed)."""
    chosen = range(len(run.seeds))
    if args.hessian_seed is not None:
        chosen = [s for s in chosen if run.seeds[s] == args.hessian_seed]
    return [s for s in chosen
            if all(np.isfinite(h[key][c, s, k]).all() for key in HESSIAN_KEYS[1:])]


def plot_hessian(script, runs, out, args):
    """Figs. 10, 12, 13: spectral density (hessian.density) at task init and end, log-scaled y."""
    unit = HESSIAN_UNIT.get(script, "task")
    rows = []
    for run in runs:
        if run.hessian is None:
            notice(f"{run.path.name}: no hessian.npz; left out of hessian_{script}.png")
            continue
        if args.hessian_seed is not None and args.hessian_seed not in run.seeds:
            notice(f"{run.path.name}: seed {args.hessian_seed} not in this run; left out of hessian_{script}.png")
            continue
        measured = np.asarray(run.hessian["tasks"]).astype(int) + 1  # counted from 1, as in the console
        if measured.size == 0:
            notice(f"{run.path.name}: hessian.npz holds no measurement yet; left out of hessian_{script}.png")
            continue
        wanted = args.tasks if args.tasks else sorted({measured[0], measured[len(measured) // 2], measured[-1]})
        ks = []
        for t in wanted:
            k = int(np.argmin(np.abs(measured - t)))
            if measured[k] != t:
                notice(f"{run.path.name}: {unit} {t} not measured; nearest measured {unit} {measured[k]} drawn")
            ks.append((t, k))
        rows += [(run, c, ks) for c in range(len(run.configs))]
    if not rows:
        notice(f"{script}: no run has a usable hessian.npz; Hessian figure skipped")
        return []
    ncols = max(len(ks) for _, _, ks in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(4.2 * ncols, 2.8 * len(rows)), squeeze=False)
    for i, (run, c, ks) in enumerate(rows):
        h = run.hessian
        for j, (t, k) in enumerate(ks):
            ax = axes[i, j]
            seeds = finite_seeds(h, c, k, args, run)
            title = f"{run.labels[c]}: {unit} {int(h['tasks'][k]) + 1}"
            ax.set_title(title if int(h["tasks"][k]) == t else f"{title} (asked {t})", fontsize=9)
            if not seeds:
                ax.text(0.5, 0.5, "no finite spectrum", ha="center", va="center", transform=ax.transAxes)
                continue
            expected = len(run.seeds) if args.hessian_seed is None else 1
            if len(seeds) < expected:
                ax.text(0.02, 0.95, f"{len(seeds)} of {expected} seeds finite", transform=ax.transAxes, va="top", fontsize=7)
            peak_min = np.inf
            for when, color in (("init", "tab:blue"), ("end", "tab:orange")):
                nodes = h[f"{when}_nodes"][c, seeds, k]  # [S', probes, iters]: pool seeds as probes
                weights = h[f"{when}_weights"][c, seeds, k]
                grid, dens = hessian.density(nodes.reshape(-1, nodes.shape[-1]), weights.reshape(-1, weights.shape[-1]))
                grid, dens = np.asarray(grid), np.asarray(dens)
                peak_min = min(peak_min, dens.max())
                ax.plot(grid, dens, color=color, lw=1.0, label=when)
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(peak_min * 1e-8, np.finfo(np.float32).tiny))
            ax.tick_params(labelsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel("eigenvalue")
            if j == 0:
                ax.set_ylabel("density")
        for j in range(len(ks), ncols):
            axes[i, j].axis("off")
    drawn = [ax for ax in axes.flat if ax.lines]
    if drawn:
        drawn[0].legend(fontsize=7, loc="upper right")
    who = "all finite seeds pooled" if args.hessian_seed is None else f"seed {args.hessian_seed}"
    fig.suptitle(f"{script}: Hessian spectral density at {unit} init and end ({who})")
    fig.tight_layout()
    return [save(fig, out, f"hessian_{script}.png")]


EPS_RANK_ROUTE = {"density": "smoothed density", "weights": "quadrature weights"}


def eps_ranks(nodes, weights, eps, route):
    """Normalized eps-rank of each spectrum in nodes, weights [N, probes, iters] -> [N].

    'density' (the default of the curvature figure): mass of the Gaussian-smoothed density (App. F.1) with
    |lambda| > eps, as the authors' code computed Fig. 2's x-axis; 'weights': the quadrature weights' mass
    with |lambda| > eps. A spectrum with a non-finite entry gives NaN."""
    nodes, weights = np.asarray(nodes), np.asarray(weights)
    if route not in EPS_RANK_ROUTE:
        raise ValueError(f"route must be one of {sorted(EPS_RANK_ROUTE)}, got {route!r}")
    if len(nodes) == 0:
        return np.zeros(0, np.float64)
    if route == "weights":
        ranks = np.array(jax.vmap(lambda n, w: hessian.epsilon_rank(n, w, eps))(nodes, weights))
    else:
        # lax.map, not vmap: each spectrum's kernel matrix is [10,000 grid points, probes x iters].
        one = lambda nw: hessian.density_epsilon_rank(nw[0], nw[1], eps)
        ranks = np.array(jax.jit(lambda n, w: jax.lax.map(one, (n, w)))(nodes, weights))
    # A NaN node with a finite weight would otherwise count as mass at or below eps.
    ranks[~(np.isfinite(nodes) & np.isfinite(weights)).reshape(len(nodes), -1).all(axis=1)] = np.nan
    return ranks


def plot_curvature(script, runs, out, args):
    """Figs. 2, 7: per measured task, accuracy against normalized eps-rank of the Hessian at that task's
    init (parameters after task t-1 on task t's data), each averaged over the seeds where both are finite;
    one least-squares line through all points. The eps-rank integrates the smoothed density by default
    (--eps-rank-from). Returns (written files, R^2)."""
    if script not in PRIMARY or PRIMARY[script][2] != "task":
        notice(f"{script}: no per-task accuracy; curvature figure skipped")
        return [], None
    key = PRIMARY[script][0]
    route = EPS_RANK_ROUTE[args.eps_rank_from]
    groups = []
    for run in runs:
        if run.hessian is None or key not in run.metrics:
            notice(f"{run.path.name}: needs hessian.npz and '{key}'; left out of curvature_{script}.png")
            continue
        h, acc = run.hessian, run.metrics[key]
        for c in range(len(run.configs)):
            nodes, weights = h["init_nodes"][c], h["init_weights"][c]  # [S, K, probes, iters]
            ranks = eps_ranks(nodes.reshape(-1, *nodes.shape[2:]), weights.reshape(-1, *weights.shape[2:]),
                              args.eps, args.eps_rank_from).reshape(nodes.shape[:2])  # [S, K]
            xs, ys = [], []
            for k, t in enumerate(np.asarray(h["tasks"]).astype(int)):
                if t >= acc.shape[2]:
                    continue  # spectrum taken, accuracy of that task not saved yet
                x, y = ranks[:, k], acc[c, :, t].astype(np.float64)  # [S] each
                ok = np.isfinite(x) & np.isfinite(y)
                if ok.any():
                    xs.append(x[ok].mean())
                    ys.append(y[ok].mean())
            if xs:
                groups.append((run, c, np.array(xs), np.array(ys)))
    if not groups:
        notice(f"{script}: no run has both hessian.npz and '{key}'; curvature figure skipped")
        return [], None
    x_all = np.concatenate([g[2] for g in groups])
    y_all = np.concatenate([g[3] for g in groups])
    slope, intercept, r2 = line_fit(x_all, y_all)
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for run, c, xs, ys in groups:
        ax.scatter(xs, ys, s=14, label=run.labels[c], color=run.colors[c])
    if np.isfinite(r2):
        grid = np.linspace(x_all.min(), x_all.max(), 2)
        ax.plot(grid, slope * grid + intercept, "k:", lw=1.5, label="least-squares fit")
        print(f"curvature vs accuracy [{script}], eps={args.eps:g}: R^2 = {r2:.4f} (slope {slope:.4g}, "
              f"intercept {intercept:.4g}, {len(x_all)} points; eps-rank from the {route})", flush=True)
    else:
        notice(f"{script}: curvature fit undefined (fewer than 2 points, or no spread); no line drawn")
    ax.text(0.03, 0.95, f"$R^2$ = {r2:.3f}", transform=ax.transAxes, va="top", fontsize=11)
    ax.set(xlabel=f"normalized $\\epsilon$-rank of H at task init ($\\epsilon$ = {args.eps:g}, {route})",
           ylabel=PRIMARY[script][1], title=f"{script}: curvature vs accuracy (mean over seeds per task)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return [save(fig, out, f"curvature_{script}.png")], float(r2)


def ci_cell(values, mean_format=".4g", half_format=".2g"):
    """'mean +- 95% half-width' over the finite entries of a [seeds] vector (the mean alone for one seed)."""
    mean, half, n = mean_ci(np.asarray(values, np.float64)[:, None])
    return f"{mean[0]:{mean_format}} +- {half[0]:{half_format}}" if n[0] > 1 else f"{mean[0]:{mean_format}}"


def window_table(script, runs, windows):
    """Markdown rows: the primary metric averaged over each window per seed, then mean +- 95% half-width over
    seeds; a window that reaches past a run's last task is marked n/a."""
    key, label, unit = PRIMARY[script]
    lines = [f"| {script} run [config] | seeds | " + " | ".join(f"{label}, {unit}s {w}" for w in windows) + " |",
             "|---|---|" + "---|" * len(windows)]
    for run in runs:
        if key not in run.metrics:
            continue
        for c in range(len(run.configs)):
            values, cells = run.metrics[key][c].astype(np.float64), []
            for first, last in (map(int, w.split("-")) for w in windows):
                if last > values.shape[1]:
                    cells.append(f"n/a ({values.shape[1]} done)")
                    continue
                cells.append(ci_cell(np.nanmean(values[:, first - 1:last], axis=1), ".4f", ".4f"))
            lines.append(f"| {run.path.name} [{run.labels[c]}] | {len(run.seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PHASE_KEYS = {"episodic_return", "friction", "env_steps", "dead_units", "effective_rank"}
CONTROL_KEYS = ("step_reward", "ctrl_cost", "action_rms")  # phase_table's reward, control cost and action RMS


def phase_table(run, window_steps):
    """Markdown rows for one Slippery Ant run, one per config and friction phase: over the last `window_steps`
    env steps of the phase, each seed's mean return, then mean +- 95% half-width over seeds; the first
    `window_steps` after a change relative to the last ones before it (each seed's ratio, where every return
    before is positive, and both returns); dead units and effective rank of the actor's and critic's hidden layer
    over the phase's last window (mean over seeds); where the run records them, the env's reward and control
    cost per env step and the RMS of the policy's action mean over that window (mean over seeds): how much of
    the return the control cost takes. A last phase shorter than the first is marked "so far" (the run is
    still in it)."""
    width = max(1, round(window_steps / float(run.metrics["env_steps"][0])))  # updates per window
    costs = set(CONTROL_KEYS) <= run.metrics.keys()
    lines = [f"| {run.path.name} [config] | seeds | phase | friction | updates | return, last {window_steps:,} steps "
             f"| first {window_steps:,} steps after the change / last before | dead units (actor, critic) | "
             "effective rank (actor, critic) |" + (" reward / control cost per step (action RMS) |" if costs else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if costs else "")]
    phases = friction_phases([run])
    for c, label in enumerate(run.labels):
        ret = run.metrics["episodic_return"][c].astype(np.float64)  # [seeds, updates]; NaN: no episode ended
        for k, (first, last, friction) in enumerate(phases):
            end = slice(max(first - 1, last - width), last)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a seed with no episode in a window: NaN
                change = "-"
                if k:
                    before = np.nanmean(ret[:, max(0, first - 1 - width):first - 1], axis=1)
                    after = np.nanmean(ret[:, first - 1:min(last, first - 1 + width)], axis=1)
                    positive = np.all(before[np.isfinite(before)] > 0)  # else a ratio reads backwards
                    ratio = ci_cell(after / before) if positive else "n/a (return <= 0)"
                    change = f"{ratio} ({ci_cell(after)} vs {ci_cell(before)})"
                units = [np.nanmean(run.metrics[key][c][:, end, layer]) for key in ("dead_units", "effective_rank")
                         for layer in (0, 1)]
                spent = [np.nanmean(run.metrics[key][c][:, end]) for key in CONTROL_KEYS] if costs else []
                end_return = ci_cell(np.nanmean(ret[:, end], axis=1))
            so_far = " so far" if k and k == len(phases) - 1 and last - first < phases[0][1] - phases[0][0] else ""
            lines.append(f"| {run.path.name} [{label}] | {len(run.seeds)} | {k + 1} | {friction:.4g} | "
                         f"{first}-{last}{so_far} | {end_return} | {change} | {units[0]:.3g}, {units[1]:.3g} | "
                         f"{units[2]:.4g}, {units[3]:.4g} |" +
                         (f" {spent[0]:.3g} / {spent[1]:.3g} ({spent[2]:.2f}) |" if costs else ""))
    return "\n".join(lines)


def main(args):
    """Writes the figures; returns (list of written PNG paths, {script: R^2 of the curvature fit})."""
    if not args.run_dirs:
        runner.fail("give at least one run directory")
    if not args.eps >= 0:
        runner.fail(f"--eps must be >= 0, got {args.eps}")
    if args.phase_window <= 0:
        runner.fail(f"--phase-window must be > 0 env steps, got {args.phase_window}")
    if args.table and not all(w.count("-") == 1 and all(p.isdigit() and int(p) > 0 for p in w.split("-"))
                              and int(w.split("-")[0]) <= int(w.split("-")[1]) for w in args.table):
        runner.fail(f"--table windows must look like 1-10 (tasks counted from 1), got {' '.join(args.table)}")
    if args.smooth is not None and (args.smooth % 2 == 0 or args.smooth <= args.polyorder):
        runner.fail(f"--smooth must be an odd window larger than --polyorder ({args.polyorder}), got {args.smooth}")
    runs = pool_seed_runs([load_run(p) for p in args.run_dirs])
    set_labels(runs)
    if args.out is not None:
        out = Path(args.out)
    elif len(args.run_dirs) == 1:
        out = Path(args.run_dirs[0])
    else:
        out = Path(os.path.commonpath([Path(p).resolve() for p in args.run_dirs]))
    out.mkdir(parents=True, exist_ok=True)
    written, r2 = [], {}
    for script in dict.fromkeys(r.script for r in runs):  # first-seen order
        group = [r for r in runs if r.script == script]
        if args.table and script in PRIMARY:
            print(window_table(script, group, args.table), flush=True)
        if script == "ant_ppo":
            for run in (r for r in group if PHASE_KEYS <= r.metrics.keys()):
                print(phase_table(run, args.phase_window), flush=True)
        written += plot_performance(script, group, out, args)
        written += plot_units_rank(script, group, out, args)
        written += plot_hessian(script, group, out, args)
        files, value = plot_curvature(script, group, out, args)
        written += files
        if value is not None:
            r2[script] = value
    return written, r2


if __name__ == "__main__":
    with runner.quiet_on_closed_pipe():
        main(runner.cli(Args))
