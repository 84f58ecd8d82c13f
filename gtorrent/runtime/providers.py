"""Choosing the ONNX Runtime execution provider, quietly.

`onnxruntime-gpu` lists CUDA among its *available* providers even on machines without a GPU, and
asking for it there prints two error lines from ORT's C++ logger before it falls back to CPU. So CUDA
is requested only when `get_ep_devices()` reports a GPU device, and the session's real providers are
checked afterwards: the provider reported is the one that runs (shared/research/dependencies.md §1).
"""

from __future__ import annotations

from typing import Literal

import onnxruntime as ort

from ..errors import ProviderError

Device = Literal["auto", "cpu", "cuda"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def gpu_usable() -> bool:
    """True when ONNX Runtime sees a GPU it can run the CUDA provider on."""
    if CUDA not in ort.get_available_providers():
        return False
    get_devices = getattr(ort, "get_ep_devices", None)
    if get_devices is None:  # older ORT: no quiet probe, so do not guess
        return False
    try:
        devices = get_devices()
    except Exception:  # noqa: BLE001 - a failing probe means no usable GPU
        return False
    for device in devices:
        hardware = getattr(device, "device", None)
        kind = getattr(hardware, "type", None)
        if getattr(device, "ep_name", None) == CUDA or str(kind).endswith("GPU"):
            return True
    return False


def providers_for(device: Device) -> list[str]:
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if not gpu_usable():
            raise ProviderError("--device cuda was asked for, but ONNX Runtime finds no usable GPU")
        return [CUDA, CPU]
    return [CUDA, CPU] if gpu_usable() else [CPU]
