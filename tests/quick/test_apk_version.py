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
    """Real Alpine version pairs, ordered as apk 2 ordered them. A few versions (``1.9.5p1``:
    digits after a letter) are invalid for apk 3, which compares up to the broken token and
    calls two versions that break at the same token equal; we follow apk 3 (Alpine >= 3.23
    ships it), so those pairs are only counted here (and the rule is tested below)."""
    path = shared / "google-osv-scanner/internal/semantic/fixtures/alpine-versions-generated.txt"
    lines = vectors(path)
    apk3_invalid = [line for line in lines if not all(V.valid(v) for v in line.split()[::2])]
    failed = [line for line in lines if line not in apk3_invalid and not check(line)]
    assert len(lines) > 13_000
    assert failed == [], f"{len(failed)} of {len(lines)} pairs fail, e.g. {failed[:5]}"
    as_apk2 = sum(1 for line in apk3_invalid if check(line))
    assert 0 < len(apk3_invalid) < 100
    print(
        f"\nalpine-versions-generated.txt: {len(lines) - len(apk3_invalid)} pairs, all pass; "
        f"{len(apk3_invalid)} have a version apk 3 calls invalid ({as_apk2} of them still in apk 2's order)"
    )


def test_versions_apk3_calls_invalid_compare_as_apk_master_does() -> None:
    assert not V.valid("1.9.5p1") and not V.valid("0.99f7")
    assert V.compare("1.9.5p1-r1", "1.9.5p2-r1") == V.EQUAL  # both break after "p"
    assert V.compare("1.9.5p1", "1.9.6") == V.LESS  # decided before the break
    assert V.compare("1.9.5p1", "1.9.5") == V.GREATER  # the letter came before the break
    assert V.compare("5.1_p1-r2", "5.1p1-r0") == V.LESS  # a suffix token ranks after a letter token


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
