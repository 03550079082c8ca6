"""Every kind of bad pins file -> one line naming the file, the JSON path and the problem."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from scripts.errors import PinError
from scripts.pins import load
from tests.support.world import BASE_PINS, World


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "pins.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def broken(edit: Any) -> dict[str, Any]:
    pins = copy.deepcopy(BASE_PINS)
    edit(pins)
    return pins


CASES = [
    (
        lambda p: p["kernel"]["sha256"].__setitem__("aarch64", "abc"),
        "kernel.sha256.aarch64: expected 64 hex characters",
    ),
    (
        lambda p: p["kernel"]["sha256"].__setitem__("x86_64", "A" * 64),
        "kernel.sha256.x86_64: expected 64 hex characters",
    ),
    (lambda p: p["firecracker"]["sha256"].pop("x86_64"), "firecracker.sha256.x86_64: missing checksum"),
    (lambda p: p["firecracker"]["sha256"].__setitem__("x86_64", ""), "firecracker.sha256.x86_64: missing checksum"),
    (
        lambda p: p["firecracker"]["sha256"].__setitem__("riscv64", "0" * 64),
        "firecracker.sha256.riscv64: unknown architecture",
    ),
    (lambda p: p.pop("kernel"), "kernel: missing"),
    (lambda p: p.__setitem__("kernel", []), "kernel: expected an object, got list"),
    (lambda p: p["firecracker"].pop("version"), "firecracker.version: missing"),
    (lambda p: p["firecracker"].__setitem__("version", 117), "firecracker.version: expected a non-empty string"),
    (lambda p: p["kernel"].__setitem__("url", "http://insecure/{arch}"), "kernel.url: expected an https:// URL"),
    (lambda p: p["kernel"].__setitem__("url", "https://x/{arhc}"), "kernel.url: unknown placeholder {arhc}"),
    (lambda p: p["kernel"].__setitem__("url", "https://x/{arch"), "kernel.url: bad URL template"),
    (lambda p: p.pop("schema_version"), "schema_version: missing"),
    (lambda p: p.__setitem__("schema_version", 2), "schema_version: unsupported version 2"),
    (lambda p: p["go"]["sha256"].__setitem__("aarch64", "z" * 64), "go.sha256.aarch64: expected 64 hex characters"),
    (lambda p: p.__setitem__("schema_version", "1"), 'schema_version: expected the number 1, got str "1"'),
    (
        lambda p: p["alpine"].__setitem__("mirror", "https://m/{branch}"),
        "alpine.mirror: unknown placeholder {branch}: this URL takes no placeholders",
    ),
    (lambda p: p["alpine"].__setitem__("headroom_mib", 10**15), "alpine.headroom_mib: 1000000000000000 is more"),
    (lambda p: p["alpine"].__setitem__("formats", ["ext4", "ext4"]), "alpine.formats: a format is listed twice"),
    (lambda p: p["guest"].__setitem__("source", 3), "guest.source: expected a non-empty string"),
    (lambda p: p["guest"].__setitem__("pkg", "."), "guest.pkg: unknown key"),
]


@pytest.mark.parametrize(("edit", "message"), CASES)
def test_bad_pins_name_file_path_and_problem(tmp_path: Path, edit: Any, message: str) -> None:
    path = write(tmp_path, broken(edit))
    with pytest.raises(PinError) as info:
        load(path)
    assert str(info.value).startswith(f"pins.json: {message}")


def test_missing_checksum_tells_how_to_get_one(tmp_path: Path) -> None:
    path = write(tmp_path, broken(lambda p: p["kernel"]["sha256"].pop("aarch64")))
    with pytest.raises(PinError) as info:
        load(path)
    assert "nox -s update_pins" in str(info.value)


def test_bad_json_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "schema_version": 1,\n  "kernel": {,\n}')
    with pytest.raises(PinError) as info:
        load(path)
    assert str(info.value).startswith("pins.json: line 3 column 14: invalid JSON")


def test_top_level_must_be_an_object_and_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(PinError, match=r"pins.json: \(top level\): expected an object"):
        load(write(tmp_path, "[]"))
    with pytest.raises(PinError, match="no such pins file"):
        load(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "pins.json: invalid JSON: nested too deeply"),
        ('{"schema_version": ' + "9" * 5000 + "}", "pins.json: invalid JSON: Exceeds the limit"),
        (" " * (2 << 20), "larger than 1024 KiB: not a pins file"),
    ],
)
def test_hostile_json_is_an_error_not_a_crash(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PinError, match=message):
        load(write(tmp_path, text))


def test_a_device_is_not_read_as_a_pins_file() -> None:
    """VULCAN_PINS=/dev/zero would read forever."""
    with pytest.raises(PinError, match="/dev/zero: not a regular file"):
        load(Path("/dev/zero"))


def test_repository_pins_are_valid() -> None:
    pins = load()
    assert pins.firecracker.url_for("aarch64").endswith("/v1.17.0/firecracker-v1.17.0-aarch64.tgz")
    assert pins.go is not None and pins.go.url_for("aarch64").endswith("go1.26.9.linux-arm64.tar.gz")


def test_cli_reports_bad_pins_without_traceback(world: World) -> None:
    world.pins["kernel"]["sha256"]["aarch64"] = "abc"
    proc = world.run("download")
    assert proc.returncode == 4
    assert "pins.json: kernel.sha256.aarch64: expected 64 hex characters" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (world.out / "bin").exists()


def test_a_typo_in_build_arguments_names_every_step_they_go_to(world: World) -> None:
    """rootfs-<rt> passes its arguments on to guest: the error must not claim 'nox -s guest'."""
    proc = world.run("guest", "--bogus")
    assert proc.returncode == 2
    assert "nox -s {download,guest,rootfs-<runtime>,rootfs_all} --" in proc.stderr and "--bogus" in proc.stderr
