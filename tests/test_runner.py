"""runner.py: run folders, config.json, atomic writes, checkpoints, one-line errors, the CLI, members and sweeps,
sharding, progress, Run and resume."""
import ast
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass, make_dataclass, replace
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
import runner

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FakeArgs:
    agent: str = "l2-er"
    lr: tuple = (0.01,)


def test_run_dir_config_npz_and_checkpoint_roundtrip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = runner.make_run_dir("pmnist", "bp")
    assert run_dir.parent == Path("runs") and run_dir.name.startswith("pmnist__bp__")
    assert runner.make_run_dir("pmnist", "bp") != run_dir  # same second: a distinct folder
    runner.save_config(run_dir, FakeArgs(), [{"lr": 0.01}], [3, 4])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["script"] == "test_runner" and config["agent"] == "l2-er"
    assert config["args"] == {"agent": "l2-er", "lr": [0.01]} and config["seeds"] == [3, 4]
    assert {"git_commit", "git_dirty", "jax_version", "device_kind"} <= config.keys()
    assert config["script_sha256"] == hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # the file that ran

    runner.save_npz(run_dir / "metrics.npz", online_acc=np.ones((1, 2, 3)))
    with np.load(run_dir / "metrics.npz") as m:
        assert m["online_acc"].shape == (1, 2, 3)

    assert runner.load_checkpoint(run_dir) is None
    state = {"keys": jax.random.split(jax.random.key(3), 2), "cbp": common.cbp_init(4), "task": 7,
             "w": jnp.arange(6.0).reshape(2, 3)}
    runner.save_checkpoint(run_dir, state)
    loaded = runner.load_checkpoint(run_dir)
    assert loaded["task"] == 7 and isinstance(loaded["cbp"], common.CBPState)
    np.testing.assert_array_equal(loaded["w"], state["w"])
    np.testing.assert_array_equal(jax.random.key_data(loaded["keys"]), jax.random.key_data(state["keys"]))
    np.testing.assert_array_equal(jax.random.uniform(loaded["keys"][1], (3,)), jax.random.uniform(state["keys"][1], (3,)))
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pkl", "config.json", "metrics.npz"]


def test_config_records_whether_the_tree_differs_from_the_commit(tmp_path, monkeypatch):
    """git_dirty: False on a clean checkout, True with a changed or a new file, None outside git."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo, check=True,
                                    capture_output=True)
    git("init", "-q")
    (repo / "common.py").write_text("x = 1\n")
    git("add", "common.py")
    git("commit", "-q", "-m", "one")
    monkeypatch.setattr(runner, "REPO_DIR", repo)

    def recorded():
        runner.save_config(tmp_path, FakeArgs(), [{"lr": 0.01}], [0])
        config = json.loads((tmp_path / "config.json").read_text())
        return config["git_dirty"], config["git_commit"]

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert recorded() == (False, head)
    (repo / "my_idea.py").write_text("# a fork\n")
    assert recorded() == (True, head)
    (repo / "my_idea.py").unlink()
    (repo / "common.py").write_text("x = 2\n")
    assert recorded() == (True, head)
    monkeypatch.setattr(runner, "REPO_DIR", tmp_path / "not_a_repo")
    assert recorded() == (None, "unknown")


def test_script_name_is_the_file_that_ran(monkeypatch):
    """A fork saved as my_idea.py says my_idea on its start line, in its run folder and in config.json."""
    fork = types.ModuleType("my_idea")
    fork.__file__ = "/somewhere/my_idea.py"
    monkeypatch.setitem(sys.modules, "my_idea", fork)
    args = type("Args", (), {"__module__": "my_idea"})()
    assert runner.script_name(args) == "my_idea" and runner.script_name(FakeArgs()) == "test_runner"


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    runner.save_npz(tmp_path / "m.npz", a=np.zeros(2))

    class Unsaveable:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        runner.save_npz(tmp_path / "m.npz", a=Unsaveable())
    with np.load(tmp_path / "m.npz") as m:
        np.testing.assert_array_equal(m["a"], np.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]


def test_fail_sweep_and_members():
    with pytest.raises(SystemExit) as exit_info:
        runner.fail("no data in /x")
    assert str(exit_info.value.code) == "error: no data in /x"
    configs = runner.sweep(lr=(0.1, 0.01), weight_decay=(0.0,))
    assert configs == [{"lr": 0.1, "weight_decay": 0.0}, {"lr": 0.01, "weight_decay": 0.0}]
    for bad in (dict(lr=(0.0,)), dict(lr=(0.1,), weight_decay=(-1e-3,)), dict(er_lr=(float("nan"),)), dict(lr=())):
        with pytest.raises(SystemExit, match="needs finite values"):
            runner.sweep(**bad)
    members = runner.Members(configs, [5, 6, 7], "vmap")  # config-major: member m = (config m // 3, seed m % 3)
    np.testing.assert_array_equal(members.config_index, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(members.seeds, [5, 6, 7, 5, 6, 7])
    np.testing.assert_allclose(members.hyperparameters(["lr"])["lr"], [0.1] * 3 + [0.01] * 3)
    assert members.grid_shaped(np.arange(6)).tolist() == [[0, 1, 2], [3, 4, 5]]


@dataclass
class CliArgs:
    agent: Literal["bp", "l2"] = "bp"
    """the agent"""
    steps: int = 1
    """steps"""


def test_cli_unknown_options_are_one_line_and_bad_values_get_tyros_message(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["script.py", "--taks", "2"])
    with pytest.raises(SystemExit) as exit_info:
        runner.cli(CliArgs)
    assert exit_info.value.code == "error: unrecognized option --taks (see --help)"  # nothing close: no guess
    monkeypatch.setattr(sys, "argv", ["script.py", "--agent", "nope"])
    with pytest.raises(SystemExit) as exit_info:
        runner.cli(CliArgs)
    assert exit_info.value.code == 2 and "nope" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["script.py", "--agent", "l2", "--steps", "3"])
    assert runner.cli(CliArgs) == CliArgs("l2", 3)


@dataclass(frozen=True)
class ForkArgs:
    """A fork's Args: L2-Init (Kumar et al. 2023) added to a table like pmnist's."""
    agent: Literal["bp", "l2", "l2-init"] = "bp"
    """the agent"""
    tasks: int = 3
    """tasks"""
    lr: tuple[float, ...] = (0.01,)
    """learning rate(s)"""
    weight_decay: tuple[float, ...] | None = None
    """coupled L2"""
    l2_init_lambda: float | None = None
    """weight of ||theta - theta_0||^2"""
    l2_init_every: int | None = None
    """steps between the penalty's updates"""
    resume: bool = False
    """continue"""


