"""What this CPU computes in, from its feature flags. No Keras import, so benchmark drivers
that must not load a backend can ask too."""

from __future__ import annotations

from pathlib import Path

# CPU flags of instructions that compute in bfloat16 (x86: AVX-512 BF16, AMX; Arm: BF16)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key in ("flags", "features"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def computes_bf16(flags: set[str] | None) -> bool | None:
    """Whether a CPU with these flags has bfloat16 instructions; None when they are unknown."""
    return None if flags is None else bool(flags & BF16_FLAGS)
