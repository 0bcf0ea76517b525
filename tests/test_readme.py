"""README.md stays true: every figure it shows exists (small), and CI runs the test command it gives."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_figure_in_readme_exists_and_is_small():
    figures = re.findall(r"\]\((figures/[^)\s]+\.png)\)", README)
    assert figures, "README shows no figure"
    for rel in figures:
        path = ROOT / rel
        assert path.is_file(), rel
        assert path.stat().st_size < 300_000, f"{rel}: {path.stat().st_size} bytes"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel


TEST_COMMAND = "python -m pytest -q -n auto --dist loadfile tests"


def test_ci_runs_the_test_command_readme_gives():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert TEST_COMMAND in README
    assert ci[-1].strip() == TEST_COMMAND
    assert "requirements.txt" in "".join(ci)


def test_readme_is_a_first_read_and_cites_no_file_outside_the_repository():
    assert len(README.splitlines()) <= 260
    assert "REFERENCE.md" not in README
    for rel in set(re.findall(r"\]\(([^)#:\s]+)\)", README)):  # relative links
        assert (ROOT / rel).exists(), rel


def test_fork_it_diff_is_the_code_in_pmnist():
    """Every hunk of the Fork it diff, less its removed ('-') lines, is a run of consecutive lines of pmnist.py:
    each added ('+') and context (' ') line verbatim, in order; each '@@' header names a line of the script."""
    section = README[README.index("## Fork it"):README.index("## Tests")]
    diff = re.search(r"```diff\n(.*?)```", section, re.S).group(1).splitlines()
    script = (ROOT / "pmnist.py").read_text().splitlines()
    hunks = []
    for line in diff:
        if line.startswith("@@"):
            assert line[3:] in [s.strip() for s in script], line
            hunks.append([])
        elif not line.startswith("-"):
            assert line[:1] in ("+", " ", ""), line
            hunks[-1].append(line[1:])
    assert len(hunks) >= 3 and sum(map(len, hunks)) >= 10
    for hunk in hunks:
        assert any(script[i:i + len(hunk)] == hunk for i in range(len(script))), "\n".join(hunk)
