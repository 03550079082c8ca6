"""The resolver against apk itself (apk-tools' solver scenarios) and on a real Alpine index."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.apk.index import Package, parse_index
from scripts.apk.package import read_index
from scripts.apk.solver import ResolveError, Solver
from scripts.apk.trust import Keyring
from tests.support import apk_scenarios as S
from tests.support.world import SHARED

SOLVER_DIR = SHARED / "alpinelinux-apk-tools/master/test/solver"
SCENARIOS = sorted(SOLVER_DIR.glob("*.test")) if SOLVER_DIR.is_dir() else []
FRESH = [p for p in SCENARIOS if S.is_fresh_install(S.load(p))]


@pytest.mark.parametrize("path", FRESH, ids=[p.stem for p in FRESH])
def test_fresh_install_scenario_matches_apk(shared: Path, path: Path) -> None:
    scenario = S.load(path)
    why = S.unsupported(scenario)
    if why:
        pytest.skip(f"needs {why}")
    want = S.expected(scenario)
    solver = Solver(S.packages(scenario), "x86_64", [f.stem for _, f in scenario.repos], S.tags(scenario))
    if want is None:
        with pytest.raises(ResolveError):
            solver.solve(S.world_of(scenario))
    else:
        got = solver.solve(S.world_of(scenario))
        assert {(p.name, p.version, solver.tag(p)) for p in got} == want


def test_the_harness_found_every_fresh_install_scenario(shared: Path) -> None:
    assert len(FRESH) == 65  # a drop here means scenarios were silently lost


BASE = ["alpine-baselayout", "busybox", "musl", "ca-certificates-bundle"]  # (busybox-binsh: v3.17+)


@pytest.fixture(scope="module")
def v316() -> list[Package]:
    if not SHARED.is_dir():
        pytest.skip("../shared/testdata is absent")
    keys = Keyring.from_pems({p.name: p.read_bytes() for p in (SHARED / "csmith-apkutils/keys").iterdir()})
    data = (SHARED / "chainguard-dev-apko/pkg/apk/apk/testdata/alpine-316/APKINDEX.tar.gz").read_bytes()
    text, _ = read_index(data, keys, "v3.16/main/x86_64")
    return list(parse_index(text, "main").packages)


def provides(p: Package, name: str, solver: Solver) -> bool:
    from scripts.apk.index import Dep

    return solver._provides(p, Dep(name))


@pytest.mark.parametrize("runtime", ["python3", "nodejs"])
def test_real_index_closure_is_complete_consistent_and_minimal(v316: list[Package], runtime: str) -> None:
    solver = Solver(v316, "x86_64", ["main"])
    closure = solver.solve([*BASE, runtime])
    chosen = {p.name: p for p in closure}
    assert runtime in chosen and all(b in chosen for b in BASE)
    assert len(chosen) == len(closure)  # one version per name
    # every dependency is satisfied inside the set, and comes before its dependant
    position = {p.name: i for i, p in enumerate(closure)}
    for p in closure:
        for dep in p.depends:
            satisfiers = [q for q in closure if solver._provides(q, dep.__class__(dep.name, dep.mask, dep.version))]
            if dep.conflict:
                assert not [q for q in satisfiers if q.name != p.name], f"{p.ident} conflicts with {dep}"
            else:
                assert satisfiers, f"{p.ident}: {dep} unsatisfied"
                assert min(position[q.name] for q in satisfiers) < position[p.name]
    # nothing superfluous: everything is reachable from the world by dependencies or install_if
    reach = set([*BASE, runtime])
    changed = True
    while changed:
        changed = False
        for p in closure:
            if p.name in reach:
                continue
            needed = any(
                q.name in reach and any(not d.conflict and solver._provides(p, d) for d in q.depends) for q in closure
            )
            iif = bool(p.install_if) and all(
                any(solver._provides(q, d) for q in closure) != d.conflict for d in p.install_if
            )
            if needed or iif:
                reach.add(p.name)
                changed = True
    assert set(chosen) == reach, f"superfluous: {set(chosen) - reach}"
    print(f"\n{runtime} + base on real v3.16 main x86_64: {len(closure)} packages")


def test_unsatisfiable_world_shows_the_chain(v316: list[Package]) -> None:
    without_ffi = [p for p in v316 if p.name != "libffi"]
    with pytest.raises(ResolveError) as info:
        Solver(without_ffi, "x86_64", ["main", "community"]).solve(["python3"])
    assert "world -> python3-3.10.8-r0 -> so:libffi.so.8 -> no provider in main, community" in str(info.value)


def test_resolution_is_deterministic(v316: list[Package]) -> None:
    a = Solver(v316, "x86_64", ["main"]).solve([*BASE, "python3"])
    b = Solver(list(reversed(v316)), "x86_64", ["main"]).solve([*BASE, "python3"])
    assert [p.ident for p in a] == [p.ident for p in b]


def test_invalid_world_entries_are_rejected() -> None:
    for bad in ["foo=", "foo==", "foo=invalid"]:
        with pytest.raises(ResolveError, match="not a valid world dependency"):
            Solver([], "x86_64").solve([bad])


def test_constrained_world_picks_the_matching_version() -> None:
    text = "\n\n".join(
        f"C:Q1{'A' * 26}{i}=\nP:python3\nV:{v}\nA:x86_64" for i, v in enumerate(["3.13.2-r0", "3.14.7-r1"])
    )
    pkgs = parse_index(text.replace("Q1" + "A" * 26 + "0=", "Q1" + "B" * 27 + "=")).packages
    assert Solver(pkgs, "x86_64").solve(["python3~3.13"])[0].version == "3.13.2-r0"
    assert Solver(pkgs, "x86_64").solve(["python3"])[0].version == "3.14.7-r1"


def test_world_entries_pinned_by_checksum_resolve_to_that_build(shared: Path) -> None:
    """apk 3.0.6 writes ``name><Q1...`` into etc/apk/world; it is valid apk syntax."""
    from tests.support.realapk import ISO_INDEX, index

    if not ISO_INDEX.is_file():
        pytest.skip("the real v3.19.1 repository is absent")
    packages = index(ISO_INDEX, "x86_64")
    busybox = next(p for p in packages if p.name == "busybox")
    chosen = Solver(packages, "x86_64", ["main"]).solve([f"busybox><{busybox.checksum}"])
    assert busybox in chosen
    other = "Q1" + "A" * 27 + "="
    with pytest.raises(ResolveError, match="busybox"):
        Solver(packages, "x86_64", ["main"]).solve([f"busybox><{other}"])
    with pytest.raises(ResolveError, match="not a valid world dependency"):
        Solver(packages, "x86_64", ["main"]).solve(["busybox><nonsense"])


def test_an_installed_database_written_by_real_apk_is_read_whole(shared: Path) -> None:
    """lib/apk/db/installed adds F/M/R/a/Z lines to each record: none is dropped for them."""
    text = "\n".join(
        [
            "C:Q1DmF/Zs1bLSnwEMrh6rMmR5o7Dxw=", "P:busybox", "V:1.36.1-r15", "A:x86_64", "S:506796", "I:946176",
            "T:toolbox", "U:https://busybox.net/", "L:GPL-2.0-only", "r:busybox-initscripts", "q:100",
            "F:bin", "R:busybox", "a:0:0:755", "Z:Q1DmF/Zs1bLSnwEMrh6rMmR5o7Dxw=", "F:etc", "M:0:0:700", "f:s", "",
        ]
    )  # fmt: skip
    parsed = parse_index(text)
    assert not parsed.unusable
    assert [(p.name, p.version, p.replaces_priority) for p in parsed.packages] == [("busybox", "1.36.1-r15", 100)]
