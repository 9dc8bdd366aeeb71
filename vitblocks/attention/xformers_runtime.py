"""Making xformers' CUDA kernels loadable under a torch built for another CUDA major version.

The xformers wheels on PyPI (0.0.35 and later) are built on PyTorch's stable ABI, so one
wheel serves many torch versions, but their `xformers/_C.so` links the CUDA 12 runtime
(`libcudart.so.12`). A torch built for CUDA 13 ships only `libcudart.so.13`: `_C.so`
then does not load, and every xformers call is refused with "xFormers wasn't build with
CUDA support". The `nvidia-cuda-runtime-cu12` wheel (part of `vitblocks[xformers]`)
provides the library; loading it process-wide before xformers is imported lets `_C.so`
resolve its CUDA symbols.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch

CUDA12_RUNTIME_PACKAGE = "nvidia-cuda-runtime-cu12"
"""The wheel that provides `libcudart.so.12`."""
_RUNTIME_MODULE = "nvidia.cuda_runtime"
_LIBRARY = "libcudart.so.12"

_loaded: list[str] = []


def cuda12_runtime_library() -> Path | None:
    """Where the `nvidia-cuda-runtime-cu12` wheel put `libcudart.so.12`.

    Returns:
        The library's path, or None if the wheel is not installed.
    """
    try:
        spec = importlib.util.find_spec(_RUNTIME_MODULE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    # another CUDA major's runtime wheel may hold the same package name earlier on the path
    folders += [str(Path(entry) / "nvidia" / "cuda_runtime") for entry in sys.path if entry]
    for folder in folders:
        candidate = Path(folder) / "lib" / _LIBRARY
        if candidate.is_file():
            return candidate
    return None


def torch_cuda_major() -> int | None:
    """The CUDA major version torch was built for.

    Returns:
        E.g. 13, or None for a build without CUDA.
    """
    return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None


def preload_cuda12_runtime(load: Callable[[str], object] | None = None) -> str | None:
    """Load `libcudart.so.12` process-wide if xformers will need it and torch does not provide it.

    Nothing happens for a torch built for CUDA 12 (it loads the library itself) or
    without CUDA (xformers cannot run there anyway), or when the runtime wheel is not
    installed. Safe to call more than once.

    Args:
        load: How to load a shared library (default: `ctypes.CDLL` with `RTLD_GLOBAL`).

    Returns:
        The path of the library loaded by this or an earlier call, or None.
    """
    if _loaded:
        return _loaded[0]
    major = torch_cuda_major()
    library = cuda12_runtime_library()
    if major is None or major == 12 or library is None:
        return None
    (load or _load_global)(str(library))
    _loaded.append(str(library))
    return _loaded[0]


def _load_global(path: str) -> object:
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def runtime_advice() -> str:
    """What to do when xformers' kernels do not load here.

    Returns:
        One sentence (install the CUDA 12 runtime, or where to look instead), or an
        empty string where the CUDA runtime cannot be the cause.
    """
    major = torch_cuda_major()
    if major is None or major == 12:
        return ""
    if cuda12_runtime_library() is None:
        return (f"xformers' _C.so links {_LIBRARY} and torch {torch.__version__} ships the CUDA {major} runtime only: "
                f"pip install {CUDA12_RUNTIME_PACKAGE} (included in vitblocks[xformers]); "
                "XFORMERS_MORE_DETAILS=1 shows the loader's own message")
    return ("the CUDA 12 runtime was loaded before xformers, so the cause is elsewhere; "
            "XFORMERS_MORE_DETAILS=1 python -m xformers.info shows why its kernels do not load")
