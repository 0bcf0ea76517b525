"""The run plumbing the experiment scripts share (no need to modify to fork); the science is in common.py.

Members and sweeps (configs x seeds trained together, vmapped or mapped) and their sharding over devices; a job
of several processes or hosts (JAX's multi-controller runtime: the members over every process's devices, outputs
written by process 0); the CLI helpers (tyro's parse, the agents and their defaults in --help, AGENTS checked against Args and SWEPT);
one-line errors; run folders and config.json; atomic writes; checkpoints and resume; stop requests on
SIGINT / SIGTERM; progress lines.
"""
import contextlib
import difflib
import hashlib
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import typing
from dataclasses import asdict, field, fields, make_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

REPO_DIR = Path(__file__).resolve().parent


def fail(message):
    """Stop with a one-line error, exit status 1, no traceback. In a job of several processes the process ends
    at once (the others find it gone at their next exchange) instead of waiting for them at JAX's shutdown."""
    if _JOB:
        _exit_now(f"error: {message}")
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------------------
# A job of several processes (hosts): JAX's multi-controller runtime. Every process runs the same script with
# the same flags, holds the full member table and computes its own devices' members; the members are padded to
# a multiple of the job's devices (the padding repeats member 0 and is dropped from every output). Host values
# are gathered to every process; process 0 alone prints progress and writes files, a barrier after each write.
# One process with several devices (a host's GPUs) spreads and pads its members the same way (see spread()).
# ----------------------------------------------------------------------------------------------------------
DISTRIBUTED_FLAGS = ("distributed", "coordinator", "num_processes", "process_id")  # free on --resume (N -> M)
DISTRIBUTED_TIMEOUT = 60  # seconds: a job that has not formed, or a process silent this long, is an error
_JOB = {}  # {"coordinator": HOST:PORT, "index": process index} once init_processes formed a job of several


def init_processes(args):
    """Join the job of several processes `args` asks for: --distributed (JAX reads SLURM's or Open MPI's
    environment) or --coordinator HOST:PORT --num-processes N --process-id I. Nothing without those flags. Call
    it before anything touches a JAX backend (first thing in main)."""
    explicit = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
                "--process-id": args.process_id}
    if (not args.distributed and all(v is None for v in explicit.values())) or jax.distributed.is_initialized():
        return
    if args.distributed and any(v is not None for v in explicit.values()):
        fail("--distributed reads the job from SLURM or Open MPI; give it, or --coordinator, --num-processes "
             "and --process-id, not both")
    if not args.distributed and any(v is None for v in explicit.values()):
        fail(f"{' and '.join(k for k, v in explicit.items() if v is None)} missing: a job of several processes "
             f"needs --coordinator HOST:PORT, --num-processes N and --process-id I (0 .. N-1) in every process")
    if not args.distributed:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            fail(f"--coordinator {args.coordinator}: expected HOST:PORT (process 0's host, a free port)")
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            fail(f"--process-id {args.process_id} with --num-processes {args.num_processes}: need "
                 f"0 <= process id < number of processes")
    from jax._src import distributed as jax_distributed  # where JAX keeps the coordinator it found (SLURM, MPI)

    coordinator = lambda: args.coordinator or jax_distributed.global_state.coordinator_address or "(not found)"
    # SIGTERM (SLURM's warning before the time limit) is StopRequests' (a checkpoint), not JAX's preemption sync.
    jax.config.update("jax_enable_preemption_service", False)
    # JAX aborts (SIGABRT, a C++ stack trace) when its own connect timeout ends; this timer ends first, one line.
    watchdog = threading.Timer(DISTRIBUTED_TIMEOUT, lambda: _exit_now(
        f"error: the job did not form within {DISTRIBUTED_TIMEOUT} s: not every process reached the coordinator "
        f"{coordinator()} (is each started, with the same --coordinator and --num-processes?)",
        jax_distributed.global_state.process_id))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   initialization_timeout=DISTRIBUTED_TIMEOUT + 30,
                                   heartbeat_timeout_seconds=DISTRIBUTED_TIMEOUT,
                                   shutdown_timeout_seconds=DISTRIBUTED_TIMEOUT)
    except (ValueError, RuntimeError, TypeError) as e:
        hint = (" (--distributed found no SLURM or Open MPI job in the environment; outside one, give --coordinator, "
                "--num-processes and --process-id)" if args.distributed and "coordinator" in str(e) else "")
        fail(f"could not join the job: {str(e).splitlines()[0]}{hint}")
    finally:
        watchdog.cancel()
    if jax.process_count() > 1:
        _JOB.update(coordinator=coordinator(), index=jax.process_index())
        if _JOB["index"] != 0:  # progress lines and results once, from process 0
            sys.stdout = open(os.devnull, "w")
        sys.stderr = _Labelled(sys.stderr, f"[process {_JOB['index']}] ")
        sys.excepthook = _end_on_error


