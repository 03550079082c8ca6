"""CI's job summaries, as Markdown tables: ``python -m scripts ci-summary KIND FILE...``.

``boot`` reads ``boot --report`` files (boot-to-ready per runtime and format), ``restore`` the
``boot --restore --report`` ones (restore-to-first-result beside cold boot-to-ready), and
``published`` publish's ``--digests`` file (the references hosts pin). A missing file is
skipped (a job that stopped early), so the summary says what there is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .steps import prog


def _rows(files: list[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(files):
        if f.is_file():
            doc = json.loads(f.read_text())
            out += doc if isinstance(doc, list) else [doc]
    return out


def boot(files: list[Path]) -> str:
    lines = [
        "| runtime | format | vmm | ok | boot-to-ready (s) | bytes copied | KVM |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in _rows(files):
        lines.append(f"| {r['runtime']} | {r['format']} | {r['vmm']} | {r['ok']} | {r['seconds']} | "
                     f"{r['copied_bytes']} | {r.get('host_kvm', '')} |")  # fmt: skip
    return "\n".join(lines)


def restore(files: list[Path]) -> str:
    lines = ["| runtime | format | clones ok | restore-to-first-result (ms, median) | each clone (ms) | load (ms) | "
             "cold boot-to-ready (s) | bytes copied |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in _rows(files):
        each = ", ".join(str(round(c["first_result_ms"])) for c in r["clones"] if c["first_result_ms"])
        ok = sum(bool(c["ok"]) for c in r["clones"])
        lines.append(f"| {r['runtime']} | {r['format']} | {ok}/{r['count']} | {r['restore_to_first_result_ms']} | "
                     f"{each} | {r['load_ms']} | {r['cold_boot_to_ready_s']} | {r['copied_bytes']} |")  # fmt: skip
    return "\n".join(lines)


def published(files: list[Path]) -> str:
    lines = []
    for doc in _rows(files):
        lines += [f"signed by key `{doc['signed_by']}`", "", "| what | reference | tag |", "|---|---|---|"]
        lines += [f"| {name} | `{e['reference']}` | {e['tag']} |" for name, e in doc["published"].items()]
    return "\n".join(lines) or "nothing was published"


KINDS = {"boot": boot, "restore": restore, "published": published}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=prog("ci-summary"), description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("files", nargs="*", type=Path)
    args = p.parse_args(argv)
    print(KINDS[args.kind](args.files))
    return 0
