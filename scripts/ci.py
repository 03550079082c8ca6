"""The CI matrix, from what nox lists: ``nox -t image -l --json | python -m scripts ci-matrix``.

Every session tagged ``image`` (one per runtime in pins.json) times every architecture, in
the form GitHub Actions' ``strategy.matrix`` takes (``{"include": [...]}``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .arch import ARCHES
from .steps import prog


def matrix(sessions: list[dict[str, Any]], tag: str = "image") -> dict[str, list[dict[str, str]]]:
    names = sorted(s["session"] for s in sessions if tag in s.get("tags", []))
    return {"include": [{"session": n, "arch": a} for n in names for a in ARCHES]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=prog("ci-matrix"), description=__doc__)
    p.add_argument("--tag", default="image")
    args = p.parse_args(argv)
    m = matrix(json.load(sys.stdin), args.tag)
    if not m["include"]:
        print(f"no sessions tagged {args.tag!r} in the JSON on stdin (nox -t {args.tag} -l --json)", file=sys.stderr)
        return 1
    print(f"matrix={json.dumps(m, separators=(',', ':'))}")
    return 0
