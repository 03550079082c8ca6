"""Shared test helpers: mirrors, APK and image repositories, the test world, toolchains."""
