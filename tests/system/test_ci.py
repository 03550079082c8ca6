"""The slow part of tests/quick/test_ci.py (see its docstring)."""

from __future__ import annotations

from tests.support import imagerepo
from tests.support.apkrepo import publish
from tests.support.world import World


def test_the_lock_hand_off_runs_here_as_in_ci(world: World) -> None:
    """No committed lock: the lock job's commands find it stale, resolve it once, and a
    --frozen build (what every cell runs) then succeeds with that lock; a fresh lock is a no-op."""
    imagerepo.setup(world, runtimes={"python": imagerepo.RUNTIMES["python"]})
    state = world.run("ci-lock", check=True).stdout
    assert "fresh=false" in state and "python/x86_64" in state
    frozen = world.run("rootfs", "--runtime", "python", "--frozen")
    assert frozen.returncode == 4 and "nox -s lock" in frozen.stderr  # what a cell does without the hand-off
    publish(world.mirror, imagerepo.packages("aarch64"), "aarch64")  # the lock job resolves both arches
    lock = world.run("lock", check=True)
    assert "lock python/x86_64" in lock.stderr and "lock python/aarch64" in lock.stderr
    assert world.run("ci-lock", check=True).stdout.strip() == "fresh=true"
    world.use_agent()
    world.run("rootfs", "--runtime", "python", "--frozen", check=True)
    assert (world.out / "images/python.ext4").is_file()