FORK_AGENTS = {"bp": {}, "l2": dict(weight_decay=1e-3), "l2-init": dict(l2_init_lambda=1e-2, l2_init_every=1)}
FORK_SWEPT = ("lr", "weight_decay")


def test_cli_names_the_closest_flag(monkeypatch):
    cases = {("--l2init-lambda", "0.1"): "unrecognized option --l2init-lambda; did you mean --l2-init-lambda?",
             ("--tsks=3",): "unrecognized option --tsks=3; did you mean --tasks?",
             ("--no-resum",): "unrecognized option --no-resum; did you mean --no-resume?",
             ("--taks", "3", "--lrr", "1"): "unrecognized options --taks --lrr; did you mean --tasks for --taks, "
                                            "--lr for --lrr?",
             ("--frobnicate",): "unrecognized option --frobnicate (see --help)"}  # nothing close: no guess
    for argv, message in cases.items():
        monkeypatch.setattr(sys, "argv", ["my_idea.py", *argv])
        with pytest.raises(SystemExit) as exit_info:
            runner.cli(ForkArgs, FORK_AGENTS)
        assert exit_info.value.code.startswith("error: " + message), exit_info.value.code


def test_cli_help_lists_the_agents_and_each_flags_default_per_agent(monkeypatch, capsys):
    """The Args field is None (the table holds the defaults): --help says the table's values, not None."""
    monkeypatch.setattr(sys, "argv", ["my_idea.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runner.cli(ForkArgs, FORK_AGENTS)
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    flat = re.sub(r"[\s\u2502]+", " ", out)  # tyro wraps lines inside a box
    assert "(default per agent: l2-init 0.01; no other agent)" in flat
    assert "(default per agent: l2 0.001; no other agent)" in flat
    assert "(default per agent: l2-init 1; no other agent)" in flat and "(default: None)" not in flat
    assert "(default: 3)" in flat  # an ordinary field keeps tyro's default
    top = out.split("\n\n")  # usage, the docstring's first line, the agents, then the options
    agents = next(block for block in top if block.startswith("Agents (--agent)")).splitlines()[1:]
    assert [line.split()[0] for line in agents] == list(FORK_AGENTS)
    assert "  l2-init  l2_init_lambda 0.01, l2_init_every 1" in agents and "  bp       (nothing added)" in agents
    monkeypatch.setattr(sys, "argv", ["my_idea.py", "--agent", "l2-init", "--l2-init-lambda", "0.5"])
    assert runner.cli(ForkArgs, FORK_AGENTS) == ForkArgs("l2-init", l2_init_lambda=0.5)  # parses as before


@pytest.mark.parametrize("script", ["pmnist", "imagenet", "cifar", "ant_ppo"])
def test_each_scripts_help_shows_its_agents_defaults_and_its_table_agrees_with_swept(script, monkeypatch, capsys):
    module = importlib.import_module(script)
    runner.check_agent(module.Args(), module.AGENTS, module.SWEPT)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit):
        runner.cli(module.Args, module.AGENTS)
    flat = re.sub(r"[\s\u2502]+", " ", capsys.readouterr().out)
    for name in {n for entry in module.AGENTS.values() for n in entry if n in module.Args.__dataclass_fields__}:
        users = [f"{agent} {entry[name]:g}" if isinstance(entry[name], float) else f"{agent} {entry[name]}"
                 for agent, entry in module.AGENTS.items() if name in entry]
        assert f"(default per agent: {', '.join(users)}" in flat, name


def test_check_agent_stops_where_a_tuple_field_and_swept_disagree():
    """The README's recipe: a swept hyperparameter is a tuple field named in SWEPT and read as hp[...]. A tuple
    field outside SWEPT (read as agent[...], it fails in the trace once the flag is given) or a SWEPT name with a
    one-value field stops at start with one line saying what to change."""
    runner.check_agent(ForkArgs(), FORK_AGENTS, FORK_SWEPT)
    Tuple = make_dataclass("Args", [("l2_init_lambda", tuple[float, ...] | None, None)], bases=(ForkArgs,),
                           frozen=True)
    with pytest.raises(SystemExit) as exit_info:
        runner.check_agent(Tuple(), FORK_AGENTS, FORK_SWEPT)
    assert exit_info.value.code == ('error: Args.l2_init_lambda takes several values (a tuple) but is not in SWEPT: '
                                    'add "l2_init_lambda" to SWEPT and read it as hp["l2_init_lambda"], or make the '
                                    'field float | None')
    runner.check_agent(Tuple(), FORK_AGENTS, FORK_SWEPT + ("l2_init_lambda",))  # the recipe: agrees
    with pytest.raises(SystemExit) as exit_info:
        runner.check_agent(ForkArgs(), FORK_AGENTS, FORK_SWEPT + ("l2_init_lambda",))
    assert exit_info.value.code == ('error: SWEPT has "l2_init_lambda" but Args.l2_init_lambda takes one value: make '
                                    'the field tuple[float, ...] | None, or take it out of SWEPT')
    with pytest.raises(SystemExit, match="unknown agent 'nope'"):
        runner.check_agent(replace(ForkArgs(), agent="nope"), FORK_AGENTS, FORK_SWEPT)


def test_cli_from_the_shell():
    """Through a real script: a typo is one line with exit 1, no traceback; a bad agent is tyro's message."""
    root = Path(runner.__file__).parent
    proc = subprocess.run([sys.executable, "pmnist.py", "--taks", "2"], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == "error: unrecognized option --taks; did you mean --tasks? (see --help)\n", proc.stderr
    proc = subprocess.run([sys.executable, "pmnist.py", "--agent", "nope"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_help_into_a_closed_pipe_exits_quietly():
    """`python pmnist.py --help | head` where head has gone: no BrokenPipeError traceback, exit status 141 (as a
    process killed by SIGPIPE). The reading end is closed before the script starts, so every write fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "pmnist.py", "--help"], cwd=ROOT, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


SCRIPTS = ["pmnist.py", "imagenet.py", "cifar.py", "ant_ppo.py", "toy.py", "plot.py", "bench.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_scripts_entry_exits_quietly_on_a_closed_pipe(script):
    """Each script's `if __name__ == "__main__":` block runs its main inside runner.quiet_on_closed_pipe()."""
    tree = ast.parse((ROOT / script).read_text())
    entry = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert len(entry) == 1
    guarded = [node for node in ast.walk(entry[0]) if isinstance(node, ast.With)
               and ast.unparse(node.items[0].context_expr) == "runner.quiet_on_closed_pipe()"]
    assert guarded and any("main(" in ast.unparse(statement) for statement in guarded[0].body)


def test_progress_line(capsys):
    """The first update's call compiled: its seconds, no rate. Later: the rate (never "0 steps/s") and the ETA."""
    progress = runner.Progress(10, "task")
    progress.update(1, 5000, online_acc=0.9123)
    progress.update(2, 5000)
    progress.update(3, 0)  # no new steps: no rate
    progress.last_time -= 1000.0
    progress.update(4, 5)  # 0.005 steps/s
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"task 1/10 \| online_acc 0.9123 \| \d+\.\d s with compiling", lines[0]), lines[0]
    assert re.fullmatch(r"task 2/10 \| [\d,]+ steps/s \| ETA \d+m\d\ds", lines[1]), lines[1]
    assert re.fullmatch(r"task 3/10 \| ETA \d+m\d\ds", lines[2]), lines[2]
    assert re.fullmatch(r"task 4/10 \| 0.005 steps/s \| ETA \d+m\d\ds", lines[3]), lines[3]


def test_shard_members_over_two_host_devices():
    """Several devices in one process: members spread over all of them, padded with copies of member 0 when
    their count does not divide; one device: unchanged."""
    code = ("import jax, jax.numpy as jnp, numpy as np, runner\n"
            "x = runner.shard_members({'a': jnp.zeros((4, 3))})['a']\n"
            "print(len(x.sharding.device_set), jax.device_count(), x.shape[0])\n"
            "y = runner.shard_members({'a': jnp.arange(3.0)})['a']\n"
            "print(len(y.sharding.device_set), *np.asarray(y).astype(int))\n"
            "print(runner.shard_members(y) is y, runner.Members([{}], [0, 1, 2]))\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["2", "2", "4"] and lines[1].split() == ["2", "0", "1", "2", "0"]
    assert lines[2].startswith("True 3 members (1 configs x 3 seeds, 1 padding), 2 x cpu, member batching vmap")
    one = runner.shard_members({"a": np.zeros((3, 2))})["a"]  # this process: one device
    assert jax.device_count() == 1 and one.shape == (3, 2)


@dataclass
class RunArgs:
    agent: str = "bp"
    lr: tuple = (0.01,)
    tasks: int = 2
    out_dir: str | None = None
    resume: bool = False


RUN_SHAPES = {"test_acc": ((), np.float32), "dead_units": ((2,), np.int32)}


def make_run(args, units):
    members = runner.Members([{"lr": 0.01}], [5, 6], "vmap")
    return runner.Run("bench", args, ("tasks", "resume"), members, units, RUN_SHAPES)


def test_run_records_checkpoints_and_resumes(tmp_path, capsys):
    """Metrics NaN / 0 until filled, a non-finite member's accuracy NaN and one warning per diverged member; a
    resume repeats the checkpoint, may grow the units or cut unfilled ones, and refuses (one line, config.json
    untouched) a new run over an old one, other settings, and fewer units than are done."""
    args = RunArgs(out_dir=str(tmp_path / "run"), tasks=3)
    run = make_run(args, 3)
    assert run.dir == tmp_path / "run" and run.state is None and run.cursor["unit"] == 0
    assert np.isnan(run.metrics["test_acc"]).all() and run.metrics["dead_units"].shape == (2, 3, 2)
    for task in (0, 1):
        run.record(task, {"finite": [True, False], "test_acc": [0.5, 0.7], "dead_units": [[1, 2], [3, 4]]},
                   f"task {task + 1}")
        assert ("seed 6 diverged" in capsys.readouterr().err) == (task == 0)
    np.testing.assert_array_equal(run.metrics["test_acc"][:, :2], [[0.5, 0.5], [np.nan, np.nan]])
    np.testing.assert_array_equal(run.metrics["dead_units"][1], [[3, 4], [3, 4], [0, 0]])
    run.checkpoint({"w": jnp.arange(2.0)})
    run.save()
    with np.load(run.dir / "metrics.npz") as m:
        assert m["test_acc"].shape == (1, 2, 2) and m["diverged"].tolist() == [[False, True]]
    for bad, units, match in ((args, 3, "already holds a run"),
                              (replace(args, resume=True, lr=(0.1,)), 3, "different settings.*lr"),
                              (replace(args, resume=True, tasks=1), 1, r"2 tasks \(or updates\) done, more than the 1"),
                              (RunArgs(resume=True), 3, "needs --out-dir"),
                              (RunArgs(resume=True, out_dir=str(tmp_path / "none")), 3, "no checkpoint.pkl")):
        with pytest.raises(SystemExit, match=match) as e:
            make_run(bad, units)
        assert "\n" not in str(e.value)
        assert json.loads((run.dir / "config.json").read_text())["args"]["tasks"] == 3
    for tasks in (5, 2):
        resumed = make_run(replace(args, resume=True, tasks=tasks), tasks)
        assert resumed.cursor["unit"] == 2 and resumed.diverged.tolist() == [[False, True]]
        np.testing.assert_array_equal(resumed.state["w"], [0.0, 1.0])
        assert resumed.metrics["test_acc"].shape == (2, tasks) and resumed.metrics["dead_units"].shape == (2, tasks, 2)
        np.testing.assert_array_equal(resumed.metrics["test_acc"][:, :2], run.metrics["test_acc"][:, :2])
        assert np.isnan(resumed.metrics["test_acc"][:, 2:]).all() and (resumed.metrics["dead_units"][:, 2:] == 0).all()
        assert json.loads((run.dir / "config.json").read_text())["args"]["tasks"] == tasks


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        runner.save_npz(tmp_path / "a.npz", x=np.ones(2))
        runner.save_json(tmp_path / "a.json", {"x": 1})
        assert (tmp_path / "a.npz").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        runner.save_npz(tmp_path / "b.npz", x=np.ones(2))
        assert (tmp_path / "b.npz").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
