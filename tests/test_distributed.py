"""A job of several processes (JAX's multi-controller runtime) on the CPU: two local processes with one CPU device
each form one job over 127.0.0.1 (--coordinator, or a SLURM environment with --distributed), spread the members
over both devices (padding when they do not divide), and give the results of one process; a job stopped by
SIGTERM to one process, or broken by a killed one, resumes on one process as if never interrupted."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import ant_ppo
import cifar
import imagenet
import pmnist
import runner

ROOT = Path(__file__).resolve().parents[1]
# pmnist: 250 steps = 2 chunks of 100 and a tail of 50; spectra every task (the "map" path).
PMNIST = dict(agent="l2", steps_per_task=250, width=16, eval_size=100, seed=5, synthetic_data=True)
HESSIAN = dict(hessian_every=1, hessian_samples=100, lanczos_iters=8)
# As tests/test_ant_ppo.py's TINY: the in-process runs share its compiled programs.
ANT = dict(num_envs=4, num_steps=64, num_minibatches=4, update_epochs=2, hidden_size=16, total_steps=128,
           change_every=32, episode_length=8, updates_per_chunk=1, fast_compile=True)
SMALL_DATA = """
import numpy as np
rng = np.random.default_rng(0)
cifar_data = dict(x_train=rng.integers(0, 256, (1000, 32, 32, 3), np.uint8), y_train=np.tile(np.arange(100), 10),
                  x_test=rng.integers(0, 256, (200, 32, 32, 3), np.uint8), y_test=np.tile(np.arange(100), 2))
"""
exec(SMALL_DATA)  # defines cifar_data; the job's processes run the same source


def flags(**args):
    """Command-line flags of Args values (tuples as several values, booleans as bare flags)."""
    out = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, tuple):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_job(tmp_path, command, explicit=True, n=2, slurm_port=None):
    """n processes of `command` (a list after the python executable): each with --coordinator and its
    --process-id, or (explicit=False) in a fake SLURM job step; one CPU device each. Returns the Popens, their
    output in tmp_path/p<i>.out / .err."""
    port, procs = free_port(), []
    for i in range(n):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))}
        env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
        if explicit:
            job = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
        else:  # the variables srun sets; JAX derives the coordinator (the node list's first host) from them
            env.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(n),
                       SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=str(port))
            job = ["--distributed"]
        # Each process inherits this one's core (tests/conftest.py): XLA's CPU rounding depends on the cores.
        with open(tmp_path / f"p{i}.out", "w") as out, open(tmp_path / f"p{i}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, *command, *job], cwd=ROOT, env=env, stdout=out,
                                          stderr=err))
    return procs


def finish(tmp_path, procs, timeout=300):
    """[(exit status, stdout, stderr)] of each process."""
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the job did not end: " + (tmp_path / "p0.err").read_text()[-2000:])
    return [(p.returncode, (tmp_path / f"p{i}.out").read_text(), (tmp_path / f"p{i}.err").read_text())
            for i, p in enumerate(procs)]


def wait_for(path, text, procs, timeout=240):
    start = time.time()
    while text not in path.read_text():
        if time.time() - start > timeout or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"no {text!r} in {path}: " + path.with_suffix(".err").read_text()[-2000:])
        time.sleep(0.2)


def load(run_dir, name="metrics.npz"):
    with np.load(Path(run_dir) / name) as f:
        return {k: f[k] for k in f.files}


def assert_close(a, b, atol=1e-6, rtol=0.0):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        if np.issubdtype(a[k].dtype, np.number):
            np.testing.assert_allclose(a[k].astype(np.float64), b[k].astype(np.float64), atol=atol, rtol=rtol,
                                       err_msg=k)
        else:
            assert (a[k] == b[k]).all(), k


def test_sigterm_to_one_process_stops_the_job_and_one_process_resumes_it(tmp_path):
    """4 members (2 seeds x 2 lrs) over 2 processes: SIGTERM to process 1 checkpoints and exits both (143), process
    0 printing the resume command; the run resumed by one process equals one process's uninterrupted run."""
    args = pmnist.Args(**PMNIST, tasks=4, seeds=2, lr=(0.01, 0.03), checkpoint_minutes=0.0, member_batching="vmap")
    procs = start_job(tmp_path, ["pmnist.py", *flags(**PMNIST, tasks=4, seeds=2, lr=(0.01, 0.03),
                                                      checkpoint_minutes=0, member_batching="vmap",
                                                      out_dir=tmp_path / "job")])
    wait_for(tmp_path / "p0.out", "task 1/4", procs)
    procs[1].send_signal(signal.SIGTERM)
    (rc0, out0, err0), (rc1, out1, err1) = finish(tmp_path, procs)
    assert (rc0, rc1) == (143, 143), err0[-2000:] + err1[-2000:]
    assert "4 members (2 configs x 2 seeds), 2 x cpu over 2 processes" in out0
    assert "interrupted after task" in out0 and "--coordinator 127.0.0.1:" in out0 and "--resume" in out0
    assert not [line for line in out1.splitlines() if "Gloo" not in line]  # (gloo's own line, from C++)
    assert "[process 1] stopping at the next safe point" in err1 and "error" not in err0 + err1
    assert json.loads((tmp_path / "job" / "config.json").read_text())["args"]["num_processes"] == 2
    done = load(tmp_path / "job")["online_acc"].shape[2]
    assert 1 <= done < 4  # stopped mid-run
    pmnist.main(replace(args, out_dir=str(tmp_path / "job"), resume=True))  # one process, map (auto)
    pmnist.main(replace(args, out_dir=str(tmp_path / "whole"), member_batching="auto"))
    assert_close(load(tmp_path / "job"), load(tmp_path / "whole"))


