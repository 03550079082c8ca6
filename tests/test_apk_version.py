"""apk's version ordering against apk-tools' own vectors and real Alpine version pairs."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.apk import version as V


def vectors(path: Path) -> list[str]:
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def check(line: str) -> bool:
    parts = line.split()
    if len(parts) == 1:
        v = parts[0]
        return not V.valid(v[1:]) if v.startswith("!") else V.valid(v)
    a, op, b = parts
    negate = op.startswith("!")
    return V.matches(a, V.op_mask(op.lstrip("!")), b) != negate


@pytest.mark.parametrize("branch", ["master/test/unit", "2.14-stable/test"])
def test_every_apk_tools_version_vector(shared: Path, branch: str) -> None:
    lines = vectors(shared / "alpinelinux-apk-tools" / branch / "version.data")
    failed = [line for line in lines if not check(line)]
    assert len(lines) > 700
    assert failed == [], f"{len(failed)} of {len(lines)} vectors fail, e.g. {failed[:5]}"
    print(f"\n{branch}/version.data: {len(lines)} vectors, {len(lines) - len(failed)} pass")


def test_every_real_alpine_version_pair(shared: Path) -> None:
    path = shared / "google-osv-scanner/internal/semantic/fixtures/alpine-versions-generated.txt"
    lines = vectors(path)
    failed = [line for line in lines if not check(line)]
    assert len(lines) > 13_000
    assert failed == [], f"{len(failed)} of {len(lines)} pairs fail, e.g. {failed[:5]}"
    print(f"\nalpine-versions-generated.txt: {len(lines)} pairs, all pass")


@pytest.mark.parametrize(
    ("a", "op", "b", "want"),
    [
        ("3.14.7-r1", "~", "3.14", True),
        ("3.15.0-r0", "~", "3.14", False),
        ("1.0_rc1", "<", "1.0", True),
        ("1.0_p1", ">", "1.0", True),
        ("1.0~abc1", "<", "1.0~abd0", True),
        ("1.2.6-r2", ">=", "1.2.6", True),
        ("24.18.1-r0", "<", "24.18.1-r1", True),
        ("1.37.0-r31", "=", "1.37.0-r31", True),
    ],
)
def test_operators(a: str, op: str, b: str, want: bool) -> None:
    assert V.matches(a, V.op_mask(op), b) is want


def test_sorting_is_apk_order() -> None:
    vs = ["1.0", "1.0_alpha", "1.0-r1", "1.0_p1", "0.9", "1.0_rc2", "1.0.1"]
    assert sorted(vs, key=V.sort_key) == ["0.9", "1.0_alpha", "1.0_rc2", "1.0", "1.0-r1", "1.0_p1", "1.0.1"]
