"""The CI workflow: valid, its matrix exactly what `nox -t image -l --json` lists, its job graph and
supply chain as documented; and the parts that need no GitHub run here (the lock hand-off)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.arch import ARCHES
from scripts.formats import NAMES
from tests.support.world import BASE_PINS, REPO

WORKFLOW = REPO / ".github/workflows/images.yml"


def load_workflow() -> dict:  # type: ignore[type-arg]
    yaml = pytest.importorskip("ruamel.yaml", reason="ruamel.yaml (from check-jsonschema) parses the workflow")
    return yaml.YAML(typ="safe").load(WORKFLOW.read_text())  # type: ignore[no-any-return]


def nox_list() -> list[dict]:  # type: ignore[type-arg]
    nox = shutil.which("nox") or pytest.skip("nox is not installed in this environment")
    proc = subprocess.run([nox, "-t", "image", "-l", "--json"], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_workflow_matrix_equals_what_nox_lists() -> None:
    wf = load_workflow()
    step = next(s for s in wf["jobs"]["sessions"]["steps"] if s.get("id") == "list")
    assert step["run"].startswith("nox -t image -l --json | python -m scripts ci-matrix")
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
    [step] = [s for s in build["steps"] if 'nox -s "$SESSION" -- --arch "$ARCH" --frozen' in s.get("run", "")]
    assert step["env"] == {"SESSION": "${{ matrix.session }}", "ARCH": "${{ matrix.arch }}"}
    assert "bash .ci/setup-debian" in runs  # the README's set-up
    cache = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/cache"))
    assert "hashFiles('pins.json', 'alpine.lock.json')" in cache["with"]["key"]
    check = " ".join(s.get("run", "") for s in wf["jobs"]["check"]["steps"])
    assert "verify" in check and "--reproduce" in check


def test_no_run_step_expands_a_template_and_zizmor_finds_nothing() -> None:
    """A job that can write packages makes the workflow a target: values reach a shell as
    environment variables, never pasted into its code; checkouts keep no credentials."""
    for name, job in load_workflow()["jobs"].items():
        for step in job["steps"]:
            assert "${{" not in step.get("run", ""), (name, step.get("name"), step["run"][:120])
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, name
    tool = shutil.which("zizmor") or pytest.skip("zizmor is not installed")
    proc = subprocess.run([tool, "--offline", str(WORKFLOW)], capture_output=True, text=True)
    assert proc.returncode == 0 and "No findings to report" in proc.stdout + proc.stderr, proc.stdout


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


def test_the_job_graph_is_lock_then_build_then_check_and_boot() -> None:
    jobs = load_workflow()["jobs"]
    needs = {name: set(job.get("needs", [])) if isinstance(job.get("needs", []), list) else {job["needs"]}
             for name, job in jobs.items()}  # fmt: skip
    assert needs["lock"] == set() and needs["sessions"] == set()
    assert {"sessions", "lock"} <= needs["build"]
    assert "build" in needs["check"] and "build" in needs["boot"]
    for name in ("build", "check", "boot"):  # every cell uses the one lock the lock job resolved
        steps = jobs[name]["steps"]
        lock_steps = [s for s in steps if s.get("with", {}).get("name") == "alpine-lock"]
        assert lock_steps and lock_steps[0]["if"] == "needs.lock.outputs.fresh != 'true'", name


def test_every_image_format_is_built_uploaded_and_booted_by_the_commands_a_user_runs() -> None:
    jobs = load_workflow()["jobs"]
    upload = next(s for s in jobs["build"]["steps"] if "upload-artifact" in s.get("uses", ""))
    boot = " ".join(s.get("run", "") for s in jobs["boot"]["steps"])
    for fmt in NAMES:
        assert f"images/**/*.{fmt}" in upload["with"]["path"], fmt
        assert f"nox -s boot -- --format {fmt}" in boot, fmt
    assert "nox -s download -- --frozen" in boot
    assert {m["arch"] for m in jobs["boot"]["strategy"]["matrix"]["include"]} == set(ARCHES)
    assert set(json.loads((REPO / "pins.json").read_text())["alpine"]["formats"]) == set(NAMES)


def test_actions_are_pinned_by_commit_and_jobs_ask_for_least_permissions() -> None:
    text = WORKFLOW.read_text()
    uses = re.findall(r"uses: (\S+)(.*)", text)
    assert uses
    for ref, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", ref), ref
        assert re.search(r"# v\d+\.\d+\.\d+", comment), f"{ref}: the tag belongs in a comment"
    wf = load_workflow()
    assert wf["permissions"] == {}
    for name, job in wf["jobs"].items():
        want = {"contents": "read", "packages": "write"} if name == "publish" else {"contents": "read"}
        assert job.get("permissions") == want, name  # publish alone can write packages


def test_the_publish_job_runs_on_main_after_check_and_boot_with_the_users_command() -> None:
    job = load_workflow()["jobs"]["publish"]
    assert job["if"] == "github.event_name == 'push' && github.ref == 'refs/heads/main'"  # never a pull request
    assert {"check", "boot", "build", "lock"} <= set(job["needs"])
    [step] = [s for s in job["steps"] if "nox -s publish" in s.get("run", "")]
    assert 'nox -s publish -- --to "ghcr.io/${OWNER,,}/vulcan-images" --digests published.json' in step["run"]
    assert step["env"] == {"OWNER": "${{ github.repository_owner }}", "VULCAN_REGISTRY_USER": "${{ github.actor }}",
                           "VULCAN_REGISTRY_PASSWORD": "${{ secrets.GITHUB_TOKEN }}",
                           "VULCAN_SIGNING_KEY": "${{ secrets.VULCAN_SIGNING_KEY }}"}  # fmt: skip
    assert "nox -s download guest -- --arch" in step["run"]  # the host artifact needs both architectures' bin/
    lock = [s for s in job["steps"] if s.get("with", {}).get("name") == "alpine-lock"]
    assert lock and lock[0]["if"] == "needs.lock.outputs.fresh != 'true'"


def test_the_set_up_as_an_ordinary_user_says_what_to_do_and_changes_nothing() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv, to be an ordinary user")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    with open(REPO / ".ci/setup-debian") as script:  # read by root: the checkout may be root's alone (CI's clone)
        proc = subprocess.run([*nobody, "bash", "-s"], stdin=script, capture_output=True, text=True, cwd="/",
                              timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("setup-debian: installs system packages, so it runs as root: sudo bash"), proc.stderr
    assert "docs/setup.md" in proc.stderr


def test_the_job_summaries_are_tables_made_by_a_tested_step(tmp_path: Path) -> None:
    """The workflow's summaries come from `python -m scripts ci-summary` (no inline Python a lint
    never reads), from the very reports boot and boot --restore write."""
    from scripts.vm import BootResult
    from scripts.vm.restore import Clone, Restored

    assert "python3 - <<" not in WORKFLOW.read_text() and "python - <<" not in WORKFLOW.read_text()
    boot = tmp_path / "boot-x86_64.json"
    boot.write_text(
        json.dumps([BootResult("python", "ext4", "firecracker", True, 0.83, "ok", tmp_path / "c").as_json()])
    )
    clones = [Clone(i, True, "program printed '42'", tmp_path / "c", 0, 9.5, None, 21.0 + i) for i in range(2)]
    restore = tmp_path / "restore-squashfs.json"
    restore.write_text(json.dumps([Restored("python", "squashfs", clones).as_json()]))

    def summary(*args: str) -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "scripts", "ci-summary", *args], cwd=REPO, capture_output=True,
                              text=True, check=True)  # fmt: skip
        return proc.stdout.splitlines()

    lines = summary("boot", str(boot), str(tmp_path / "boot-aarch64.json"))  # a cell that wrote nothing
    assert lines[0].startswith("| runtime | format | vmm | ok | boot-to-ready (s)") and len(lines) == 3
    assert lines[2].startswith("| python | ext4 | firecracker | True | 0.83 | 0 |")
    lines = summary("restore", str(restore))
    assert lines[2] == "| python | squashfs | 2/2 | 21.5 | 21, 22 | 9.5 | None | 0 |", lines
    assert summary("published", str(tmp_path / "published.json")) == ["nothing was published"]
