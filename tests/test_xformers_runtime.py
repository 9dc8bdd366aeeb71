"""Loading the CUDA 12 runtime before xformers, where torch is built for another CUDA version."""

import ctypes
import sys

import pytest
import torch

from vitblocks.attention import xformers_runtime as runtime


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(runtime, "_loaded", [])
    return monkeypatch


@pytest.fixture
def runtime_wheel(tmp_path, fresh):
    """A stand-in for the nvidia-cuda-runtime-cu12 wheel: nvidia/cuda_runtime/lib/libcudart.so.12."""
    lib = tmp_path / "nvidia" / "cuda_runtime" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcudart.so.12").write_bytes(b"")
    fresh.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "nvidia" or m.startswith("nvidia.")]:
        fresh.delitem(sys.modules, name)
    return lib / "libcudart.so.12"


def test_the_runtime_is_loaded_globally_under_a_cuda13_torch(runtime_wheel, fresh):
    fresh.setattr(torch.version, "cuda", "13.0")
    calls = []
    assert runtime.preload_cuda12_runtime(load=calls.append) == str(runtime_wheel)
    assert calls == [str(runtime_wheel)]
    assert runtime.preload_cuda12_runtime(load=calls.append) == str(runtime_wheel) and len(calls) == 1  # once
    assert "cause is elsewhere" in runtime.runtime_advice()


def test_the_default_loader_makes_the_symbols_global(runtime_wheel, fresh):
    fresh.setattr(torch.version, "cuda", "13.0")
    seen = {}
    fresh.setattr(ctypes, "CDLL", lambda path, mode: seen.update(path=path, mode=mode))
    runtime.preload_cuda12_runtime()
    assert seen == {"path": str(runtime_wheel), "mode": ctypes.RTLD_GLOBAL}


@pytest.mark.parametrize("cuda", ["12.8", None])
def test_nothing_is_loaded_where_torch_provides_the_runtime_or_has_no_cuda(runtime_wheel, fresh, cuda):
    fresh.setattr(torch.version, "cuda", cuda)
    calls = []
    assert runtime.preload_cuda12_runtime(load=calls.append) is None and calls == []
    assert runtime.runtime_advice() == ""


def test_without_the_wheel_the_advice_says_what_to_install(fresh):
    fresh.setattr(torch.version, "cuda", "13.0")
    fresh.setattr(runtime, "cuda12_runtime_library", lambda: None)
    calls = []
    assert runtime.preload_cuda12_runtime(load=calls.append) is None and calls == []
    advice = runtime.runtime_advice()
    assert "libcudart.so.12" in advice and "pip install nvidia-cuda-runtime-cu12" in advice
    assert "XFORMERS_MORE_DETAILS=1" in advice


def test_a_kernel_that_does_not_load_on_cuda_is_refused_with_that_advice(fresh):
    from vitblocks.attention import backends

    class Ops:
        @staticmethod
        def memory_efficient_attention(*args, **kwargs):
            raise NotImplementedError("xFormers wasn't build with CUDA support")

    fresh.setattr(torch.version, "cuda", "13.0")
    fresh.setattr(runtime, "cuda12_runtime_library", lambda: None)
    fresh.setattr(backends, "_import_xformers_ops", lambda: Ops)
    fresh.setattr(backends, "_XFORMERS_PROBES", {})
    fresh.setattr(torch, "randn", lambda *a, **k: torch.zeros(1, 8, 1, 8))  # no CUDA tensor needed for the probe
    problem = backends.xformers_kernel_problem("cuda:0", torch.bfloat16, 8)
    assert "xFormers wasn't build with CUDA support" in problem
    assert "pip install nvidia-cuda-runtime-cu12" in problem


@pytest.mark.slow  # starts a process
def test_xformers_extension_loads_once_the_runtime_is_preloaded():
    """For real, where xformers and the runtime wheel are installed and torch is not built for CUDA 12."""
    import importlib.util
    import subprocess

    spec = importlib.util.find_spec("xformers")
    if spec is None or runtime.torch_cuda_major() in (None, 12) or runtime.cuda12_runtime_library() is None:
        pytest.skip("needs xformers, the nvidia-cuda-runtime-cu12 wheel and a torch built for CUDA 13")
    extension = next(iter(spec.submodule_search_locations)) + "/_C.so"
    probe = ("import ctypes, sys, torch\n"
             "from vitblocks.attention.xformers_runtime import preload_cuda12_runtime\n"
             "if sys.argv[1] == 'preload': preload_cuda12_runtime()\n"
             f"ctypes.CDLL({extension!r})\n")
    runs = {mode: subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True)
            for mode in ("plain", "preload")}
    assert runs["preload"].returncode == 0, runs["preload"].stderr
    # without the preload it loads only where something else put libcudart.so.12 in the process
    # (torch's own loader does for a wheel in site-packages; not for one on PYTHONPATH)
    assert runs["plain"].returncode == 0 or "libcudart.so.12" in runs["plain"].stderr
