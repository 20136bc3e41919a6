"""Device and dtype, resolved in one place for the trainer, the CLI, the check command and the benchmarks.

``--device auto`` is the GPU where there is one, else the CPU; under torchrun (``LOCAL_RANK`` set)
``cuda`` means ``cuda:LOCAL_RANK``, one GPU per rank. ``--dtype auto`` is bfloat16 where the
device multiplies it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX) and float32
elsewhere, where emulated bfloat16 is slower than float32. bfloat16 means autocast: the matmuls
run in bfloat16 on float32 master weights.
"""

import contextlib
import os
import platform

import torch

DTYPES = ("auto", "float32", "bfloat16")
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """The device ``--device name`` means on this process (see the module docstring)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ and "RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def check_device(device: torch.device, flag: str = "--device") -> None:
    """One line, raised as ValueError, for a device this machine does not have
    (moving a model there would fail with a traceback)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(
                f"{flag} {device}: no CUDA device is available here (or this torch was built without CUDA); "
                f"use {flag} cpu"
            )
        if (device.index or 0) >= count:
            raise ValueError(
                f"{flag} {device}: this machine has cuda:0 to cuda:{count - 1}; pick one of those or {flag} cpu"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: MPS is not available on this machine; use {flag} cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype the matmuls run in; ``auto``: bfloat16 where ``device`` multiplies it natively, else float32."""
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if native_bf16(device) else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """The context the forward passes run in: autocast to bfloat16, or nothing for float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()


def native_bf16(device: torch.device) -> bool:
    """A CUDA device with bf16 arithmetic, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return False


def cpu_flags() -> set[str]:
    """The CPU's feature flags, from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def describe(device: torch.device) -> str:
    """The device in words, for reports: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or device.type