def test_killed_process_is_a_one_line_error_and_the_run_resumes(tmp_path):
    """3 members on 2 devices (one padding member) with spectra: SIGKILL to process 1 mid-run ends process 0 with
    one line naming the coordinator well within the stated timeout; one process resumes from the last
    checkpoint to the metrics and spectra of its own uninterrupted run."""
    job = PMNIST | HESSIAN | dict(tasks=4, seeds=3, checkpoint_minutes=0)
    procs = start_job(tmp_path, ["pmnist.py", *flags(**job, out_dir=tmp_path / "job")])
    wait_for(tmp_path / "p0.out", "task 2/4", procs)
    procs[1].kill()
    killed = time.time()
    (rc0, out0, err0), _ = finish(tmp_path, procs)
    assert time.time() - killed < runner.DISTRIBUTED_TIMEOUT
    assert "3 members (1 configs x 3 seeds, 1 padding)" in out0
    lines = [line for line in err0.splitlines() if line.strip()]
    assert rc0 == 1 and len(lines) == 1, err0[-3000:]
    assert lines[0].startswith("[process 0] error: lost the job's other processes") and "coordinator 127.0.0.1:" in lines[0]
    assert (tmp_path / "job" / "checkpoint.pkl").exists()
    args = pmnist.Args(**job)
    pmnist.main(replace(args, out_dir=str(tmp_path / "job"), resume=True))
    pmnist.main(replace(args, out_dir=str(tmp_path / "whole")))
    for name in ("metrics.npz", "hessian.npz"):
        assert_close(load(tmp_path / "job", name), load(tmp_path / "whole", name))


def test_ant_ppo_in_a_slurm_job_equals_one_process(tmp_path):
    """--distributed in a fake SLURM job step of 2 tasks forms the job; ant_ppo's 4 members (2 seeds x 2 lrs) equal
    one process's run up to float32 rounding: the job's program (partitioned over 2 devices) rounds the MJX
    physics differently from one device's (1e-7 relative in the first update's returns), and the contacts grow
    it (measured: at most 6e-5 relative in any metric after 2 updates, every member; vmap or map alike)."""
    job = ANT | dict(agent="bp", seeds=2, lr=(3e-4, 1e-3), member_batching="map")
    procs = start_job(tmp_path, ["ant_ppo.py", *flags(**job, out_dir=tmp_path / "job")], explicit=False)
    (rc0, out0, err0), (rc1, _, err1) = finish(tmp_path, procs)
    assert (rc0, rc1) == (0, 0), err0[-2000:] + err1[-2000:]
    assert "2 x cpu over 2 processes" in out0
    ant_ppo.main(ant_ppo.Args(**job, out_dir=str(tmp_path / "one")))
    assert_close(load(tmp_path / "job"), load(tmp_path / "one"), atol=1e-6, rtol=3e-4)


@pytest.mark.parametrize("script", ["imagenet", "cifar"])
def test_imagenet_and_cifar_run_distributed(tmp_path, script):
    """3 members (one padding) over 2 processes equal one process's run up to float32 rounding, on tiny synthetic
    data (measured with vmap on each device: 6e-7 relative for imagenet, 8e-5 for cifar's losses). CIFAR: one
    task (its compiles are the file's slowest)."""
    if script == "imagenet":
        job = dict(tasks=2, epochs=2, batch_size=4, train_per_class=6, test_per_class=1, seeds=3,
                   synthetic_data=True, member_batching="map")
        command = ["imagenet.py", *flags(**job, out_dir=tmp_path / "job")]
        one = lambda: imagenet.main(imagenet.Args(**job, out_dir=str(tmp_path / "one")))
    else:
        job = dict(tasks=1, epochs=1, width=4, dense_width=16, batch_size=10, eval_batch=100, feature_samples=100,
                   seeds=3, member_batching="map")
        code = SMALL_DATA + "import sys, cifar, runner\nsys.argv[0] = 'cifar.py'\n" \
                            "cifar.main(runner.cli(cifar.Args, cifar.AGENTS), cifar_data)\n"
        command = ["-c", code, *flags(**job, out_dir=tmp_path / "job")]
        one = lambda: cifar.main(cifar.Args(**job, out_dir=str(tmp_path / "one")), cifar_data)  # noqa: F821
    (rc0, out0, err0), (rc1, _, err1) = finish(tmp_path, start_job(tmp_path, command))
    assert (rc0, rc1) == (0, 0), err0[-2000:] + err1[-2000:]
    assert "3 members (1 configs x 3 seeds, 1 padding), 2 x cpu over 2 processes" in out0
    one()
    assert_close(load(tmp_path / "job"), load(tmp_path / "one"), rtol=1e-4)


@pytest.mark.parametrize("job, message", [
    (dict(coordinator="127.0.0.1:1", num_processes=2), "--process-id missing"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "expected HOST:PORT"),
    (dict(coordinator="h:5", num_processes=2, process_id=2), "need 0 <= process id"),
    (dict(num_processes=2, process_id=0), "--coordinator missing"),
    (dict(distributed=True, num_processes=2), "not both"),
])
def test_impossible_job_flags_are_one_line_errors(job, message):
    with pytest.raises(SystemExit, match=message) as stop:
        runner.init_processes(pmnist.Args(**job))
    assert str(stop.value).startswith("error: ") and "\n" not in str(stop.value)
    assert not runner._JOB  # checked before JAX's runtime is touched
