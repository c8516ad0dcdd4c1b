"""NVIDIA GPUs through NVML (the ``pynvml`` binding of nvidia-ml-py).

For now hive only asks whether NVML can be used at all, so that ``/v1/devices`` can say why
there are no GPUs; discovery, figures and placement on GPUs build on this.
"""

from __future__ import annotations


def nvml_error() -> str | None:
    """None when NVML initialises, else one line saying why not. Never raises."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        return f"pynvml is not installed: {exc}"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"NVML unavailable: {exc}"
    except OSError as exc:
        return f"NVML unavailable: {exc}"
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        return f"NVML unavailable: {exc}"
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        return "NVML reports no GPU on this host"
    return "GPU discovery is not enabled in this version of hive"
