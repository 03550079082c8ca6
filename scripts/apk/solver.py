"""Dependency resolution: from a world (``python3 musl>=1.2`` ...) to the exact package set.

A depth-first search with backtracking over candidate packages, trying them in the order apk
prefers (``_prefer``, after apk-tools' ``compare_providers`` in src/solver.c): an already chosen
package, then the newest version of the *requested* name, then the newest version of the same
package, then higher ``provider_priority`` (``k:``), then the earlier repository.
Constraints: one package per name; one package per *versioned* provided name (``p:so:x=1``
by two packages is a clash; unversioned provides may coexist); conflicts (``!name``) against
every other package; the target architecture. Dependencies on real package names are
resolved before virtual ones, and names that only have unversioned providers last, so that
an explicitly requested provider wins over an arbitrary one. A virtual name with only
unversioned providers and no ``k:`` is an error unless something chosen already provides it
(apk: "please select one of the 'provided by' packages explicitly"). ``install_if`` packages
are added when their conditions hold for the solved set, re-solving with each. The result is
deterministic, and the installation order puts dependencies first.

Tagged repositories (``@edge https://...``; ``tags`` maps a repository's index to its tag), as
apk-tools' solver pins (src/solver.c: ``tag_ok``, ``tag_preferred``, inherit_pinning_and_flags):
a package of a tagged repository may satisfy a dependency only where that tag is *allowed*: a
world entry ``name@tag`` allows and prefers ``tag``, and every package chosen under it passes
the allowed tags on to its own dependencies (allowed there, not preferred: an untagged package
still wins), and to the install_if packages it triggers. An untagged name never comes from a
tagged repository on its own.
"""

from __future__ import annotations

import bisect
import functools
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import VulcanError
from . import version as V
from .index import Dep, Package, checksum_key, dedupe, parse_dep

MAX_STEPS = 200_000


class ResolveError(VulcanError):
    """The world cannot be satisfied; the message shows the chain that failed."""

    exit_code = 4


class _Fatal(Exception):
    """A dead end apk does not back out of: the solve fails."""


@dataclass(frozen=True)
class _Item:
    cls: int
    seq: int
    dep: Dep
    path: tuple[str, ...]  # who asked: ("world", "python3-3.10.8-r0")
    allowed: frozenset[str] = frozenset()  # repository tags this dependency may take packages from
    preferred: str = ""  # the tag it prefers ("": untagged repositories)


def _order(item: _Item) -> tuple[int, int]:
    """Which dependency the search takes next: real names before versioned virtuals before the
    rest, then in the order they were asked for."""
    return (item.cls, item.seq)


@dataclass
class _State:
    by_name: dict[str, Package] = field(default_factory=dict)  # P: name -> chosen package
    vprov: dict[str, Package] = field(default_factory=dict)  # versioned provided name -> package
    conflicts: list[tuple[Dep, str]] = field(default_factory=list)  # (!dep, owner name or "")
    order: list[Package] = field(default_factory=list)
    pinning: dict[str, frozenset[str]] = field(default_factory=dict)  # name -> tags allowed when chosen

    def copy(self) -> _State:
        return _State(dict(self.by_name), dict(self.vprov), list(self.conflicts), list(self.order), dict(self.pinning))


def check_world_dep(text: str) -> Dep:
    """A world entry, validated like apk does ('foo=' and 'foo=invalid' are errors)."""
    try:
        dep = parse_dep(text)
    except ValueError:
        dep = None
    if dep is not None and dep.mask == V.CHECKSUM:  # name><Q1...: apk 3 pins a world entry to one build
        if re.fullmatch(r"Q1[A-Za-z0-9+/]{27}=", dep.version):
            return dep
        dep = None
    if dep is None or (dep.mask != V.ANY and (not dep.version or not V.valid(dep.version))):
        raise ResolveError(
            f"'{text}' is not a valid world dependency, format is name([<>~=]version)",
            hint="e.g. python3, python3~3.14, musl>=1.2.6",
        )
    return dep


