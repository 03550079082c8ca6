"""Toolchains the tests need from the host, found or skipped with the reason."""

from __future__ import annotations

import glob
import os
import shutil

import pytest


def find_go() -> str:
    for cand in [os.environ.get("VULCAN_GO"), shutil.which("go"), *sorted(glob.glob("/usr/lib/go-*/bin/go"))]:
        if cand and os.access(cand, os.X_OK):
            return cand
    pytest.skip("no Go toolchain (Debian: apt-get install golang-go, or set VULCAN_GO)")
