"""Build and publish one runtime's images from a Plan.

stream -> each format's writer -> checks -> manifest, SBOM -> publish -> stamp. Everything is
written in a scratch directory and published last, so an interrupted build leaves nothing that
looks finished (and the next run removes the scratch).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import atomic, errors, log, paths, settings, sparse, stamps, workspace
from ..background import Task, quick_handoff, wait_all
from ..errors import VulcanError, no_space
from ..formats import Job, Writer, Written
from ..hashing import copy_and_hash, sha256_file
from . import AGENT, cache, manifest, sbom, stream
from .plan import Image, Plan, make_plan
from .splice import splice_agent
from .stream import Stream
from .tarwalk import Facts


def _stream(
    plan: Plan, scratch: Path, stack: contextlib.ExitStack, background: list[Task[Any]]
) -> tuple[Plan, Stream, Task[tuple[str | None, Facts | None]] | None]:
    """The cached stream (its verification running on the other core) or a fresh one. A
    spliced stream is written in RAM when it fits (``stack`` holds that directory until the
    images are written) and is not stored: the base it came from stays the cache's entry, so an
    agent change writes nothing to disk but the images (a go-like stream is 214 MiB)."""
    found = base = None
    try:
        found = None if settings.reassemble() else cache.cached(plan.stream_digest)
        if found is not None:
            log.info(f"{plan.what}: same packages, agent and config as a cached build: reusing its tar")
            cache.sweep(_cache_keys(plan))  # what a build killed while storing them left
            return plan, found, Task(log.timed, "verify cached stream", cache.verify, found)
        base = None if settings.reassemble() else cache.cached(plan.base_digest, "base")
    except cache.Corrupt as exc:  # assembled again, which stores both names: the entry is repaired
        log.warn(f"a cached tar stream of {plan.what} is corrupt ({exc}); assembling it again")
    if base is not None:
        with log.phase("verify cached stream"):
            problem, facts = cache.verify(base, AGENT)
        if facts is not None and problem is None:
            log.info(f"{plan.what}: only the agent changed since a cached build: replacing it in that build's tar")
            agent = plan.guest.read_bytes()
            room = base.tar.stat().st_size + len(agent)
            ram = stack.enter_context(workspace.ram_scratch(settings.ram_dir(), f"{plan.runtime}-stream", room))
            with log.phase("splice the agent into the stream"):
                fresh = _splice(base, facts, agent, plan.epoch, ram, scratch)
            return plan, fresh, None
        log.warn(f"cached tar stream {base.tar} is corrupt ({problem}); assembling it again")
    plan, fresh = _assemble(plan, scratch, background)
    return plan, fresh, None


def _splice(base: Stream, facts: Facts, agent: bytes, epoch: int, ram: Path | None, scratch: Path) -> Stream:
    """The spliced stream, in RAM when it had room; if RAM fills up meanwhile, in scratch."""
    if ram is not None:
        try:
            return splice_agent(base, facts, agent, epoch, ram)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            (ram / "rootfs.tar").unlink(missing_ok=True)
            log.warn(f"{errors.mount_point(ram)} (VULCAN_RAM) filled up while the agent was spliced into the "
                     f"stream there; splicing it in {scratch}")  # fmt: skip
    try:
        return splice_agent(base, facts, agent, epoch, scratch)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise no_space(scratch, base.tar.stat().st_size, "splicing the agent into the stream in") from None
        raise


def _store_in_cache(plan: Plan, fresh: Stream) -> Task[None]:
    """Store the stream for the next build (hard links and sidecars, ~30 ms), on the other core
    while the writers run. A build killed meanwhile leaves at most a tar without its sidecar,
    which is never used (``cache.cached`` needs both)."""
    return Task(log.timed, "store stream", cache.store, fresh, _cache_keys(plan))


def _cache_keys(plan: Plan) -> list[tuple[str, str]]:
    """The cache entries a stream is stored under: its own digest, and its packages' and
    configuration's (``base``: what an agent change splices)."""
    return [(plan.stream_digest, ""), (plan.base_digest, "base")]


