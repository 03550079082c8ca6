"""Harness for apk-tools' solver scenarios (test/solver/*.test, the v3 format in
../shared/testdata/MANIFEST.md): fresh installs (``@ARGS add ...`` without ``@INSTALLED``)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from scripts.apk.index import Package, parse_index


@dataclass
class Scenario:
    path: Path
    args: list[str]
    repos: list[tuple[str, Path]]  # (tag, file)
    world: list[str]
    installed: bool
    expect: str

    @property
    def name(self) -> str:
        return self.path.stem


def load(path: Path) -> Scenario:
    args: list[str] = []
    repos: list[tuple[str, Path]] = []
    world: list[str] = []
    installed = False
    expect_lines: list[str] = []
    in_expect = False
    for line in path.read_text().splitlines():
        if in_expect:
            expect_lines.append(line)
        elif line.startswith("@ARGS"):
            args += shlex.split(line[5:])
        elif line.startswith("@REPO") or line.startswith("@CACHE"):
            parts = line.split()[1:]
            tag = parts[0][1:] if parts[0].startswith("@") else ""
            repos.append((tag, path.parent / parts[-1]))
        elif line.startswith("@INSTALLED"):
            installed = True
        elif line.startswith("@WORLD"):
            world += line.split()[1:]
        elif line.startswith("@EXPECT"):
            in_expect = True
    return Scenario(path, args, repos, world, installed, "\n".join(expect_lines))


def is_fresh_install(s: Scenario) -> bool:
    return not s.installed and "add" in s.args


def unsupported(s: Scenario) -> str | None:
    """Why a scenario needs a feature we deliberately leave out, or None."""
    flags = [a for a in s.args if a.startswith("-")]
    for flag in flags:
        if flag in ("--no-network",) or flag.startswith("--root-tmpfs"):
            continue
        if flag == "-t" or flag.startswith("--virtual"):
            return "virtual packages created on the command line (apk add -t)"
        return f"apk command-line option {flag} (not an image-build feature)"
    return None


def tags(s: Scenario) -> dict[int, str]:
    """Each repository's tag by its index (``@REPO @testing file``)."""
    return {k: tag for k, (tag, _file) in enumerate(s.repos) if tag}


def world_of(s: Scenario) -> list[str]:
    i = s.args.index("add")
    return s.world + [a for a in s.args[i + 1 :] if not a.startswith("-")]


def packages(s: Scenario) -> list[Package]:
    out: list[Package] = []
    for k, (_tag, file) in enumerate(s.repos):
        out += parse_index(file.read_text(), repo=file.stem, repo_index=k).packages
    return out


INSTALL = re.compile(r"^\(\d+/\d+\) Installing (\S+) \((\S+)\)$")


def expected(s: Scenario) -> set[tuple[str, str, str]] | None:
    """{(name, version, repository tag)} apk installs (``a@testing (3)``: from the @testing
    repository), or None when apk reports an error."""
    if "ERROR:" in s.expect:
        return None
    out = set()
    for line in s.expect.splitlines():
        m = INSTALL.match(line)
        if m:
            name, _, tag = m.group(1).partition("@")
            out.add((name, m.group(2), tag))
    return out
