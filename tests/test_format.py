"""The Snakemake files keep snakefmt's layout (pinned in requirements.txt, configured in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_snakemake_files_are_snakefmt_clean():
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "--compact-diff", "Snakefile", "workflow/rules"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"run `snakefmt Snakefile workflow/rules`:\n{result.stdout}{result.stderr}"
