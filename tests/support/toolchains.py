"""Toolchains the tests need from the host, found or skipped with the reason."""

from __future__ import annotations

import glob
import os
import shutil

import pytest


def go_or_none() -> str | None:
    for cand in [os.environ.get("VULCAN_GO"), shutil.which("go"), *sorted(glob.glob("/usr/lib/go-*/bin/go"))]:
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def find_go() -> str:
    go = go_or_none()
    if go is None:
        pytest.skip("no Go toolchain (Debian: apt-get install golang-go, or set VULCAN_GO)")
    return go
