"""The codebase's shape, as a newcomer reads it: one table of steps, no import cycles, a job per
module, and a README that stays true (the file map and the overrides)."""

from __future__ import annotations

import ast
import getpass
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import settings
from scripts.steps import STEPS
from tests.support.world import REPO

MODULES = sorted(p for p in (REPO / "scripts").rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_python_m_scripts_help_and_nox_l_list_the_same_steps_from_one_table() -> None:
    helped = subprocess.run([sys.executable, "-m", "scripts", "--help"], cwd=REPO, capture_output=True, text=True)
    assert helped.returncode == 0
    for s in STEPS:
        assert re.search(rf"^  {re.escape(s.command)}\s+{re.escape(s.summary)}$", helped.stdout, re.M), s.command
    listed = subprocess.run([sys.executable, "-m", "nox", "-l"], cwd=REPO, capture_output=True, text=True, check=True)
    # "* name [tags] -> description" (selected) or "- name -> description" (on request)
    found = re.findall(r"^[*-] (\S+)(?: \[[^]]*\])? -> (.*)$", listed.stdout, re.M)
    sessions = {name: {"description": desc} for name, desc in found}
    for s in STEPS:
        name = s.session_name
        if name is None:
            continue
        if name == "rootfs-<runtime>":
            assert any(n.startswith("rootfs-") for n in sessions)
            continue
        assert name in sessions, name
        assert sessions[name]["description"] == s.summary  # the docstring comes from the table
    names = [m.group(1) for m in re.finditer(r"^\W*(rootfs_all|download|lint)\b", listed.stdout, re.M)]
    assert sorted(names) == ["download", "lint", "rootfs_all"], listed.stdout  # each listed once
    assert len(listed.stdout.split("Sessions defined in")[0].strip().splitlines()) <= 3  # the docstring is short
    own = {"rootfs_all", "bench", "tests", "lint"}
    commands = {s.session_name for s in STEPS}
    assert {n for n in sessions if not n.startswith("rootfs-")} - own == commands - {None, "rootfs-<runtime>"}


def _top_level_imports(path: Path) -> set[str]:
    """Modules of this package imported when ``path`` is imported (not lazily, not for typing)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                mod = node.module or ""
            if not mod.startswith("scripts"):
                continue
            for alias in node.names:
                candidate = f"{mod}.{alias.name}"
                found.add(candidate if (REPO / Path(*candidate.split("."))).with_suffix(".py").exists() else mod)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("scripts")}
    return found


def test_no_import_cycles() -> None:
    graph = {_module_name(p): _top_level_imports(p) for p in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)


def test_every_module_says_its_one_job_in_its_first_docstring_line() -> None:
    for p in MODULES:
        doc = ast.get_docstring(ast.parse(p.read_text()))
        assert doc, f"{p.relative_to(REPO)} has no docstring"
        first = doc.splitlines()[0]
        assert first.endswith((".", ":", "?")) or first.endswith("this."), f"{p.relative_to(REPO)}: {first!r}"


def _readme_table(heading: str) -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows[1:]]


def test_the_readme_map_lists_every_module_and_only_files_that_exist() -> None:
    listed = [row[0].strip("*`") for row in _readme_table("Where things live")]
    for name in listed:
        assert (REPO / name).exists(), f"README lists {name}, which does not exist"
    modules = {str(p.relative_to(REPO)) for p in MODULES if p.name != "__init__.py"}
    assert modules - set(listed) == set(), "modules missing from README's 'Where things live'"


def test_the_readme_overrides_table_is_the_settings_module() -> None:
    names = {re.match(r"`([A-Z0-9_]+)", row[0]).group(1) for row in _readme_table("Overrides")}  # type: ignore[union-attr]
    assert names == set(settings.NAMES)


def _strings_outside_docstrings(tree: ast.AST) -> list[ast.Constant]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_only_the_formats_package_knows_a_format_by_name() -> None:
    """Adding a format is a record in scripts/formats/: nothing else may branch on "ext4" or
    "squashfs" (tests/test_formats.py builds an image in a format registered by the test)."""
    from scripts.formats import FORMATS

    named = []
    for p in MODULES:
        if p.is_relative_to(REPO / "scripts" / "formats"):
            continue
        for node in _strings_outside_docstrings(ast.parse(p.read_text())):
            if node.value in FORMATS:
                named.append(f"{p.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert named == []


def test_the_leaves_import_nothing_of_ours_not_even_lazily() -> None:
    """errors -> log -> settings -> errors was a circle that imports inside functions hid: the
    log and the errors now share their formatting through a leaf (text.py) and read no settings."""
    for leaf, allowed in (("errors", {"scripts.text"}), ("log", {"scripts.text"}), ("text", set())):
        tree = ast.parse((REPO / "scripts" / f"{leaf}.py").read_text())
        found = {
            f"scripts.{node.module}" if node.level else node.module or ""
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("scripts"))
        }
        found |= {f"scripts.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level
                  and not n.module for a in n.names}  # fmt: skip
        found = {m.rstrip(".") for m in found if m != "scripts.None"}
        assert found <= allowed, (leaf, found - allowed)


@pytest.mark.slow
def test_a_green_run_leaves_nothing_in_the_temporary_directory(tmp_path: Path) -> None:
    """pytest's own directories (kept for the last failed run only: pyproject.toml), the real
    apk's install and its scratch: a green run of tests that make them leaves (almost) nothing."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    chosen = [
        "tests/test_apk_oracle.py::test_the_provider_rule_versioned_against_unversioned_with_priority",
        "tests/test_rootfs_units.py::test_why_a_step_runs_again_names_the_input_with_whole_short_values",
    ]
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *chosen], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    left = [p for p in tmp.rglob("*") if not p.is_dir()]
    assert left == [], left
    assert [p.name for p in tmp.iterdir()] in ([], [f"pytest-of-{getpass.getuser()}"])