class Solver:
    def __init__(self, packages: Iterable[Package], arch: str, repos: Sequence[str] = (),
                 tags: Mapping[int, str] | None = None) -> None:  # fmt: skip
        self.arch = arch
        self.repos = list(repos)
        self.tags = dict(tags or {})  # repository index -> tag ("" or absent: untagged)
        self.packages = sorted(dedupe(list(packages)), key=lambda p: (p.name, V.sort_key(p.version), p.repo_index))
        self.providers: dict[str, list[tuple[Package, str | None]]] = {}
        self.real: set[str] = set()
        for p in self.packages:
            self.providers.setdefault(p.name, []).append((p, p.version))
            self.real.add(p.name)
            for name, ver in p.provides:
                self.providers.setdefault(name, []).append((p, ver))
        self.with_install_if = [p for p in self.packages if p.install_if]
        self._classes: dict[str, int] = {}
        self.broken: dict[Package, str] = {}
        for p in self.packages:
            reason = self._why_uninstallable(p)
            if reason:
                self.broken[p] = reason
        self.broken_ids = {id(p) for p in self.broken}  # a Package's own hash walks all its fields
        self.steps = 0
        self.seq = 0
        self.failure: tuple[int, str] | None = None

    def _why_uninstallable(self, p: Package) -> str | None:
        if p.arch not in ("", "noarch", self.arch):
            return f"built for arch {p.arch}"
        if any(d.tag for d in p.depends):
            return "depends on a tagged repository"
        if any(name == p.name for name, _ in p.provides):
            return "provides its own name (conflicts with itself)"
        vnames = [n for n, v in p.provides if v is not None]
        if len(vnames) != len(set(vnames)):
            return "provides one name twice"
        return None

    # -- matching ---------------------------------------------------------------------------

    def _provides(self, p: Package, dep: Dep) -> bool:
        """Does package ``p`` satisfy the (positive form of) ``dep``?"""
        if dep.mask == V.CHECKSUM:
            return p.name == dep.name and checksum_key(p.checksum) == checksum_key(dep.version)
        if p.name == dep.name and dep.matches_version(p.version):
            return True
        for name, ver in p.provides:
            if name != dep.name:
                continue
            if ver is None:
                if dep.mask == V.ANY:
                    return True
            elif dep.matches_version(ver):
                return True
        return False

    def _dep_class(self, dep: Dep) -> int:
        cls = self._classes.get(dep.name)
        if cls is None:
            if dep.name in self.real:
                cls = 0
            elif any(v is not None for _, v in self.providers.get(dep.name, [])):
                cls = 1
            else:
                cls = 2
            self._classes[dep.name] = cls
        return cls

    def _satisfied(self, st: _State, dep: Dep) -> bool:
        # through the name's providers (a few), not every chosen package (hundreds in a big world)
        return any(st.by_name.get(p.name) is p and self._provides(p, dep) for p, _ in self.providers.get(dep.name, ()))

    def tag(self, p: Package) -> str:
        return self.tags.get(p.repo_index, "")

    def _candidates(self, dep: Dep, allowed: frozenset[str] = frozenset(), preferred: str = "") -> list[Package]:
        seen: list[Package] = []
        for p, _ver in self.providers.get(dep.name, []):
            if id(p) in self.broken_ids or p in seen or not self._provides(p, dep):
                continue
            if self.tag(p) and self.tag(p) not in allowed:
                continue  # masked: its repository's tag is not allowed here
            seen.append(p)
        # apk never picks an unversioned provider without provider_priority on its own
        # (select_package: "virtual package without provider_priority"): whatever else provides
        # the name, only its own name being required brings such a package in
        seen = [p for p in seen if _provided_version(p, dep.name) is not None or p.provider_priority is not None]

        def prefer(a: Package, b: Package) -> int:
            pa, pb = self.tag(a) == preferred, self.tag(b) == preferred  # "prefer preferred pinning"
            if pa != pb:
                return -1 if pa else 1
            return _prefer(a, b, dep.name)

        if len(seen) < 2:
            return seen
        # apk's choice is a scan (select_package): each provider, in the order apk lists them
        # (repository, then index order), replaces the best so far when it compares strictly
        # better. With unversioned providers the comparison is not transitive (a versioned
        # provider beats an older one by version, an unversioned one with k: beats it by
        # priority, ...), so the scan's winner comes first, the rest after in preference order.
        scan = sorted(seen, key=lambda p: (p.repo_index, p.order))
        best = scan[0]
        for p in scan[1:]:
            if prefer(p, best) < 0:
                best = p
        return [best, *sorted((p for p in seen if p is not best), key=functools.cmp_to_key(prefer))]

    # -- search -----------------------------------------------------------------------------

    def _fail(self, depth: int, message: str) -> None:
        if self.failure is None or depth >= self.failure[0]:
            self.failure = (depth, message)

    def _chain(self, item: _Item) -> str:
        return " -> ".join([*item.path, str(item.dep)])

    def _can_add(self, st: _State, p: Package) -> str | None:
        other = st.by_name.get(p.name)
        if other is not None and other != p:
            return f"{p.ident} clashes with {other.ident} (one version per name)"
        for name, ver in [(p.name, p.version), *p.provides]:
            if ver is None:
                continue
            holder = st.vprov.get(name)
            if holder is not None and holder != p:
                return f"{p.ident} and {holder.ident} both provide {name}"
        for dep, owner in st.conflicts:
            if owner != p.name and self._provides(p, dep):
                return f"{p.ident} breaks {owner or 'world'}[{dep}]"
        for dep in p.depends:
            if dep.conflict:
                for q in st.by_name.values():
                    if q.name != p.name and self._provides(q, dep):
                        return f"{q.ident} breaks {p.ident}[{dep}]"
        return None

    def _add(self, st: _State, p: Package) -> _State:
        new = st.copy()
        new.by_name[p.name] = p
        for name, ver in [(p.name, p.version), *p.provides]:
            if ver is not None:
                new.vprov[name] = p
        for dep in p.depends:
            if dep.conflict:
                new.conflicts.append((dep, p.name))
        new.order.append(p)
        return new

    def _search(self, st: _State, queue: list[_Item]) -> _State | None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ResolveError("dependency resolution is taking too long (over 200,000 steps)")
        if not queue:
            return st
        item = queue[0]  # the queue is kept in (cls, seq) order: the first is the one to take
        rest = queue[1:]
        dep = item.dep
        depth = len(item.path)
        if self._satisfied(st, dep):
            return self._search(st, rest)
        cands = self._candidates(dep, item.allowed, item.preferred)
        if not cands:
            message = self._no_candidate(item)
            if self._needs_explicit_choice(dep):
                # apk cannot pick among unversioned providers without k: and does not go back
                # on the choices that led here (its solver is greedy): the whole solve fails
                raise _Fatal(message)
            self._fail(depth, message)
            return None
        for p in cands:
            why = self._can_add(st, p)
            if why:
                self._fail(depth, f"{self._chain(item)}: {why}")
                continue
            new = self._add(st, p)
            new.pinning[p.name] = item.allowed
            merged = list(rest)
            for d in p.depends:
                if not d.conflict:
                    bisect.insort(merged, self._item(d, (*item.path, p.ident), item.allowed), key=_order)
            result = self._search(new, merged)
            if result is not None:
                return result
        return None

    def _item(self, dep: Dep, path: tuple[str, ...], allowed: frozenset[str] = frozenset(),
              preferred: str = "") -> _Item:  # fmt: skip
        self.seq += 1
        return _Item(self._dep_class(dep), self.seq, dep, path, allowed, preferred)

    def _needs_explicit_choice(self, dep: Dep) -> bool:
        usable = [p for p, _ in self.providers.get(dep.name, []) if p not in self.broken]
        return bool(usable) and dep.name not in self.real and all(p.provider_priority is None for p in usable) \
            and not any(v is not None for _, v in self.providers.get(dep.name, []))  # fmt: skip

    def _no_candidate(self, item: _Item) -> str:
        dep = item.dep
        chain = self._chain(item)
        provs = [p for p, _ in self.providers.get(dep.name, [])]
        where = ", ".join(self.repos) if self.repos else "the repositories"
        if not provs:
            return f"{chain} -> no provider in {where}"
        usable = [p for p in provs if p not in self.broken]
        if not usable:
            reasons = "; ".join(f"{p.ident}: {self.broken[p]}" for p in provs)
            return f"{chain} -> uninstallable ({reasons})"
        if dep.name not in self.real and all(p.provider_priority is None for p in usable):
            names = " ".join(sorted({p.name for p in usable}))
            return f"{chain} -> virtual, provided by {names}: select one of them explicitly"
        versions = " ".join(sorted({p.ident for p in usable}))
        return f"{chain} -> no version matches (available: {versions})"

    def solve(self, world: Sequence[str | Dep]) -> list[Package]:
        """The packages for ``world``, in installation order (a Solver can solve many worlds)."""
        self.steps, self.seq, self.failure = 0, 0, None
        deps = [w if isinstance(w, Dep) else check_world_dep(w) for w in world]
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 20_000))
        try:
            try:
                st = self._solve_deps(deps)
            except _Fatal as exc:
                raise ResolveError(f"unable to select packages: {exc}") from None
            if st is None:
                raise ResolveError(
                    "unable to select packages: " + (self.failure[1] if self.failure else "no solution"),
                )
            # install_if: add packages whose conditions hold, re-solving with each, to a fixed point
            extra: list[Dep] = []
            rejected: set[Package] = set()
            while True:
                added = False
                for p in self._install_if_candidates(st, rejected):
                    try:
                        trial = self._solve_deps(deps + extra + [Dep(p.name, V.EQUAL, p.version, tag=self.tag(p))])
                    except _Fatal:
                        trial = None
                    if trial is None:
                        rejected.add(p)
                        continue
                    extra.append(Dep(p.name, V.EQUAL, p.version, tag=self.tag(p)))
                    st = trial
                    added = True
                    break
                if not added:
                    break
        finally:
            sys.setrecursionlimit(limit)
        return self._install_order(st)

    def _solve_deps(self, deps: list[Dep]) -> _State | None:
        unknown = sorted({d.tag for d in deps if d.tag} - set(self.tags.values()))
        if unknown:
            raise _Fatal(f"no repository is tagged {', '.join('@' + t for t in unknown)}")
        queue = sorted((self._item(d, ("world",), frozenset({d.tag}) if d.tag else frozenset(), d.tag)
                        for d in deps if not d.conflict), key=_order)  # fmt: skip
        st = _State()
        st.conflicts = [(d, "") for d in deps if d.conflict]
        return self._search(st, queue)

    def _install_if_candidates(self, st: _State, rejected: set[Package]) -> list[Package]:
        out = []
        for p in self.with_install_if:
            if p.name in st.by_name or id(p) in self.broken_ids or p in rejected:
                continue
            if self.tag(p):  # from a tagged repository: only where a triggering package allows that tag
                triggers = [q for cond in p.install_if if not cond.conflict for q in st.by_name.values()
                            if self._provides(q, Dep(cond.name, cond.mask, cond.version))]  # fmt: skip
                if not any(self.tag(p) in st.pinning.get(q.name, frozenset()) for q in triggers):
                    continue
            ok = True
            for cond in p.install_if:
                holds = self._satisfied(st, Dep(cond.name, cond.mask, cond.version, False, cond.tag))
                if holds == cond.conflict:
                    ok = False
                    break
            if ok:
                out.append(p)
        # deterministic: by name, the newest version first (an older one is tried if it fails)
        return sorted(out, key=lambda p: (p.name, _Desc(p.version), p.repo_index))

    def _install_order(self, st: _State) -> list[Package]:
        """Dependencies first; otherwise the order in which the search chose packages."""
        chosen = list(st.order)
        done: set[str] = set()
        out: list[Package] = []
        visiting: set[str] = set()

        def visit(p: Package) -> None:
            if p.name in done or p.name in visiting:
                return
            visiting.add(p.name)
            for d in p.depends:
                if d.conflict:
                    continue
                for q in chosen:
                    if self._provides(q, d):
                        visit(q)
                        break
            visiting.discard(p.name)
            done.add(p.name)
            out.append(p)

        for p in chosen:
            visit(p)
        return out


