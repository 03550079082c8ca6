"""The one table of steps: ``python -m scripts``, the noxfile and the in-process no-op check read it.

Importing this module imports no step: each is loaded by name when it runs (every process
start counts; see bench: no-op).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple


class Step(NamedTuple):
    command: str  # python -m scripts COMMAND
    module: str  # scripts.<module>: main(argv), or the step protocol (step.py) when stamped
    summary: str  # what nox -l and --help show
    stamped: bool = False  # follows step.py's protocol: check() + run(), so no-op runs can skip it
    session: str | None = None  # the nox session name, when it differs from the command ("" = none)
    also: tuple[str, ...] = ()  # other nox sessions that run this step (the noxfile's rootfs_all)

    @property
    def session_name(self) -> str | None:
        if self.session == "":
            return None
        return self.session or self.command

    def load(self) -> ModuleType:
        return importlib.import_module(f"{__package__}.{self.module}")


STEPS = (
    Step("download", "download", "Download the pinned Firecracker, jailer and guest kernel into bin/ (verified).",
         stamped=True),
    Step("guest", "guest", "Build the static, reproducible vulcan-guest agent into bin/ (VULCAN_GO: a local Go).",
         stamped=True),
    Step("rootfs", "rootfs.build", "Build one runtime's images (+ manifest, SPDX SBOM) from the lock.",
         stamped=True, session="rootfs-<runtime>", also=("rootfs_all",)),
    Step("lock", "lock", "Resolve each runtime's Alpine packages for each arch into alpine.lock.json."),
    Step("mirror", "mirror", "Write everything a build needs from outside into a directory, verified (-- DIR)."),
    Step("verify", "verify", "Check every artifact in bin/ and images/ (table, or --json; --reproduce rebuilds)."),
    Step("boot", "vm.boot", "Boot images and prove the runtime works: Firecracker, or -- --vmm qemu."),
    Step("snapshot", "vm.snapshot",
         "Snapshot each runtime's VM once it is ready and warm, for 'boot -- --restore' (a KVM host)."),
    Step("publish", "registry.publish",
         "Publish the images and host files to an OCI registry, signed (-- --to REGISTRY/REPOSITORY)."),
    Step("pull", "registry.pull", "Pull signed images (or host files) from a registry, verified (-- REFERENCE)."),
    Step("clean", "clean", "Remove bin/, images/ and their stamps; -- --all also removes the download cache."),
    Step("update_pins", "update_pins",
         "Move pins to the newest upstream versions in their lines, then re-lock (--check: report only)."),
    Step("ci-matrix", "ci", "Print the CI matrix from `nox -t image -l --json` on stdin (GitHub Actions).", session=""),
    Step("ci-summary", "ci_summary", "Print a CI job summary (boot, restore, published) as Markdown tables.",
         session=""),
    Step("ci-lock", "ci_lock", "Print whether alpine.lock.json is fresh for the pins (CI's lock job).", session=""),
)  # fmt: skip
BY_COMMAND = {s.command: s for s in STEPS}


def step(command: str) -> Step:
    return BY_COMMAND[command]


def prog(command: str) -> str:
    """How a user starts a step, as its --help names it: ``nox -s SESSION --``. The build steps
    share one parser (a session passes its arguments on to the sessions it requires), so theirs
    names every build session."""
    s = BY_COMMAND[command]
    if s.stamped:
        names = [n for x in STEPS if x.stamped for n in (x.session_name, *x.also) if n]
        return f"nox -s {{{','.join(names)}}} --"
    return f"nox -s {s.session_name} --" if s.session_name else f"python -m scripts {s.command}"
