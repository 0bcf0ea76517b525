"""bench.py: the formatting and ratio rules on hand-made rows, and one `--quick` run end to end (the table has
every section, every ratio is finite, positive and equal to the quotient of the times it compares, and the
file named by --out holds the printed table)."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("pMNIST", "ER routes", "Hessian", "ImageNet", "CIFAR", "Ant", "New agents")
# "New agents" rows compare with the bp and baseline rows of their benchmark's section
HOME_SECTION = {"`imagenet`": "ImageNet", "`cifar`": "CIFAR", "`ant_ppo`": "Ant"}
COLUMNS = ("section", "work", "time", "vs baseline", "vs bp", "compile s", "full run (goal)", "note")


def test_projection_and_time_formats():
    assert bench.projection(1.6 * 3600, 2 * 3600, quick=False) == "1.6 h (goal <= 2.0 h: met)"
    assert bench.projection(25 * 60, 20 * 60, quick=False) == "25.0 min (goal <= 20.0 min: missed)"
    assert bench.projection(1.0, 2.0, quick=True) == "- (quick sizes)"
    row = bench.Row("pmnist", "bp5", "w", 123.1e-6, "step", None, None, None, "")
    assert bench.format_time(row) == "123.1 us per step"
    assert bench.format_time(row._replace(seconds=0.25)) == "250.0 ms per step"
    assert bench.format_time(row._replace(seconds=1 / 42_000, unit="env-step")) == "42,000 env-steps/s"
    assert bench.format_time(row._replace(seconds=None)) == "not measured"


def test_ratios_compare_rows_of_the_same_section_only():
    b = bench.Bench(bench.QUICK, quick=True)
    b.add("pmnist", "bare5", "baseline", 100e-6)
    b.add("pmnist", "bp5", "bp", 97e-6, baseline="bare5", bp="bp5")
    er = b.add("pmnist", "l2-er5", "l2-er", 123e-6, baseline="bare5", bp="bp5")
    b.add("imagenet", "bp5", "another section's bp", 1.0)
    missing = b.add("ant", "l2-er5", "no bp row in this section", 1e-5, baseline="bare5", bp="bp5")
    assert bench.ratio(b, er, er.baseline) == "1.23"
    assert bench.ratio(b, er, er.bp) == "1.27"
    assert bench.ratio(b, missing, missing.bp) == "" and bench.ratio(b, missing, missing.baseline) == ""
    b.skip("cifar", "left out", "why")
    assert bench.ratio(b, b.rows[-1], "bp5") == ""


def seconds_of(cell):
    """Seconds per unit of work from a time cell ("12.5 us per step", "250 ms per call", "42,000 env-steps/s")."""
    number = float(cell.split()[0].replace(",", ""))
    if cell.endswith("env-steps/s"):
        return 1 / number
    return number * {"us": 1e-6, "ms": 1e-3}[cell.split()[1]]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "table.md"
    # compiling is most of a quick run (~2.5 CPU minutes cold): the subprocess shares the tests' persistent
    # compilation cache (tests/conftest.py)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_quick_run_writes_the_printed_table(quick_run):
    out, stdout = quick_run
    text = out.read_text()
    assert text.strip() in stdout
    assert re.search(r"device: 1 x \S.* \(cpu\); jax \d+\.\d+", text)
    # the Ant run at ant_ppo's default of 1 env is planned, measured at full size only (one more compilation)
    assert re.search(r"\| Ant \| `ant_ppo` l2-er, 2 seed\(s\), 1 envs, .* \| not measured \|", text)


def test_quick_table_has_every_section_with_consistent_ratios(quick_run):
    check_table(quick_run[0].read_text())


def check_table(text):
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert tuple(c.strip() for c in lines[0].strip("|").split("|")) == COLUMNS
    rows = [dict(zip(COLUMNS, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]
    assert all(len(r) == len(COLUMNS) for r in rows)
    assert tuple(dict.fromkeys(r["section"] for r in rows)) == SECTIONS  # all seven, in order
    assert not [r for r in rows if r["note"] == "error"], [r["work"] for r in rows if r["note"] == "error"]
    compared = 0
    for i, r in enumerate(rows):
        if r["time"] == "not measured":
            assert r["note"].startswith("left out by --quick"), r
            continue
        assert seconds_of(r["time"]) > 0
        for column in ("vs baseline", "vs bp"):
            if not r[column]:
                continue
            value = float(r[column])
            assert math.isfinite(value) and value > 0, r
            # the quotient of this row's time and its reference row's, both as printed: the baseline is the
            # nearest baseline row above it (same member count, or none stated), bp the bp row of its count
            home = HOME_SECTION.get(r["work"].split()[0], r["section"]) if r["section"] == "New agents" else r["section"]
            if column == "vs baseline":
                references = [o for o in rows[:i][::-1] if o["section"] == home and o["work"].startswith("baseline: ")
                              and seed_count(o["work"]) in (None, seed_count(r["work"]))][:1]
            else:
                references = [o for o in rows if o["section"] == home and "` bp," in o["work"]
                              and seed_count(o["work"]) == seed_count(r["work"])]
            assert references, r
            expected = seconds_of(r["time"]) / seconds_of(references[0]["time"])
            assert value == pytest.approx(expected, rel=0.02, abs=0.006), r
            compared += 1
    # bp rows are 1.00 against themselves; each script's l2-er row has both ratios
    for section in ("pMNIST", "ImageNet", "CIFAR", "Ant"):
        l2_er = [r for r in rows if r["section"] == section and "` l2-er" in r["work"] and r["time"] != "not measured"
                 and "1 env: " not in r["note"]]  # Ant at 1 env has no bp or baseline row of its env count
        assert l2_er and all(r["vs bp"] for r in l2_er), section
        assert all(r["vs bp"] == "1.00" for r in rows if r["section"] == section and "` bp," in r["work"]
                   and r["time"] != "not measured")
    assert compared >= 12


def seed_count(work):
    match = re.search(r"(\d+) (?:seed|member)", work)
    return match and int(match.group(1))


def test_budget_stops_measuring_and_says_so(tmp_path):
    """--max-minutes below the one-minute reserve: nothing is measured, the section's row says how to run it."""
    out = tmp_path / "t.md"
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--only", "hessian", "--max-minutes", "0.5",
                           "--set", "lanczos_iters=7", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OPENBLAS_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "lanczos_iters 7" in text
    rows = [line for line in text.splitlines() if line.startswith("| Hessian")]
    assert len(rows) == 1 and "over the 0.5-minute budget" in rows[0] and "`python bench.py --only hessian`" in rows[0]
