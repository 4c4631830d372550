"""Which precision a training run uses: ``--amp auto`` picks bf16 autocast only where it is native.

On a CPU without native bf16 arithmetic, autocast emulates it and is about 10x slower than fp32
(measured on an AVX2-only machine: 35 vs 350 images/s for WRN-16-1); with AVX-512 BF16 instructions
it was 1.7x faster than fp32 (benchmarks/results/precision-findings.md). On CUDA, bf16 is native from
compute capability 8.0 (Ampere) on.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from ..errors import UserError

AMP_MODES = ("auto", "none", "bf16")
# Set to 1 to make ``auto`` mean fp32 everywhere: runs whose numbers must not depend on whether the
# host has native bf16 (the test suite sets it; an explicit ``bf16`` still applies).
FP32_ENV = "BACKDOOR_ERASER_AUTO_FP32"
_warned: set[str] = set()  # one fallback warning per reason and process, not one per training stage


def cpu_bf16_support() -> tuple[bool, str]:
    """(native, why) for this CPU, from ATen's dispatch level and the CPU's bf16 instructions."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AMX"):
        # ATen dispatches its AVX2 (or plainer) kernels; bf16 goes through float conversions there.
        return False, f"the CPU's kernel level is {capability}, which has no native bf16"
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if not (has_bf16 or has_amx):
        return False, "the CPU has AVX-512 but neither AVX512-BF16 nor AMX instructions"
    return True, f"{capability} with {'AMX' if has_amx else 'AVX512-BF16'}"


def cuda_bf16_support(device: torch.device) -> tuple[bool, str]:
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return True, f"CUDA compute capability {major}.{minor}"
    return False, f"CUDA compute capability {major}.{minor} is below 8.0, which bf16 needs natively"


def bf16_support(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        return cuda_bf16_support(device)
    if device.type == "cpu":
        return cpu_bf16_support()
    return False, f"no bf16 check for device type {device.type!r}"


def resolve_amp(amp: str, device: torch.device, *, strict: bool = False,
                say: Callable[[str], None] | None = None) -> str:
    """``"bf16"`` or ``"none"``: what a run with ``amp`` actually uses on ``device``.

    ``auto`` picks bf16 only where it is native. An explicit ``bf16`` where it is not native falls back
    to fp32 with one warning line, or, with ``strict``, fails saying why."""
    if amp not in AMP_MODES:
        raise UserError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "none" or (amp == "auto" and os.environ.get(FP32_ENV, "") not in ("", "0")):
        return "none"
    native, why = bf16_support(device)
    if native:
        return "bf16"
    if amp == "bf16":
        if strict:
            raise UserError(f"--amp bf16 with --amp-strict: {why}; bf16 would be emulated and much slower "
                            "than fp32 here (drop --amp-strict to fall back to fp32)")
        if say and why not in _warned:
            _warned.add(why)
            say(f"warning: --amp bf16 falls back to fp32: {why}")
    return "none"