class _Labelled:
    """A text stream whose every line starts with `label` (a warning or error says which process it is from)."""

    def __init__(self, stream, label):
        self.stream, self.label, self.at_line_start = stream, label, True

    def write(self, text):
        for piece in text.splitlines(keepends=True):
            self.stream.write(self.label * (self.at_line_start and piece != "\n") + piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _exit_now(message=None, index=None):
    """Print `message` (one line) and end this process at once: JAX's exit would wait at a shutdown barrier
    for the other processes (DISTRIBUTED_TIMEOUT) and then abort with a C++ stack trace."""
    if message:
        label = f"[process {index}] " if index is not None and not _JOB else ""
        print(label + message, file=sys.stderr, flush=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(1)


def _end_on_error(kind, value, tb):
    traceback.print_exception(kind, value, tb)
    _exit_now()


def _exchange(what, fn, *args):
    """A collective over the job's processes; a process gone (killed, crashed) is a one-line error here."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (gloo's and the coordination service's errors have no common type)
        _exit_now(f"error: lost the job's other processes at {what} (coordinator {_JOB['coordinator']}): "
                  f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")


def _barrier(name):
    if _JOB:
        from jax.experimental import multihost_utils
        _exchange(f"the barrier after {name}", multihost_utils.sync_global_devices, name)


def _agreed_bytes(value):
    """Process 0's `value` (bytes, < 4 kB) on every process."""
    if not _JOB:
        return value
    from jax.experimental import multihost_utils
    buffer = np.frombuffer(value.ljust(4096, b"\0"), np.uint8)
    agreed = _exchange("agreeing on the run folder", multihost_utils.broadcast_one_to_all, buffer)
    return bytes(np.asarray(agreed, np.uint8)).rstrip(b"\0")


def spread():
    """Whether the members spread over several devices: one process with several (a host's GPUs) or a job of
    several processes. Either way the member table is padded to a multiple of the devices (see _global) and each
    device runs its own members with no exchange between devices."""
    return bool(_JOB) or jax.device_count() > 1


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()), ("members",))


