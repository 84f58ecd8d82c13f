"""Checks of the installation itself, cheap enough to run at every start-up.

This module must not import onnxruntime: relays and trackers never load the model runtime.
"""

from __future__ import annotations

from importlib import metadata

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")

DUAL_INSTALL_WARNING = (
    "both onnxruntime and onnxruntime-gpu are installed; they overwrite each other and the GPU build "
    "may be silently disabled"
)
DUAL_INSTALL_HINT = (
    "pip uninstall -y onnxruntime onnxruntime-gpu && pip install --force-reinstall --no-deps onnxruntime-gpu "
    "(or onnxruntime where there is no GPU build)"
)


def installed_ort_builds() -> list[str]:
    """The ONNX Runtime distributions installed in this environment."""
    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def both_ort_builds_installed() -> bool:
    return len(installed_ort_builds()) == len(ORT_DISTRIBUTIONS)