def _assemble(plan: Plan, scratch: Path, background: list[Task[Any]]) -> tuple[Plan, Stream]:
    """Assemble from the plan's packages, merging each as soon as it is verified (the others
    are checked, or downloaded, meanwhile); after a re-lock (a locked package left the mirror),
    from a new plan of the new closure, so that stream, manifest and stamp describe what was built."""
    from ..apk import packages  # only a build that assembles fetches

    if plan.image is not None:  # a template: from its image's layers
        from ..template.assemble import assemble

        try:
            fresh = assemble(plan, plan.image, scratch)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise no_space(scratch, None, "assembling the image in") from None
            raise
        background.append(_store_in_cache(plan, fresh))
        return plan, fresh
    try:
        fresh = _merged(plan, scratch)
    except packages.PackageGone as exc:
        closure = packages.relock(plan.pins, plan.runtime, plan.arch, plan.frozen, exc)
        plan = make_plan(plan.pins, plan.runtime, plan.arch, plan.frozen, closure)
        fresh = _merged(plan, scratch)
    background.append(_store_in_cache(plan, fresh))
    return plan, fresh


def _merged(plan: Plan, scratch: Path) -> Stream:
    from ..apk import packages

    try:  # the merge is Python; inflating, hashing and writing run beside it on the other core
        with packages.fetching(plan.pins, plan.closure, plan.arch, plan.runtime) as verified, quick_handoff():
            return stream.assemble(plan, verified, scratch)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # package trees and the tar are written to scratch
            raise no_space(scratch, None, "assembling the image in") from None
        raise


def _write_all(plan: Plan, s: Stream, scratch: Path) -> list[Image]:
    results: list[Image] = []
    for out in plan.outputs:
        final = scratch / out.image.name
        job = Job(s.tar, plan.stream_digest, s.shape, plan.epoch, f"vulcan-{plan.runtime}", plan.headroom_mib)
        # written in RAM when it fits (mke2fs is ~25% faster there); then the other core checks it
        # and copies it next to the output while this thread hashes it (one task, not two: three
        # threads on two cores slowed the hash, which is what a build waits for)
        in_ram = contextlib.ExitStack()  # the RAM it was written in: given back once it is copied out
        ram = in_ram.enter_context(
            workspace.ram_scratch(settings.ram_dir(), f"{plan.runtime}-{out.format}", out.writer.room(job))
        )
        try:
            built = ram / out.image.name if ram is not None else final
            with log.phase(f"write {out.format}"):
                written, built = _write(out.writer, job, built, final)
            check = functools.partial(log.timed, f"check {out.format}", out.writer.check, built)
            with log.phase(f"hash {out.format}"):
                digest = _hashed(out.format, built, final, check, in_ram.close)
        finally:
            in_ram.close()  # (where the copy has not already)
        results.append(Image(out, written, digest))
    return results


def _hashed(fmt: str, built: Path, final: Path, check: Callable[[], None], free: Callable[[], None]) -> str:
    """The image's sha256, taken while ``check`` runs on the other core and, for an image
    written in RAM, while it is copied to ``final`` there (then ``free`` gives the RAM back
    while the hash ends: hashing.copy_and_hash)."""
    if built == final:
        checking = Task(check)
        try:
            return sha256_file(built)
        finally:
            wait_all([checking])
    try:
        return copy_and_hash(built, final, check, free, f"copy {fmt} out of RAM")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise no_space(final, sparse.allocated_bytes(built), "copying the image to") from None
        raise


