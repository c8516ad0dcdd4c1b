"""A GPU worker for ``make gpu-check``: holds a given amount of VRAM and serves ``/health``.

It allocates ``--mib`` MiB on CUDA device 0 (the first GPU of its ``CUDA_VISIBLE_DEVICES``)
through the CUDA driver API (``libcuda.so.1``, by ctypes: no CUDA toolkit, no Python package),
writes to every byte of it so the driver really commits it, and then serves, on 127.0.0.1:
``GET /health``: ``{"uuid": <the UUID of the GPU it holds memory on>, "mib": N}``. It exits 0
on SIGTERM, releasing the memory with the process.

``--stand-in``: for the stand-in NVML (no GPU here): it allocates nothing, and names as its GPU
the first of its ``CUDA_VISIBLE_DEVICES``; the check plays the driver's part.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class CudaError(RuntimeError):
    pass


def _check(cuda: ctypes.CDLL, code: int, call: str) -> None:
    if code != 0:
        name = ctypes.c_char_p()
        cuda.cuGetErrorName(code, ctypes.byref(name))
        raise CudaError(f"{call} failed: {(name.value or b'?').decode()} ({code})")


def _uuid(raw: bytes) -> str:
    """16 bytes as NVML writes a GPU's UUID: ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx``."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def hold_vram(mib: int) -> tuple[str, ctypes.CDLL]:
    """Allocate and touch ``mib`` MiB on device 0; the UUID of that device, and the library
    (kept referenced: the memory lives as long as the process)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    _check(cuda, cuda.cuInit(0), "cuInit")
    device = ctypes.c_int()
    _check(cuda, cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    raw = (ctypes.c_ubyte * 16)()
    _check(cuda, cuda.cuDeviceGetUuid(raw, device), "cuDeviceGetUuid")
    context = ctypes.c_void_p()
    _check(cuda, cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuCtxRetain")
    _check(cuda, cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    if mib > 0:
        size = ctypes.c_size_t(mib << 20)
        pointer = ctypes.c_uint64()
        _check(cuda, cuda.cuMemAlloc_v2(ctypes.byref(pointer), size), "cuMemAlloc")
        _check(cuda, cuda.cuMemsetD8_v2(pointer, ctypes.c_ubyte(0xA5), size), "cuMemsetD8")
        _check(cuda, cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    return _uuid(bytes(raw)), cuda


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mib", type=int, default=256, help="VRAM to hold, in MiB")
    parser.add_argument("--stand-in", action="store_true", help="allocate nothing (no GPU)")
    args = parser.parse_args(argv)
    if args.stand_in:
        uuid = (os.environ.get("CUDA_VISIBLE_DEVICES") or "").split(",")[0]
        keep = None
    else:
        try:
            uuid, keep = hold_vram(args.mib)
        except (OSError, CudaError) as exc:
            print(f"vram_worker: {exc}", file=sys.stderr, flush=True)
            return 1
    body = json.dumps({"uuid": uuid, "mib": args.mib, "pid": os.getpid()}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = 200 if self.path == "/health" else 404
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"vram_worker: holding {args.mib} MiB on {uuid}, serving :{args.port}", flush=True)
    server.serve_forever()
    server.server_close()
    del keep
    return 0


if __name__ == "__main__":
    sys.exit(main())
