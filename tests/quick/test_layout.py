"""The codebase's shape, as a newcomer reads it: one table of steps, no import cycles, a job per
module, and a README that stays true (the file map and the overrides)."""

from __future__ import annotations

import ast
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


def _imports(path: Path) -> set[str]:
    """Modules of this package ``path`` imports, at its top or inside a function (a lazy import
    closes a circle as surely as any other), except for typing (``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found: set[str] = set()
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                   ast.dump(node.test) for n in ast.walk(node)}  # fmt: skip
    for node in ast.walk(tree):
        if id(node) in typing_only:
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
    graph = {_module_name(p): _imports(p) for p in MODULES}
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


def _table(doc: str, heading: str | None = None) -> list[list[str]]:
    """The rows of the first table in ``doc`` (under ``## heading`` when given), header dropped."""
    text = (REPO / doc).read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0] if heading else text
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows[1:]]


def test_the_code_map_lists_every_module_and_only_files_that_exist() -> None:
    listed = [row[0].strip("*`") for row in _table("docs/architecture.md")]
    for name in listed:
        assert (REPO / name).exists(), f"docs/architecture.md lists {name}, which does not exist"
    modules = {str(p.relative_to(REPO)) for p in MODULES if p.name != "__init__.py"}
    assert modules - set(listed) == set(), "modules missing from docs/architecture.md"


def test_every_error_has_a_documented_exit_code_and_the_docs_say_which() -> None:
    import importlib

    from scripts import errors

    for path in MODULES:  # every error class of ours, wherever it is defined
        importlib.import_module(_module_name(path))
    classes, todo = set(), [errors.VulcanError]
    while todo:
        c = todo.pop()
        classes.add(c)
        todo.extend(c.__subclasses__())
    documented = {int(row[0]): row for row in _table("docs/errors.md")}
    assert set(documented) == set(errors.EXIT_CODES)
    for c in classes:
        assert c.exit_code in errors.EXIT_CODES, f"{c.__name__}: exit code {c.exit_code} is not in EXIT_CODES"
        if c.__name__ != "PackageGone":  # caught inside the build (a re-lock): it never reaches a user
            named = set(re.findall(r"`([A-Za-z]+)`", documented[c.exit_code][2]))
            assert c.__name__ in named, f"docs/errors.md does not name {c.__name__} under exit code {c.exit_code}"


def test_the_readme_overrides_table_is_the_settings_module() -> None:
    names = {re.match(r"`([A-Z0-9_]+)", row[0]).group(1) for row in _table("README.md", "Overrides")}  # type: ignore[union-attr]
    assert names == set(settings.NAMES)


def test_the_readme_sessions_table_is_noxs_list() -> None:
    """Every session nox lists is in the README's table, and the table names no other."""
    listed = subprocess.run([sys.executable, "-m", "nox", "-l"], cwd=REPO, capture_output=True, text=True, check=True)
    sessions = set(re.findall(r"^[*-] (\S+)", listed.stdout, re.M))
    assert "boot" in sessions and "download" in sessions
    named = {n for row in _table("README.md", "Sessions") for n in re.findall(r"`([a-z_-]+)`", row[0])}
    assert {n for n in sessions if not n.startswith("rootfs-")} | {"rootfs-go", "rootfs-node", "rootfs-python"} == named


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_leads_somewhere() -> None:
    """README.md, docs/ and guest/README.md: each relative link names a file that exists, and
    each #anchor a heading of that file."""
    pages = [REPO / "README.md", REPO / "guest" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) > 10
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                heads = {_anchor(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
                if anchor not in heads:
                    broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


def test_the_readme_is_a_front_door() -> None:
    """Read in ten minutes: at most ~250 lines, the two commands first, every docs/ page linked."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "bash .ci/setup-debian && nox" in text and "bash .ci/run" in text
    for page in (REPO / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name}"
    diary = re.compile(r"\b(first|second|third|this|last|next) round\b|\bissue \d+|\brounds\b", re.I)
    assert not diary.search(text + "".join(p.read_text() for p in (REPO / "docs").glob("*.md")))


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
    "squashfs" (tests/quick/test_formats.py builds an image in a format registered by the test)."""
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


# Commits before this one kept no limit; from here on a subject says what changed in at most 72
# characters (the body says why and what was measured), as Firecracker's gitlint enforces.
SUBJECTS_FROM = "5390d95"


def test_commit_subjects_fit_72_characters() -> None:
    proc = subprocess.run(["git", "log", "--format=%h %s", f"{SUBJECTS_FROM}..HEAD"], cwd=REPO, capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"no git history here: {proc.stderr.strip()[:100]}")
    long = [line for line in proc.stdout.splitlines() if len(line.split(" ", 1)[1]) > 72]
    assert long == [], long


# What the top of a clone holds (the README's front door and file map); anything else there is a
# stray file a shell redirection left behind, which a newcomer would take for part of the tool.
TOP_LEVEL = {
    ".ci", ".github", ".gitignore", "README.md", "bench", "docs", "guest", "noxfile.py", "pins.json",
    "alpine.lock.json", "pyproject.toml", "scripts", "tests",
    "requirements.in", "requirements.txt", "requirements-dev.in", "requirements-dev.txt",
    "requirements-nox.in", "requirements-nox.txt",
}  # fmt: skip


def test_the_top_level_holds_only_the_projects_own_files() -> None:
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no git checkout here: {proc.stderr.strip()[:100]}")
    top = {path.split("/", 1)[0] for path in proc.stdout.split("\0") if path}
    assert top - TOP_LEVEL == set(), "tracked at the top level, not part of the project's layout"
