"""The CI workflow: valid, and its matrix is exactly what `nox -l --json` lists."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from scripts.pins import ARCHES
from tests.support.world import BASE_PINS, REPO

WORKFLOW = REPO / ".github/workflows/images.yml"


def load_workflow() -> dict:  # type: ignore[type-arg]
    yaml = pytest.importorskip("ruamel.yaml", reason="ruamel.yaml (from check-jsonschema) parses the workflow")
    return yaml.YAML(typ="safe").load(WORKFLOW.read_text())  # type: ignore[no-any-return]


def nox_list() -> list[dict]:  # type: ignore[type-arg]
    nox = shutil.which("nox") or pytest.skip("nox is not installed in this environment")
    proc = subprocess.run([nox, "-l", "--json"], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_workflow_matrix_equals_what_nox_lists() -> None:
    wf = load_workflow()
    step = next(s for s in wf["jobs"]["sessions"]["steps"] if s.get("id") == "list")
    assert step["run"].startswith("nox -l --json | python -m scripts ci-matrix")
    listed = nox_list()
    proc = subprocess.run(
        [sys.executable, "-m", "scripts", "ci-matrix"], cwd=REPO, input=json.dumps(listed), capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    matrix = json.loads(proc.stdout.removeprefix("matrix="))
    pairs = {(m["session"], m["arch"]) for m in matrix["include"]}
    runtimes = set(BASE_PINS["alpine"]["runtimes"])
    assert pairs == {(f"rootfs-{rt}", arch) for rt in runtimes for arch in ARCHES}
    assert {s["session"] for s in listed if "image" in s["tags"]} == {f"rootfs-{rt}" for rt in runtimes}
    build = wf["jobs"]["build"]
    assert build["strategy"]["matrix"] == "${{ fromJSON(needs.sessions.outputs.matrix) }}"
    runs = " ".join(s.get("run", "") for s in build["steps"])
    assert 'nox -s "${{ matrix.session }}" -- --arch "${{ matrix.arch }}" --frozen' in runs
    assert "bash .ci/setup-debian" in runs  # the README's set-up
    cache = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/cache"))
    assert "hashFiles('pins.json', 'alpine.lock.json')" in cache["with"]["key"]
    check = " ".join(s.get("run", "") for s in wf["jobs"]["check"]["steps"])
    assert "verify" in check and "--reproduce" in check


def test_workflow_is_valid_for_github_actions() -> None:
    tool = shutil.which("check-jsonschema") or pytest.skip("check-jsonschema is not installed")
    proc = subprocess.run(
        [tool, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_matrix_refuses_an_empty_listing() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scripts", "ci-matrix"], cwd=REPO, input="[]", capture_output=True, text=True
    )
    assert proc.returncode == 1 and "no sessions tagged 'image'" in proc.stderr
