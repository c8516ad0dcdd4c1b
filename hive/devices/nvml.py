"""NVML's vocabulary for :mod:`hive.devices.gpu`: its return codes, named here so nothing
imports pynvml before it is needed, and the small helpers that turn its values and errors into
plain Python and one-line sentences."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

log = logging.getLogger("hive.devices.gpu")

# NVML return codes (pynvml's NVML_ERROR_*).
NOT_SUPPORTED = 3
DRIVER_NOT_LOADED = 9
LIBRARY_NOT_FOUND = 12
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15
RESET_REQUIRED = 16
ARGUMENT_VERSION_MISMATCH = 25

#: Codes that mean "this figure does not exist here": the figure is None, the GPU is fine.
ABSENT = frozenset({NOT_SUPPORTED, FUNCTION_NOT_FOUND})
#: Codes that mean the GPU itself is gone, whichever call reports them.
FATAL = frozenset({GPU_IS_LOST, RESET_REQUIRED})


def decode_cpu_mask(words: Iterable[int], bits: int = 64) -> tuple[int, ...]:
    """Core ids set in an NVML CPU mask (an array of 64-bit words, lowest cores first)."""
    return tuple(
        i * bits + bit for i, word in enumerate(words) for bit in range(bits) if word >> bit & 1
    )


def import_pynvml() -> ModuleType:
    import pynvml

    return pynvml


def plain(value: Any) -> Any:
    """Bytes (ctypes char arrays, older pynvml strings) as str; anything else as it is."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def describe(exc: BaseException) -> str:
    """One line for an exception (pynvml's str() may itself call into NVML)."""
    try:
        text = str(exc)
    except Exception:
        text = ""
    text = " ".join(text.split())
    return text or type(exc).__name__


def init_error(exc: BaseException) -> str:
    """Why NVML could not be initialised, in one line an operator can act on."""
    if isinstance(exc, ImportError):
        return f"NVML unavailable: pynvml is not installed ({describe(exc)})"
    code = getattr(exc, "value", None)
    if code == LIBRARY_NOT_FOUND or isinstance(exc, OSError):
        return "NVML unavailable: libnvidia-ml.so.1 not found (is the NVIDIA driver installed?)"
    if code == DRIVER_NOT_LOADED:
        return "NVML unavailable: the NVIDIA driver is not loaded"
    return f"NVML unavailable: {describe(exc)}"


def quietly(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception as exc:
        log.debug("NVML: %s", describe(exc))