def _padded(n):
    """n members, padded to a multiple of the job's devices."""
    return -(-n // jax.device_count()) * jax.device_count()


def _global(x):
    """A member-leading value of the full member table -> one array over all devices (of every process), each
    process holding its devices' members (the table padded with copies of member 0). Already spread: unchanged."""
    sharding = jax.sharding.NamedSharding(_mesh(), jax.sharding.PartitionSpec("members"))
    if isinstance(x, jax.Array) and (not x.is_fully_addressable or x.sharding == sharding):
        return x
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_global(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    x = np.concatenate([x, np.repeat(x[:1], _padded(x.shape[0]) - x.shape[0], axis=0)])
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _gathered(x):
    """A value on the devices (global or not) -> a host copy of all of it (a collective when global)."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jnp.asarray(_gathered(jax.random.key_data(x))), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(_exchange("gathering results", multihost_utils.process_allgather, x, True))
    return jax.device_get(x)


def check_agent(args, agents, swept):
    """The agent is an entry of AGENTS (main() may be called without tyro, which checks the choice), and Args
    agrees with SWEPT: a per-agent hyperparameter takes several values (a tuple field) exactly when it is swept.
    A swept value is traced per member (read as hp[name]); a tuple read as agent[name] would fail in the trace,
    and a swept name with a one-value field could never sweep."""
    if args.agent not in agents:
        fail(f"unknown agent {args.agent!r}; choose one of {', '.join(agents)}")
    per_agent = set().union(*agents.values())
    for name, annotation in typing.get_type_hints(type(args)).items():
        if name in per_agent and _takes_several(annotation) and name not in swept:
            fail(f"Args.{name} takes several values (a tuple) but is not in SWEPT: add \"{name}\" to SWEPT and read it "
                 f"as hp[\"{name}\"], or make the field float | None")
        if name in swept and not _takes_several(annotation):
            fail(f"SWEPT has \"{name}\" but Args.{name} takes one value: make the field tuple[float, ...] | None, or "
                 f"take it out of SWEPT")


def _takes_several(annotation):
    """tuple[X, ...] or list[X], alone or in a union (`tuple[float, ...] | None`)."""
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    return any(typing.get_origin(t) is list or (typing.get_origin(t) is tuple and typing.get_args(t)[-1:] == (...,))
               for t in (typing.get_args(annotation) if union else (annotation,)))


def agent_settings(args, agents):
    """The agent's AGENTS entry with the flags given (not None) overriding it; a flag that belongs to other
    agents only stops with one line."""
    agent = dict(agents[args.agent])
    for name in sorted(set().union(*agents.values())):
        value = getattr(args, name, None)  # a key may be the agent itself, not a flag (cifar's "reset")
        if value is not None and name not in agent:
            users = ", ".join(a for a, entry in agents.items() if name in entry)
            fail(f"--{name.replace('_', '-')} does not apply to agent {args.agent} (only {users})")
        if value is not None:
            agent[name] = value
    return agent


def agent_configs(agent, checks, swept, lr):
    """Stops with the message of the first failed (ok, message) check; else the configs to sweep: every
    combination of the `swept` hyperparameters the agent has (lr always; `lr` where the agent has none)."""
    for ok, message in checks:
        if not ok:
            fail(message)
    return sweep(**{name: tuple(np.atleast_1d(agent.get(name, lr)).tolist())
                    for name in swept if name in agent or name == "lr"})


def cli(args_class, agents=None):
    """tyro's parse. With the script's AGENTS, --help lists the agents near its top and shows each per-agent
    flag's defaults from the table (its Args default is None). An unknown option (a typo) is one line naming
    the closest flag, exit 1 (tyro names a bad value itself, exit 2)."""
    import tyro  # only the command line needs it

    parsed_class, description = args_class, None
    if agents is not None:
        parsed_class, description = _with_agent_defaults(tyro, args_class, agents)
    args, unknown = tyro.cli(parsed_class, return_unknown_args=True, description=description)
    if unknown:
        options = [u for u in unknown if u.startswith("-")] or unknown
        close = [match[0] + f" for {o}" * (len(options) > 1) for o in options
                 if (match := difflib.get_close_matches(o.split("=")[0], _flags(tyro, args_class), 1, cutoff=0.8))]
        fail(f"unrecognized option{'s' * (len(options) > 1)} {' '.join(options)}"
             f"{'; did you mean ' + ', '.join(close) + '?' if close else ''} (see --help)")
    return args_class(**{f.name: getattr(args, f.name) for f in fields(args_class)})


def _flags(tyro, args_class):
    """Every option of Args: --name, and --no-name for a bool; not the positional arguments (plot.py's runs)."""
    positional = typing.get_args(tyro.conf.Positional[int])[1:]
    flags = ["--help"]
    for name, annotation in typing.get_type_hints(args_class, include_extras=True).items():
        if not any(marker in positional for marker in typing.get_args(annotation)[1:]):
            flags += [f"--{name.replace('_', '-')}"] + [f"--no-{name.replace('_', '-')}"] * (annotation is bool)
    return flags


def _shown(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def _with_agent_defaults(tyro, args_class, agents):
    """A subclass of Args whose per-agent fields say their defaults per agent, and the --help description: the
    script's first docstring line, then each agent with its AGENTS entry (a fork's new entry shows by itself)."""
    overrides, hints = [], typing.get_type_hints(args_class, include_extras=True)
    for f in fields(args_class):
        users = [f"{name} {_shown(entry[f.name])}" for name, entry in agents.items() if f.name in entry]
        if users:
            hint = f"(default per agent: {', '.join(users)}{'; no other agent' if len(users) < len(agents) else ''})"
            overrides.append((f.name, typing.Annotated[hints[f.name], tyro.conf.arg(help_behavior_hint=hint)],
                              field(default=f.default)))
    width = max(len(name) for name in agents)
    lines = [f"  {name:<{width}}  {', '.join(f'{k} {_shown(v)}' for k, v in entry.items()) or '(nothing added)'}"
             for name, entry in agents.items()]
    doc = (sys.modules[args_class.__module__].__doc__ or "").strip().split("\n")[0]
    header = "Agents (--agent) and their defaults, from AGENTS (a flag overrides one):"
    description = "\n".join([doc, "", header] + lines)
    frozen = args_class.__dataclass_params__.frozen
    return make_dataclass(args_class.__name__, overrides, bases=(args_class,), frozen=frozen), description


@contextlib.contextmanager
def quiet_on_closed_pipe():
    """A reader that closes the pipe early (`python pmnist.py --help | head`) ends the script quietly with exit
    status 141, as a process killed by SIGPIPE, instead of a BrokenPipeError traceback."""
    try:
        try:
            yield
        finally:
            sys.stdout.flush()  # raises here, not at the interpreter's exit, where it would print an error
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's last flush finds no reader
        raise SystemExit(141) from None


def sweep(**values):
    """One dict per combination, row-major. Swept values must be finite and >= 0, `lr` > 0."""
    for name, vals in values.items():
        if not vals or any(not np.isfinite(v) or v < 0 or (name == "lr" and v == 0) for v in vals):
            fail(f"--{name.replace('_', '-')} needs finite values >= 0 (lr > 0), got {tuple(vals)}")
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


MEMBER_BATCHING = ("auto", "vmap", "map")


def resolve_batching(choice):
    """"auto": "map" on one CPU device (measured ~2x faster per member there), else "vmap"."""
    if choice == "auto":
        return "map" if jax.default_backend() == "cpu" and jax.device_count() == 1 else "vmap"
    return choice


def over_members(fn, batching, in_axes, jit=jax.jit):
    """`fn` of one member run for every member (`in_axes`: 0 = member axis leading, None = shared). "vmap": one
    batched program; "map": one single-member program called per member (members split and stacked on the host).
    On several devices (one process's or a job's): one program over all of them, each device running its own
    members (vmapped, or one after another with "map") with no exchange between devices; outputs stay there."""
    if spread():
        return _over_devices(fn, batching, in_axes, jit)
    if batching == "vmap":
        return jit(jax.vmap(fn, in_axes=in_axes))
    single = jit(fn)

    def run(*args):
        batched = [jax.device_get(a) if axis == 0 else a for a, axis in zip(args, in_axes)]
        size = next(jax.tree.leaves(a)[0].shape[0] for a, axis in zip(batched, in_axes) if axis == 0)
        outs = [single(*[jax.tree.map(lambda x: x[m], a) if axis == 0 else a for a, axis in zip(batched, in_axes)])
                for m in range(size)]
        return jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(outs))

    return run


def _over_devices(fn, batching, in_axes, jit):
    P = jax.sharding.PartitionSpec
    if batching == "vmap":
        body = jax.vmap(fn, in_axes=in_axes)
    else:
        def body(*args):
            def one(member):
                member = iter(member)
                return fn(*[next(member) if axis == 0 else a for a, axis in zip(args, in_axes)])
            return jax.lax.map(one, tuple(a for a, axis in zip(args, in_axes) if axis == 0))
    program = jit(jax.shard_map(body, mesh=_mesh(), in_specs=tuple(P("members") if axis == 0 else P() for axis in in_axes),
                                out_specs=P("members"), check_vma=False))

    def run(*args):
        return program(*[jax.tree.map(_global, a) if axis == 0 else a for a, axis in zip(args, in_axes)])

    return run


def shard_members(tree):
    """Spread the leading (member) axis over the devices when there are several (padded: see _global)."""
    return jax.tree.map(_global, tree) if spread() else tree


class Members:
    """The configs x seeds a run trains together, config-major: member m = (config m // S, seed m % S)."""

    def __init__(self, configs, seeds, batching="auto"):
        self.configs, self.seed_list = list(configs), [int(s) for s in seeds]
        self.grid = (len(self.configs), len(self.seed_list))
        self.count, self.batching = self.grid[0] * self.grid[1], resolve_batching(batching)
        self.config_index = np.repeat(np.arange(self.grid[0]), self.grid[1])
        self.seeds = jnp.asarray(np.tile(np.asarray(self.seed_list), self.grid[0]), jnp.int32)

    def hyperparameters(self, names):
        """{name: float32 [members]} of the swept hyperparameters (0 where a config lacks one)."""
        return {n: jnp.asarray([self.configs[c].get(n, 0.0) for c in self.config_index], jnp.float32) for n in names}

    def run(self, fn, in_axes, batching=None):
        return over_members(fn, batching or self.batching, in_axes)

    def grid_shaped(self, a):
        """[members, ...] -> [configs, seeds, ...]."""
        return np.asarray(a).reshape(self.grid + np.shape(a)[1:])

    def host(self, tree):
        """Member outputs -> host copies of the real members (gathered from every process, padding dropped)."""
        return jax.tree.map(lambda x: _gathered(x)[:self.count], tree)

    def __str__(self):
        job = f" over {jax.process_count()} processes" if _JOB else ""
        padding = _padded(self.count) - self.count if spread() else 0
        return (f"{self.count} members ({self.grid[0]} configs x {self.grid[1]} seeds"
                f"{f', {padding} padding' if padding else ''}), {jax.device_count()} x "
                f"{jax.devices()[0].device_kind}{job}, member batching {self.batching}")


def finite_mean(values):
    """Mean over the finite entries (diverged members are NaN); NaN if there are none."""
    values = np.asarray(values, np.float64)
    return float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")


def _script(args):
    """The file of the script whose Args these are (`my_idea.py` for a fork)."""
    return Path(sys.modules[type(args).__module__].__file__)


def script_name(args):
    """The name of the script whose Args these are, for its start line: `my_idea` for a fork of pmnist.py."""
    return _script(args).stem


def make_run_dir(script, agent, out_dir=None):
    """`out_dir`, else a new runs/<script>__<agent>__<UTC stamp>[-n] (created; process 0's name in a job)."""
    if out_dir is None and not _JOB.get("index"):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out_dir = Path("runs") / f"{script}__{agent}__{stamp}"
        for suffix in itertools.count(2):
            if not out_dir.exists():
                break
            out_dir = Path("runs") / f"{script}__{agent}__{stamp}-{suffix}"
    out_dir = Path(_agreed_bytes(str(out_dir).encode()).decode())
    if not _JOB.get("index"):
        out_dir.mkdir(parents=True, exist_ok=True)
    _barrier("making the run folder")
    return out_dir


def _atomic_write(path, write):
    """Write to a temporary name beside `path`, then rename: a killed run never leaves half a file. In a job of
    several processes, process 0 writes and every process waits for it (a barrier)."""
    path = Path(path)
    if _JOB.get("index"):
        return _barrier(f"writing {path.name}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _barrier(f"writing {path.name}")


def save_npz(path, **arrays):
    _atomic_write(path, lambda f: np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def save_json(path, obj):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def save_config(run_dir, args, configs, seeds, benchmark=None):
    """config.json: the script, its benchmark (plot.py overlays a fork's runs on its parent's), every Args field,
    the config axis, the seeds and provenance: the commit, whether the work tree differed from it (`git_dirty`:
    changed or new files; None outside git) and the sha256 of the script file that ran (a fork's own code)."""
    def git(*command):
        try:
            proc = subprocess.run(["git", *command], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    save_json(Path(run_dir) / "config.json", {
        "script": _script(args).stem, "benchmark": benchmark or _script(args).stem,
        "agent": getattr(args, "agent", None), "args": asdict(args), "configs": list(configs),
        "seeds": [int(s) for s in seeds], "git_commit": commit or "unknown",
        "git_dirty": None if status is None else bool(status),
        "script_sha256": hashlib.sha256(_script(args).read_bytes()).hexdigest(), "jax_version": jax.__version__,
        "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})


class _PRNGKeys(NamedTuple):  # a typed PRNG key array, pickle-able
    impl: str
    data: np.ndarray


def save_checkpoint(run_dir, state):
    """Pickle `state` (arrays, typed PRNG keys, Python values) to checkpoint.pkl atomically."""
    def to_host(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return _PRNGKeys(str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)))
        return np.asarray(x) if isinstance(x, jax.Array) else x

    host_state = jax.tree.map(to_host, state)
    _atomic_write(Path(run_dir) / "checkpoint.pkl", lambda f: pickle.dump(host_state, f))


def load_checkpoint(run_dir):
    """The state `save_checkpoint` saved, arrays back on the device; None if there is none."""
    path = Path(run_dir) / "checkpoint.pkl"
    if not path.exists():
        return None
    with open(path, "rb") as f:
        host_state = pickle.load(f)

    def to_device(x):
        if isinstance(x, _PRNGKeys):
            return jax.random.wrap_key_data(jnp.asarray(x.data), impl=x.impl)
        return jnp.asarray(x) if isinstance(x, np.ndarray) else x

    return jax.tree.map(to_device, host_state, is_leaf=lambda x: isinstance(x, _PRNGKeys))


def _with_units(metrics, units):
    """[members, units, ...] host copies: unfilled units appended (NaN for floats, 0 for integers) or cut."""
    def resize(a):
        pad = np.full((a.shape[0], max(units - a.shape[1], 0)) + a.shape[2:],
                      np.nan if np.issubdtype(a.dtype, np.floating) else 0, a.dtype)
        return np.concatenate([np.asarray(a)[:, :units], pad], axis=1)

    return {k: resize(a) for k, a in metrics.items()}


class Run:
    """A run folder and all resume needs in one checkpoint: args, training state, metrics and spectra ([members,
    units, ...], NaN / 0 until filled), diverged members and the cursor (unit in progress, its calls done, their
    partial sums). A resume must repeat every flag but `resume_free` (and the job's: another number of processes
    may resume it) and keep the units done; both are checked before config.json is rewritten. Units may grow, or
    shrink down to those done (only unfilled ones go). Host values hold the real members only (Members.host)."""

    def __init__(self, benchmark, args, resume_free, members, units, shapes, spectra_shapes=None, spectra_units=0):
        self.args, self.members, ckpt = args, members, None
        if args.resume:
            if args.out_dir is None:
                fail("--resume needs --out-dir pointing at the run to continue")
            self.dir, ckpt = Path(args.out_dir), load_checkpoint(args.out_dir)
            if ckpt is None:
                fail(f"--resume: no checkpoint.pkl in {self.dir}")
            changed = sorted(k for k, v in asdict(args).items()
                             if k not in (*resume_free, *DISTRIBUTED_FLAGS) and ckpt["args"].get(k) != v)
            if changed:
                fail(f"--resume with different settings than the run in {self.dir}: {', '.join(changed)}")
            if ckpt["cursor"]["unit"] > units:
                fail(f"--resume: the run in {self.dir} has {ckpt['cursor']['unit']} tasks (or updates) done, more "
                     f"than the {units} asked for")
        elif args.out_dir is not None and (Path(args.out_dir) / "checkpoint.pkl").exists():
            fail(f"{args.out_dir} already holds a run: pass --resume to continue it, or another --out-dir")
        else:
            self.dir = make_run_dir(_script(args).stem, args.agent, args.out_dir)
        save_config(self.dir, args, members.configs, members.seed_list, benchmark)
        if ckpt is None:
            self.state, self.cursor = None, {"unit": 0, "call": 0, "partial": {}}
            empty = lambda shapes: {k: np.zeros((members.count, 0) + tuple(s), d) for k, (s, d) in shapes.items()}
            self.metrics = _with_units(empty(shapes), units)
            self.spectra = _with_units(empty(spectra_shapes or {}), spectra_units)
            self.diverged = np.zeros(members.grid, bool)
        else:
            self.state, self.cursor, self.diverged = ckpt["state"], ckpt["cursor"], np.asarray(ckpt["diverged"])
            self.metrics = _with_units(ckpt["metrics"], units)
            self.spectra = _with_units(ckpt["spectra"], spectra_units)
            print(f"resuming {self.dir}: {self.cursor['unit']} done, {self.cursor['call']} calls into the next",
                  flush=True)

    def record(self, unit, values, where):
        """Store unit `unit`'s metrics ({name: [members, ...]}, with `finite` [members]: members whose parameters
        are finite; the others' accuracies become NaN), warn once per newly diverged member, advance the cursor."""
        values = dict(values)
        finite = np.asarray(values.pop("finite"), bool)
        for name, v in values.items():
            v = np.asarray(v)
            if name.endswith("_acc"):  # a non-finite network's argmax means nothing
                v = np.where(finite.reshape((-1,) + (1,) * (v.ndim - 1)), v, np.nan)
            self.metrics[name][:, unit] = v
        new = ~self.members.grid_shaped(finite) & ~self.diverged
        for c, s in zip(*np.nonzero(new & (not _JOB.get("index")))):  # once in a job: every process knows
            print(f"warning: config {self.members.configs[c]} seed {self.members.seed_list[s]} diverged (non-finite "
                  f"values) at {where}; its metrics are NaN from here, the other members continue",
                  file=sys.stderr, flush=True)
        self.diverged = self.diverged | new
        self.cursor = {"unit": unit + 1, "call": 0, "partial": {}}

    def accumulate(self, calls_done, **sums):
        """Add a call's sums (online accuracy counts, losses) to the unit in progress; `calls_done` of it done."""
        partial = self.cursor["partial"]
        self.cursor = {**self.cursor, "call": calls_done,
                       "partial": {k: partial[k] + v if k in partial else v for k, v in sums.items()}}

    def checkpoint(self, state):
        if spread():  # the real members' state, gathered: any number of devices and processes resumes it
            state = self.members.host(state)
        save_checkpoint(self.dir, {"args": asdict(self.args), "state": state, "cursor": self.cursor,
                                   "metrics": self.metrics, "spectra": self.spectra, "diverged": self.diverged})

    def save(self, spectra_units=None):
        """metrics.npz ([configs, seeds, units done, ...] and `diverged`); hessian.npz for the `spectra_units`
        measured so far (`tasks` and [configs, seeds, K, ...])."""
        done = self.cursor["unit"]
        save_npz(self.dir / "metrics.npz", diverged=self.diverged,
                 **{k: self.members.grid_shaped(v[:, :done]) for k, v in self.metrics.items()})
        if spectra_units:
            save_npz(self.dir / "hessian.npz", tasks=np.asarray(spectra_units),
                     **{k: self.members.grid_shaped(v[:, :len(spectra_units)]) for k, v in self.spectra.items()})


def resume_command(args, run_dir):
    """The command that continues `args`'s run: the script, every flag off its default, --resume --out-dir."""
    defaults, flags = type(args)(), []
    for name, value in asdict(args).items():
        if name in ("resume", "out_dir", "process_id") or value == getattr(defaults, name) or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (tuple, list)):
            flags.append(f"{flag} {' '.join(str(v) for v in value)}")
        else:
            flags.append(f"{flag} {value}")
    each = " (in each process, with its --process-id)" if getattr(args, "coordinator", None) else ""
    return " ".join(["python", _script(args).name, *flags, "--resume", "--out-dir", str(run_dir)]) + each


class StepTimer:
    """Wall time of the calls timed with `timing(include)` (leave out those that compile); callers add `steps`."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    @contextlib.contextmanager
    def timing(self, include=True):
        start = time.perf_counter()
        yield
        if include:
            self.seconds += time.perf_counter() - start


class StopRequests:
    """SIGINT / SIGTERM ask for a stop at the next safe point (`requested`), where the run checkpoints; a second
    Ctrl-C kills at once (the default action is restored), the last checkpoint intact (files are atomic). In a job
    of several processes a signal to any one stops them all: each read of `requested` or `due` is an exchange
    every process makes at the same point, so they agree and stay in step."""

    def __init__(self):
        self.signal, self._requested = None, False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.signal, self._requested = signum, True
        signal.signal(signum, signal.SIG_DFL)
        print("\nstopping at the next safe point (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self._agreed(False)[0] if _JOB else self._requested

    def due(self, last_checkpoint, minutes):
        """A stop was asked for, or `minutes` have passed since `last_checkpoint` (a time.time()): time to
        checkpoint (in a job: by any process's clock, agreed)."""
        if not _JOB:
            return self.requested or time.time() - last_checkpoint >= 60 * minutes
        stop, late = self._agreed(time.time() - last_checkpoint >= 60 * minutes)
        return stop or late

    def _agreed(self, late):
        """(a stop asked of any process, `late` on any process); a signal caught elsewhere becomes this one's."""
        from jax.experimental import multihost_utils
        local = np.array([self.signal or 0, late], np.int32)
        signals, lates = _exchange("a safe point", multihost_utils.process_allgather, local).reshape(-1, 2).T
        if signals.any() and not self._requested:
            self.signal, self._requested = int(signals.max()), True
        return bool(signals.any()), bool(lates.any())

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def exit(self, where, command):
        """One line after the checkpoint, exit status 128 + signal (130 for SIGINT, 143 for SIGTERM)."""
        self.close()
        print(f"interrupted after {where}; resume with: {command}", flush=True)
        raise SystemExit(128 + int(self.signal))


class Progress:
    """One line per update: `task 12/800 | online_acc 0.912 | 45,210 steps/s | ETA 1h02m`. The first update's
    calls compiled: it shows their seconds instead; rate (last update) and ETA (mean since the first) follow."""

    def __init__(self, total_units, unit_name="task", start_units=0):
        self.total, self.unit_name, self.done = total_units, unit_name, start_units
        self.last_time, self.first_end = time.perf_counter(), None  # first_end: (time, units) after compiling

    def update(self, done_units, new_steps, **shown):
        now = time.perf_counter()
        line = f"{self.unit_name} {done_units}/{self.total}" + "".join(
            f" | {k} {v:.4g}" if isinstance(v, float) else f" | {k} {v}" for k, v in shown.items())
        if self.first_end is None:
            line, self.first_end = line + f" | {now - self.last_time:.1f} s with compiling", (now, done_units)
        else:
            rate = new_steps / max(now - self.last_time, 1e-9)
            line += f" | {rate:,.0f} steps/s" if rate >= 10 else f" | {rate:.2g} steps/s" if rate > 0 else ""
            if done_units > self.first_end[1]:
                eta = (now - self.first_end[0]) / (done_units - self.first_end[1]) * (self.total - done_units)
                line += f" | ETA {_format_seconds(eta)}"
        self.last_time, self.done = now, done_units
        print(line, flush=True)


def _format_seconds(seconds):
    hours, rest = divmod(int(max(seconds, 0)), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
