"""The slow part of tests/quick/test_layout.py (see its docstring)."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from pathlib import Path

from tests.support.world import REPO


def test_a_green_run_leaves_nothing_in_the_temporary_directory(tmp_path: Path) -> None:
    """pytest's own directories (kept for the last failed run only: pyproject.toml), the real
    apk's install and its scratch: a green run of tests that make them leaves (almost) nothing."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    chosen = [
        "tests/quick/test_apk_oracle.py::test_the_provider_rule_versioned_against_unversioned_with_priority",
        "tests/quick/test_rootfs_units.py::test_why_a_step_runs_again_names_the_input_with_whole_short_values",
    ]
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *chosen], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    left = [p for p in tmp.rglob("*") if not p.is_dir()]
    assert left == [], left
    assert [p.name for p in tmp.iterdir()] in ([], [f"pytest-of-{getpass.getuser()}"])