def _provided_version(p: Package, name: str) -> str | None:
    """The version under which ``p`` provides ``name`` (None: unversioned)."""
    if p.name == name:
        return p.version
    return next((v for n, v in p.provides if n == name and v is not None), None)


def _prefer(a: Package, b: Package, name: str) -> int:
    """Negative when apk would choose ``a`` over ``b`` for the name ``name``.

    apk-tools compare_providers() (src/solver.c, master @ 90b974fd, lines 537-689; 2.14-stable
    orders these checks the same way), for a fresh install where every candidate is available
    and pinning plays no part, checks in this order:
      1. "Select latest by requested name": the higher version of ``name`` as each provides it
         (a package's own version for its name; the ``p:name=ver`` version for a provided one);
      2. "Select latest by principal name": between two versions of one package, the newer;
      3. "Prefer highest declared provider priority": the higher ``k:``;
      4. "Prefer lowest available repository";
      5. then the first in the name's provider list, i.e. the first in the index (apk replaces
         its choice only when a later provider compares strictly better: select_package()).
    So ``k:`` only decides between providers that offer the same version of the name: e.g. for
    ``cmd:go`` gcc-go (13.2.1...) wins over go (1.21.x) whatever their priorities, as real apk
    shows. But an unversioned provider against a versioned one is no version comparison at all
    (apk_version_compare_blob of a null version answers "equal, less or greater", which neither
    case of the switch takes): then ``k:`` decides, and ``p:name`` with ``k:20`` beats
    ``p:name=1.2-r3`` without one. Earlier checks (installed, pinning, errors, the last merging
    group) cannot differ here, or are what the backtracking search does when a choice fails."""
    va, vb = _provided_version(a, name), _provided_version(b, name)
    if va is not None and vb is not None and va != vb:  # an unversioned provide compares as neither
        r = V.compare(va, vb)
        if r != V.EQUAL:
            return -1 if r == V.GREATER else 1
    if a.name == b.name:
        r = V.compare(a.version, b.version)
        if r != V.EQUAL:
            return -1 if r == V.GREATER else 1
    pa, pb = a.provider_priority or 0, b.provider_priority or 0
    if pa != pb:
        return -1 if pa > pb else 1
    ka, kb = (a.repo_index, a.order, a.name, a.checksum), (b.repo_index, b.order, b.name, b.checksum)
    return (ka > kb) - (ka < kb)


class _Desc:
    """Sort key wrapper: newer apk versions first."""

    __slots__ = ("v",)

    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: _Desc) -> bool:
        return V.compare(self.v, other.v) == V.GREATER

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and V.compare(self.v, other.v) == V.EQUAL