def _write(writer: Writer, job: Job, built: Path, final: Path) -> tuple[Written, Path]:
    """Write the image at ``built``; if that was in RAM and RAM filled up meanwhile (another
    program took it), write it at ``final`` instead. Every writer fails its own way there
    (mke2fs: a short write; tar2sqfs: "I/O error", and it removes its output), so the test is
    the space left once the partial image is gone: less than the image may need means RAM."""
    try:
        return writer.write(job, built), built
    except VulcanError as exc:
        if isinstance(exc, errors.NoSpace) and built == final:
            raise
        built.unlink(missing_ok=True)
        short = errors.free_bytes(built.parent) < writer.room(job) + workspace.RAM_MARGIN // 4
        why = exc.message.strip().splitlines()[-1][:200] if exc.message.strip() else type(exc).__name__
        if built == final:  # on disk: a full file system is said as one, naming it (on the tool's word)
            if "No space left on device" in exc.message or (short and "I/O error" in exc.message):
                raise no_space(final, writer.room(job), f"writing the image ({why})") from None
            raise
        if not short:
            raise  # RAM has room: the failure is not about space
        log.warn(f"{errors.mount_point(built.parent)} (VULCAN_RAM) filled up while {final.name} was written "
                 f"there ({why}); writing it in {final.parent}")  # fmt: skip
    return _write(writer, job, final, final)


def _build(plan: Plan, scratch: Path, stack: contextlib.ExitStack) -> tuple[Plan, Stream, list[Image]]:
    """The stream and every image written from it, checked and hashed."""
    background: list[Task[Any]] = []  # what runs meanwhile on the other core (storing the stream)
    stack.callback(lambda: [t.exception() for t in background])  # after an error too: before scratch goes
    plan, s, pending = _stream(plan, scratch, stack, background)
    try:
        images = _write_all(plan, s, scratch)
        failed: VulcanError | None = None
    except VulcanError as exc:  # a corrupt cached stream can make a writer fail: judge the stream first
        images, failed = [], exc
    problem = pending.result()[0] if pending is not None else None
    if problem is not None:
        log.warn(f"cached tar stream {s.tar} is corrupt ({problem}); assembling it again")
        s.tar.unlink(missing_ok=True)
        plan, s = _assemble(plan, scratch, background)
        images = _write_all(plan, s, scratch)
    elif failed is not None:
        raise failed
    wait_all(background)
    return plan, s, images


def make(plan: Plan) -> Plan:
    """Build and publish the plan's images; returns the plan that was built (re-planned after a re-lock)."""
    with log.timing(plan.what):
        return _make(plan)


def _make(plan: Plan) -> Plan:
    start = time.monotonic()
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    with workspace.scratch(paths.scratch_parent(plan.out_dir), f"rootfs-{plan.runtime}") as scratch, \
            contextlib.ExitStack() as stack:  # fmt: skip
        plan, s, images = _build(plan, scratch, stack)
        keep = settings.keep_tar()  # debugging and the benchmark: keep the stream
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s.tar, keep / f"{plan.runtime}-{plan.arch}.tar")
        rows = manifest.package_rows(plan, s)
        doc = manifest.manifest(plan, s, rows, images)
        spdx = sbom.document(plan, rows, images)
        (scratch / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n")
        (scratch / "spdx.json").write_text(json.dumps(spdx, indent=1) + "\n")
        with log.phase("publish"):
            for out in plan.outputs:
                atomic.publish(scratch / out.image.name, out.image)
            atomic.publish(scratch / "manifest.json", plan.manifest)
            atomic.publish(scratch / "spdx.json", plan.spdx)
    known = {i.output.image: i.sha256 for i in images}
    stamps.write(plan.stamp, plan.inputs, plan.base, plan.files(), known=known)
    for i in images:
        log.info(
            f"{plan.what}: {i.output.image.relative_to(plan.base)} {i.written.size >> 20} MiB "
            f"({len(plan.closure) if plan.image is None else len(s.packages)} packages, "
            f"{s.shape.content_bytes >> 20} MiB content) "
            f"in {time.monotonic() - start:.1f}s, sha256 {i.sha256}"
        )
    return plan
