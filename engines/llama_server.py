"""Build llama.cpp's `llama-server` at a pinned version, once, and cache it outside the checkout.

The source is the llama.cpp that the `llama-cpp-python` sdist on PyPI vendors (`vendor/llama.cpp`),
so the build needs only the package index the rest of the suite already uses. The binary lands in
`${XDG_CACHE_HOME:-~/.cache}/hive/llama.cpp/<version>/bin/llama-server`; a second run reuses it.

    python engines/llama_server.py build   # build if missing; print the binary's path last
    python engines/llama_server.py path    # print where the binary is (or would be)

Not part of hive itself: the test suite's `make test` runs `build` first and hands the path to the
tests in `HIVE_LLAMA_SERVER`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# The newest 0.3.x that the index offered when this was pinned; its vendor/llama.cpp is the source.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    # A portable x86-64 binary: no -march=native, so it runs on other CPUs of this kind.
    "-DGGML_NATIVE=OFF",
    # No downloads, at build time or run time: no HTTPS (libssl), no prebuilt web UI fetched from
    # Hugging Face. (LLAMA_CURL is gone in this version; LLAMA_OPENSSL took its place.)
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DBUILD_SHARED_LIBS=OFF",
]
JOBS = os.environ.get("HIVE_LLAMA_BUILD_JOBS", "2")


def cache_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hive" / "llama.cpp" / version


def binary_path(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Where the cached `llama-server` is, whether or not it has been built yet."""
    return cache_dir(version) / "bin" / "llama-server"


def log(message: str) -> None:
    print(f"llama-server build: {message}", file=sys.stderr, flush=True)


def ensure_toolchain() -> None:
    """cmake and a C++ compiler; installed with apt-get where missing and allowed (root, Debian)."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if not missing:
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise SystemExit(f"llama-server build: missing {', '.join(missing)}; install cmake and g++")
    sudo: list[str] = [] if os.geteuid() == 0 else ["sudo"]
    if sudo and shutil.which("sudo") is None:
        raise SystemExit(f"llama-server build: missing {', '.join(missing)} and not root")
    log(f"installing cmake g++ (missing: {', '.join(missing)})")
    subprocess.run([*sudo, apt, "update", "-qq"], check=True)
    subprocess.run([*sudo, apt, "install", "-y", "-qq", "cmake", "g++"], check=True)


def fetch_source(version: str, work: Path) -> Path:
    """The sdist from the index, unpacked; returns its vendor/llama.cpp."""
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", str(work),
        ],
        check=True,
    )  # fmt: skip
    sdists = list(work.glob("llama_cpp_python-*.tar.gz"))
    if len(sdists) != 1:
        raise SystemExit(f"llama-server build: expected one sdist in {work}, found {sdists}")
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(work, filter="data")
    source = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        raise SystemExit(f"llama-server build: no vendored llama.cpp at {source}")
    return source


def build(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Build `llama-server` unless the cache has it; returns the binary's path."""
    target = binary_path(version)
    if os.access(target, os.X_OK):
        log(f"reusing cached {target} (llama-cpp-python {version})")
        return target
    ensure_toolchain()
    started = time.monotonic()
    cache = cache_dir(version)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-build-", dir=cache.parent) as tmp:
        work = Path(tmp)
        log(f"fetching llama-cpp-python {version} sdist")
        source = fetch_source(version, work)
        build_dir = work / "build"
        log(f"configuring {source}")
        subprocess.run(
            ["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        log(f"building llama-server with -j{JOBS} (the first build takes minutes)")
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", JOBS],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        built = build_dir / "bin" / "llama-server"
        # Install into a fresh directory, then rename: a killed build never leaves half a cache.
        staged = work / "staged"
        (staged / "bin").mkdir(parents=True)
        shutil.copy2(built, staged / "bin" / "llama-server")
        (staged / "VERSION").write_text(f"llama-cpp-python {version}\n{' '.join(CMAKE_FLAGS)}\n")
        if cache.exists():
            shutil.rmtree(cache)
        staged.rename(cache)
    log(f"built {target} in {time.monotonic() - started:.0f} s")
    return target


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "build"
    if command == "build":
        print(build())
    elif command == "path":
        print(binary_path())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
