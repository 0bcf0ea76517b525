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
