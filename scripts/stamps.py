"""Is this output up to date? Stamps are JSON manifests of a step's inputs and outputs.

A stamp records the inputs a step used (pin entries, lock, hashes of sources, tool versions)
and each output's sha256, size and mtime. A step is skipped when the inputs are unchanged and
every output is intact; otherwise the first difference is the reason logged for rebuilding.
Stamps are written last and atomically. Model: mkosi's cache manifest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import TOOL_VERSION, atomic
from .hashing import sha256_file


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key in value:  # declaration order: the first difference is the most telling
            out.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    """An input's value for a log line: a digest as its first 12 hex digits, a string as it is
    (cut at 60 characters), anything else as JSON when short, else what kind of value it is."""
    if value is None:
        return "(none)"
    if isinstance(value, str):
        if len(value) >= 40 and all(c in "0123456789abcdef" for c in value):
            return value[:12] + "…"
        return value if len(value) <= 60 else value[:59] + "…"
    text = json.dumps(value, sort_keys=True)
    if len(text) <= 60:
        return text
    return (
        f"a list of {len(value)} items"
        if isinstance(value, list)
        else f"{type(value).__name__} of {len(text)} characters"
    )


def file_record(path: Path, sha256: str | None = None) -> dict[str, Any]:
    st = path.stat()
    return {"sha256": sha256 or sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _intact(path: Path, record: Mapping[str, Any]) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if st.st_size != record.get("size"):
        return False
    if st.st_mtime_ns == record.get("mtime_ns"):
        return True  # unchanged since we wrote it: no need to read it again
    return sha256_file(path) == record.get("sha256")


def outdated(stamp: Path, inputs: Mapping[str, Any], base: Path) -> str | None:
    """None when up to date, else why the step must run (the first differing input or output)."""
    try:
        data = json.loads(stamp.read_text())
    except FileNotFoundError:
        return "not built yet"
    except (OSError, ValueError):
        return f"stamp {stamp} is unreadable"
    if data.get("tool_version") != TOOL_VERSION:
        return f"tool version changed ({data.get('tool_version')} -> {TOOL_VERSION})"
    old, new = _flatten(data.get("inputs", {})), _flatten(json.loads(json.dumps(inputs)))
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            return f"input {key} changed: {_short(old.get(key))} -> {_short(new.get(key))}"
    for rel, record in sorted(data.get("outputs", {}).items()):
        path = base / rel
        if not path.exists():
            return f"{path} is missing"
        if not _intact(path, record):
            return f"{path} was modified since it was built"
    return None


def output_sha256(stamp: Path, rel: str) -> str | None:
    try:
        return str(json.loads(stamp.read_text())["outputs"][rel]["sha256"])
    except (OSError, ValueError, KeyError):
        return None


def write(
    stamp: Path, inputs: Mapping[str, Any], base: Path, outputs: list[Path], known: Mapping[Path, str] | None = None
) -> None:
    """``known``: sha256 values the caller already computed (an image is not hashed twice)."""
    known = known or {}
    data = {
        "tool_version": TOOL_VERSION,
        "inputs": inputs,
        "outputs": {str(p.relative_to(base)): file_record(p, known.get(p)) for p in sorted(outputs)},
    }
    atomic.write_text(stamp, json.dumps(data, indent=2, sort_keys=True) + "\n")
