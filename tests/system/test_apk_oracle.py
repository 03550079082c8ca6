"""The slow part of tests/quick/test_apk_oracle.py (see its docstring)."""

from __future__ import annotations

from pathlib import Path

from tests.quick.test_apk_oracle import compare
from tests.support.realapk import Apk


def test_resolver_agrees_with_real_apk_on_every_package_name(apk: Apk, roots: dict[str, Path]) -> None:
    compare(apk, roots, stride=8, variants=32, big=(8, 300, 1200))
