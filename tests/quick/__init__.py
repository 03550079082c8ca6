"""The quick set (under 3 minutes on 2 cores): the tool's logic, and every step on small worlds
with the real tools (apk-tools, e2fsprogs, squashfs-tools-ng, a real registry), no VM booted.
``nox -s tests -- tests/quick``; the full suite is ``tests``."""
