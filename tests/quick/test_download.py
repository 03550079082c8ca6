"""`nox -s download` end to end against a local upstream-shaped mirror."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.arch import host_arch
from tests.support.world import BASE_PINS, REPO, World

ARCH = host_arch()
FC_TGZ = f"firecracker-v1.17.0-{ARCH}.tgz"
KERNEL = f"vmlinux-{BASE_PINS['kernel']['version']}"  # the pinned line (6.18)


def bin_files(w: World) -> dict[str, int]:
    b = w.out / "bin"
    return {p.name: p.stat().st_mtime_ns for p in b.iterdir() if p.is_file()} if b.exists() else {}


def test_fresh_download_puts_verified_binaries_in_bin(world: World) -> None:
    proc = world.run("download", check=True)
    b = world.out / "bin"
    assert set(bin_files(world)) == {"firecracker", "jailer", "vmlinux", "CACHEDIR.TAG"}  # the tag: clean's marker
    out = subprocess.run([b / "firecracker", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Firecracker v1.17.0"
    assert (b / "jailer").stat().st_mode & 0o111
    expected = world.pins["kernel"]["sha256"][ARCH]
    assert hashlib.sha256((b / "vmlinux").read_bytes()).hexdigest() == expected
    assert "not built yet" in proc.stderr
    assert world.mirror.count(FC_TGZ) == 1 and world.mirror.count(KERNEL) == 1


def test_second_run_makes_no_requests_and_rewrites_nothing(world: World) -> None:
    world.run("download", check=True)
    before, stamp = bin_files(world), (world.out / "bin/.stamps/download.json").stat().st_mtime_ns
    n = len(world.mirror.requests)
    proc = world.run("download", check=True)
    assert len(world.mirror.requests) == n
    assert bin_files(world) == before
    assert (world.out / "bin/.stamps/download.json").stat().st_mtime_ns == stamp
    assert "up to date" in proc.stderr


def test_in_process_check_says_up_to_date_only_when_the_step_would(world: World) -> None:
    # what the noxfile asks before it starts `python -m scripts` (scripts/uptodate.py)
    def check(*argv: str) -> subprocess.CompletedProcess[str]:
        code = "import sys; from scripts.uptodate import check; sys.exit(0 if check(sys.argv[1], sys.argv[2:]) else 3)"
        return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=world.env(), capture_output=True,
                              text=True)  # fmt: skip

    assert check("download").returncode == 3  # nothing downloaded yet
    world.run("download", check=True)
    n = len(world.mirror.requests)
    proc = check("download")
    assert proc.returncode == 0 and f"download ({ARCH}): up to date" in proc.stderr
    other = "aarch64" if ARCH == "x86_64" else "x86_64"
    assert check("download", "--arch", other).returncode == 3  # that arch was never downloaded
    assert check("download", "--arch", "sparc").returncode == 3  # the step itself reports the bad argument
    assert check("guest").returncode == 3  # no agent built yet
    (world.out / "bin/jailer").unlink()
    assert check("download").returncode == 3  # the step restores it
    assert len(world.mirror.requests) == n  # and the check itself never touches the network


def test_deleted_or_modified_output_is_restored_from_cache_without_network(world: World) -> None:
    world.run("download", check=True)
    n = len(world.mirror.requests)
    (world.out / "bin/firecracker").unlink()
    proc = world.run("download", check=True)
    assert "bin/firecracker is missing" in proc.stderr
    (world.out / "bin/vmlinux").write_bytes(b"hand-edited")
    proc = world.run("download", check=True)
    assert "vmlinux was modified" in proc.stderr
    assert len(world.mirror.requests) == n
    assert (world.out / "bin/vmlinux").read_bytes().startswith(b"\x7fELF")
    assert (world.out / "bin/firecracker").exists()


def test_tampered_cache_entry_is_detected_and_fetched_again(world: World) -> None:
    world.run("download", check=True)
    digest = world.pins["kernel"]["sha256"][ARCH]
    entry = world.cache / "sha256" / digest[:2] / digest
    entry.write_bytes(b"evil")
    (world.out / "bin/vmlinux").unlink()
    proc = world.run("download", check=True)
    assert "is corrupt" in proc.stderr
    assert world.mirror.count(KERNEL) == 2
    assert hashlib.sha256((world.out / "bin/vmlinux").read_bytes()).hexdigest() == digest


def test_wrong_bytes_fail_with_both_hashes_and_publish_nothing(world: World) -> None:
    fc = world.pins["firecracker"]
    world.mirror.fail(fc["url"].format(version=fc["version"], arch=ARCH), "wrong")
    proc = world.run("download")
    assert proc.returncode == 6
    assert fc["sha256"][ARCH] in proc.stderr
    assert "actual sha256:" in proc.stderr and "checksum mismatch" in proc.stderr
    assert FC_TGZ in proc.stderr
    assert "Traceback" not in proc.stderr
    assert bin_files(world) == {}
    assert not list(world.cache.rglob("*.part"))
    assert not [
        p
        for p in (world.cache / "sha256").rglob("*")
        if p.is_file() and not p.name.endswith(".lock") and p.name == fc["sha256"][ARCH]
    ]


def test_404_names_the_url_and_does_not_retry(world: World) -> None:
    kernel = world.pins["kernel"]
    url = kernel["url"].format(version=kernel["version"], arch=ARCH)
    world.mirror.remove(url)
    proc = world.run("download")
    assert proc.returncode == 3
    assert url in proc.stderr and "HTTP 404" in proc.stderr
    assert world.mirror.count(KERNEL) == 1
    assert "bin" not in {p.name for p in world.out.iterdir()} or bin_files(world) == {}


def test_500_twice_then_ok_succeeds(world: World) -> None:
    kernel = world.pins["kernel"]
    world.mirror.fail(kernel["url"].format(version=kernel["version"], arch=ARCH), "500", "500")
    proc = world.run("download", check=True)
    assert world.mirror.count(KERNEL) == 3
    assert "HTTP 500" in proc.stderr and "retrying" in proc.stderr


def test_connection_dropped_mid_body_resumes_and_leaves_no_part(world: World) -> None:
    fc = world.pins["firecracker"]
    world.mirror.fail(fc["url"].format(version=fc["version"], arch=ARCH), "drop")
    world.run("download", check=True)
    ranges = [r for _, p, r in world.mirror.requests if p.endswith(FC_TGZ)]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] is not None  # resumed with Range
    assert not list(world.tmp.rglob("*.part"))
    assert (world.out / "bin/firecracker").exists()


def test_two_concurrent_runs_both_succeed_with_one_download(world: World) -> None:
    world.mirror.delay_s = 0.5
    a = world.popen("download", VULCAN_OUT=str(world.tmp / "a"))
    b = world.popen("download", VULCAN_OUT=str(world.tmp / "b"))
    for proc in (a, b):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert world.mirror.count(FC_TGZ) == 1 and world.mirror.count(KERNEL) == 1
    for d in ("a", "b"):
        assert (world.tmp / d / "bin/firecracker").exists()


def test_other_arch_goes_to_its_own_directory_and_pin_change_rebuilds(world: World) -> None:
    other = "aarch64" if ARCH == "x86_64" else "x86_64"
    world.run("download", "--arch", other, check=True)
    assert (world.out / "bin" / other / "firecracker").exists()
    assert not (world.out / "bin/firecracker").exists()
    world.pins["kernel"]["version"] = "6.1.999"
    world.pins["kernel"]["url"] = world.pins["kernel"]["url"]  # same template, new version
    new = b"\x7fELF new kernel"
    world.pins["kernel"]["sha256"][other] = hashlib.sha256(new).hexdigest()
    world.mirror.add(world.pins["kernel"]["url"].format(version="6.1.999", arch=other), new)
    proc = world.run("download", "--arch", other, check=True)
    assert "input kernel.version changed" in proc.stderr
    assert (world.out / "bin" / other / "vmlinux").read_bytes() == new


def test_bad_arch_is_a_clear_error(world: World) -> None:
    proc = world.run("download", "--arch", "riscv64")
    assert proc.returncode == 2
    assert "invalid choice: 'riscv64'" in proc.stderr and "x86_64" in proc.stderr


def test_archive_without_binaries_is_rejected(world: World, tmp_path: Path) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("something-else/README")
        tar.addfile(info, io.BytesIO(b""))
    fc = world.pins["firecracker"]
    fc["sha256"][ARCH] = hashlib.sha256(buf.getvalue()).hexdigest()
    world.mirror.add(fc["url"].format(version=fc["version"], arch=ARCH), buf.getvalue())
    proc = world.run("download")
    assert proc.returncode == 1
    assert f"lacks release-v1.17.0-{ARCH}/firecracker-v1.17.0-{ARCH}" in proc.stderr
    assert bin_files(world) == {}


def test_downloads_at_once_share_one_progress_line_and_log_lines_never_glue_onto_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal: one download shows its bar; several (parallel fetches, builds together)
    share one line that sums them; a log line first erases the bar; a finished download leaves
    no bar behind."""
    import io

    from scripts import log

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(log, "_stream", lambda: screen)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(log, "_last_draw", 0.0)
    a = log.Progress("a.apk", 2048)
    a.update(1024)
    assert screen.getvalue().startswith("\ra.apk [###############               ] 1.0 KiB/2.0 KiB ")
    monkeypatch.setattr(log, "_last_draw", 0.0)
    b = log.Progress("b.apk", 1024 * 1024)
    b.update(512)
    assert "downloading 2 files: 1.5 KiB of 1.0 MiB" in screen.getvalue().rsplit("\r", 1)[1]
    log.info("downloaded c.apk")
    tail = screen.getvalue()
    assert "\r" + " " * log.WIDTH + "\rvulcan: downloaded c.apk\n" in tail  # erased first, then the line
    a.close()
    b.close()
    assert screen.getvalue().endswith("\r" + " " * log.WIDTH + "\r")  # nothing left on the line
    assert log._active == []
