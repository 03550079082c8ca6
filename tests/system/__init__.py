"""The rest of the full suite: whole images rebuilt and compared, Go builds, boots under QEMU and
the real Firecracker (to user space: ``-m userspace``), registries under attack, the oracle's
full sweep. Every test here is marked ``slow`` (tests/conftest.py), so ``-m "not slow"`` is the
quick set as well."""
