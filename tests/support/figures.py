"""Figures the real-Firecracker tests measured, printed at the end of the run (conftest's
terminal summary), labelled with the KVM they were measured on: under a KVM that emulates guest
kernel code they describe that host, not the goals (CI's boot job on a normal KVM does)."""

from __future__ import annotations

FIGURES: list[str] = []


def add(line: str) -> None:
    FIGURES.append(line)


def summary() -> list[str]:
    if not FIGURES:
        return []
    from scripts.vm import host_kvm, kvm_caveat

    return [f"real Firecracker to user space{kvm_caveat() or f' (under {host_kvm()})'}:", *(f"  {x}" for x in FIGURES)]
