"""Dispatch between the Triton kernels and the pure-PyTorch references.

Rules (the kernels' contract):
- CUDA tensors run the Triton kernels.
- CPU tensors run the PyTorch reference, unless the environment has
  ``TRITON_INTERPRET=1``, in which case they run the Triton kernels through
  Triton's interpreter (how CI checks the kernels without a GPU).
- ``TRITONRLHF_KERNELS=reference`` overrides both: every op runs its PyTorch reference, on any
  device (the GPU check's baseline row for the in-engine speed-up of the kernels). ``auto`` (or
  unset) is the rule above; any other value is an error, so a typo never benchmarks the wrong path.

``LAUNCHES`` counts Triton launches per kernel name so tests can prove that a
kernel really ran rather than the fallback.
"""

from __future__ import annotations

import collections
import os

import torch

LAUNCHES: collections.Counter[str] = collections.Counter()


def interpret_mode() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


KERNELS_ENV = "TRITONRLHF_KERNELS"


def forced_reference() -> bool:
    """True when ``TRITONRLHF_KERNELS=reference`` sends every op to its PyTorch reference."""
    mode = os.environ.get(KERNELS_ENV, "auto") or "auto"
    if mode not in ("auto", "reference"):
        raise ValueError(f"{KERNELS_ENV}={mode!r}: expected 'auto' (Triton where it runs) or 'reference'")
    return mode == "reference"


def use_triton(t: torch.Tensor) -> bool:
    """Whether ops on ``t`` go through the Triton kernels."""
    if forced_reference():
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpret_mode()


def record_launch(name: str) -> None:
    """Count one Triton launch of kernel ``name`` (host-side, no sync)."""
    LAUNCHES[name] += 1


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError naming the arguments if tensors are on different devices."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {desc}")


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise TypeError unless ``t`` is fp32, bf16 or fp16 (or fp64, for references)."""
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"{name} must be a floating tensor (fp32/bf16/fp16), got {t.dtype}")


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ValueError naming the arguments and their shapes if shapes differ."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{n}{list(s)}" for n, s in shapes.items())
        raise ValueError(f"shape mismatch: {desc}")
