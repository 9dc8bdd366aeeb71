"""The GPU check's measurement stages, one per call, each appending JSON rows as it goes.

    python -m benchmarks.gpu_step attention OUT_DIR            # on a CUDA machine
    python -m benchmarks.gpu_step eager OUT_DIR --dry-run      # the same code on CPU, tiny sizes

Stages (`STAGES`): `attention` (every kernel at every sliced-attention shape of SReT-T,
SReT-S, the sliced DeiT and PiT, forward + backward, SReT-S's head size 42 also padded
to 48), `eager` (training steps of sret_t and deit_tiny with foreach / fused AdamW and
cudnn.benchmark off / on: step time, host time, kernels per step, GPU time), `pool`
(SReT-T's poolings, grouped against depthwise on repeated channels), `compiled-sret`
and `compiled-deit` (torch.compile and CUDA graphs: step time, loss and gradients against
eager at a fixed permutation, and whether random permutations differ between graph
replays), `inference` (batch 1024, autocast against bf16 weights, eager and compiled) and
`mfu` (SReT-S training against a bf16 matmul timed in the same process) and `dynamic`
(token routing against static recursion, training and inference). Every row goes
to `OUT_DIR/rows.jsonl` as soon as it is measured, so a stage stopped by its deadline
keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

import vitblocks  # noqa: F401  (registers the models)
from benchmarks.measure import time_interleaved
from benchmarks.run import _step_fn
from vitblocks.attention import available_backends, group_attention
from vitblocks.summary import summarize

STAGES = ("attention", "eager", "pool", "compiled-sret", "compiled-deit", "inference", "mfu", "dynamic")
DEIT = "deit_tiny_patch16_224"


class Rows:
    """Appends one JSON object per measurement to `rows.jsonl` and echoes it."""

    def __init__(self, out: Path, stage: str, device: torch.device) -> None:
        self.path = out / "rows.jsonl"
        self.stage = stage
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def add(self, **row: Any) -> None:
        row = {"stage": self.stage, "device": self.device_name, **row}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


class Setup:
    """Sizes of a real run or of a CPU dry run."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.img_size = 64 if dry_run else 224
        self.train_batch = 2 if dry_run else 256
        self.infer_batch = 2 if dry_run else 1024
        self.warmup, self.repeats = (1, 2) if dry_run else (3, 10)
        self.dtype = torch.bfloat16

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype)

    def images(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, self.img_size, self.img_size, device=self.device)

    def model(self, name: str, **kwargs: Any) -> torch.nn.Module:
        """A model with the same drop-path rate for every name (0.1, SReT's default)."""
        kwargs.setdefault("drop_path_rate", 0.1)
        return timm.create_model(name, img_size=self.img_size, **kwargs).to(self.device)

    def timed(self, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Median seconds per call of each function, timed in turns."""
        return {name: t.median for name, t in time_interleaved(fns, self.device, self.warmup, self.repeats).items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(step: Callable[[], object], setup: Setup, steps: int = 3) -> dict[str, float]:
    """Kernels and device time per step (profiler), and host time per step (no synchronisation)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    _sync(setup.device)
    host = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)
        _sync(setup.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(setup.device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"host_ms": 1e3 * sorted(host)[len(host) // 2], "kernels_per_step": len(kernels) / steps,
            "gpu_ms": sum(e.device_time for e in kernels) / 1e3 / steps}


def stage_eager(setup: Setup, rows: Rows) -> None:
    """sret_t and deit_tiny eager steps: foreach / fused AdamW, cudnn.benchmark off / on."""
    images = setup.images(setup.train_batch)
    for benchmark in (False,) if setup.dry_run else (False, True):
        torch.backends.cudnn.benchmark = benchmark
        fns, profiles = {}, {}
        for name in ("sret_t", "sret_t_unsliced", DEIT):
            for fused in (False, True) if name != "sret_t_unsliced" and not setup.dry_run else (True,):
                label = f"{name} {'fused' if fused else 'foreach'}"
                fns[label] = _step_fn(setup.model(name).train(), images, True, "bf16", fused)
                profiles[label] = profile_step(fns[label], setup, steps=1 if setup.dry_run else 3)
        for label, seconds in setup.timed(fns).items():
            rows.add(name=label, cudnn_benchmark=benchmark, img_s=setup.train_batch / seconds,
                     step_ms=1e3 * seconds, **profiles[label])
    torch.backends.cudnn.benchmark = False


def stage_pool(setup: Setup, rows: Rows) -> None:
    """SReT-T's two poolings, forward + backward: a grouped convolution against a depthwise one on
    repeated channels (`ConvPool(repeat_input=...)`), with kernels per call."""
    from vitblocks.layers import ConvPool

    side = setup.img_size // 8
    for in_dim, grid in ((64, side), (128, (side + 1) // 2)):
        x = torch.randn(setup.train_batch, in_dim, grid, grid, device=setup.device)
        x = x.contiguous(memory_format=torch.channels_last)
        fns = {}
        for repeat in (False, True):
            pool = ConvPool(in_dim, 2 * in_dim, repeat_input=repeat).to(setup.device)

            def call(pool=pool, x=x):
                inputs = x.detach().requires_grad_()
                with setup.autocast():
                    out = pool(inputs)
                out.float().sum().backward()
            fns[f"pool {in_dim}->{2 * in_dim} {'repeated + depthwise' if repeat else 'grouped'}"] = call
        profiles = {label: profile_step(fn, setup) for label, fn in fns.items()}
        for label, seconds in setup.timed(fns).items():
            rows.add(name=label, img_s=setup.train_batch / seconds, call_ms=1e3 * seconds, **profiles[label])


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def compare_with_eager(name: str, setup: Setup, compiled_fn: Callable[[torch.nn.Module], Callable]) -> dict[str, float]:
    """Loss and gradients of one compiled step against eager, at a fixed permutation and no drop path."""
    torch.manual_seed(0)
    eager = setup.model(name, drop_path_rate=0.0, **_fixed(name)).train()
    compiled = copy.deepcopy(eager)
    images = setup.images(min(setup.train_batch, 32))
    losses = []
    for model, run in ((eager, eager), (compiled, compiled_fn(compiled))):
        for _ in range(3):  # graphs record on the first calls and replay after
            model.zero_grad(set_to_none=True)
            with setup.autocast():
                loss = run(images).float().logsumexp(-1).mean()
            loss.backward()
        losses.append(loss.item())
    a, b = _grads(eager), _grads(compiled)
    return {"loss_eager": losses[0], "loss_compiled": losses[1],
            "grad_max_rel_diff": ((a - b).abs().max() / a.abs().max()).item()}


def _fixed(name: str) -> dict[str, str]:
    return {"permutation": "fixed"} if name.startswith("sret") or "sliced" in name else {}


def permutations_differ_between_replays(setup: Setup, compile_fn: Callable[[torch.nn.Module], Callable]) -> bool:
    """Whether a graphed sret_t draws new random permutations on each replay (its outputs then differ)."""
    torch.manual_seed(0)
    model = setup.model("sret_t", drop_path_rate=0.0).train()
    run = compile_fn(model)
    images = setup.images(2)
    outputs = []
    with torch.no_grad():
        for _ in range(4):
            with setup.autocast():
                outputs.append(run(images).float().clone())
    return not torch.equal(outputs[-1], outputs[-2])


def _compile_modes(setup: Setup, in_dry_run: bool = True) -> dict[str, Callable[[torch.nn.Module], Callable]]:
    if setup.dry_run:  # tracing only: checks the code path in seconds (or not at all where one stage does it)
        return {"torch.compile": lambda m: torch.compile(m, backend="eager")} if in_dry_run else {}
    return {"torch.compile": lambda m: torch.compile(m),
            "cuda graphs": lambda m: torch.compile(m, mode="reduce-overhead")}


def stage_compiled(name: str, setup: Setup, rows: Rows) -> None:
    """A model's step eager, compiled and under CUDA graphs (timed first: the targets need them), then
    the compiled steps' loss and gradients against eager, and whether graph replays redraw permutations."""
    images = setup.images(setup.train_batch)
    modes = _compile_modes(setup, in_dry_run=name == "sret_t")
    fns = {"eager": _step_fn(setup.model(name).train(), images, True, "bf16", fused=True)}
    for mode, compile_fn in modes.items() if not setup.dry_run else ():  # a dry run traces them below
        fns[mode] = _step_fn(compile_fn(setup.model(name).train()), images, True, "bf16", fused=True)
        fns[mode]()  # compile outside the timing
    profiles = {label: profile_step(fn, setup) for label, fn in fns.items()}
    for label, seconds in setup.timed(fns).items():
        rows.add(name=f"{name} {label}", img_s=setup.train_batch / seconds, step_ms=1e3 * seconds, **profiles[label])
    for mode, compile_fn in modes.items():
        rows.add(name=name, check=f"{mode} vs eager", **compare_with_eager(name, setup, compile_fn))
        if name == "sret_t":
            rows.add(name=name, check=f"{mode}: random permutations differ between calls",
                     differ=permutations_differ_between_replays(setup, compile_fn))


def stage_inference(setup: Setup, rows: Rows) -> None:
    """Inference at batch 1024: fp32 weights under autocast against bf16 weights, eager and compiled."""
    images = setup.images(setup.infer_batch)
    fns = {}
    for name in ("sret_t", DEIT):
        for weights in ("autocast", "bf16 weights"):
            model = setup.model(name).eval()
            if weights == "bf16 weights":
                model = model.to(setup.dtype)
            for mode in ("eager",) if setup.dry_run else ("eager", "compiled"):  # compiling is checked elsewhere
                run = model if mode == "eager" else torch.compile(model)
                batch = images.to(setup.dtype) if weights == "bf16 weights" else images

                def infer(run=run, batch=batch, weights=weights):
                    with torch.no_grad(), setup.autocast() if weights == "autocast" else contextlib.nullcontext():
                        return run(batch)
                infer()
                fns[f"{name} {weights} {mode}"] = infer
    for label, seconds in setup.timed(fns).items():
        rows.add(name=label, img_s=setup.infer_batch / seconds)


def stage_dynamic(setup: Setup, rows: Rows) -> None:
    """Token routing against static recursion: bf16 training steps and inference of SReT-T and of DeiT-Tiny made
    recursive (2 loops per block), static, expert-choice at capacity 0.5 and token-choice, timed in turns."""
    from vitblocks.models.plug import make_recursive

    def deit(routing: dict | None) -> torch.nn.Module:
        model = setup.model(DEIT)
        make_recursive(model, loops=2, routing=routing)
        return model.to(setup.device)

    routings = {"static": None, "expert 0.5": {"capacity": 0.5}, "token": {"mode": "token"}}
    builders = {"sret_t": lambda routing: setup.model("sret_t", groups=((8, 1), (4, 1), (1, 1)), routing=routing),
                "deit_tiny 2 loops": deit}
    for train in (True, False):
        batch = setup.train_batch if train else setup.infer_batch
        images = setup.images(batch)
        mode = "training" if train else "inference"
        fns = {f"{name} {kind} {mode}": _step_fn(build(routing).train(train), images, train, "bf16", fused=True)
               for name, build in builders.items() for kind, routing in routings.items()}
        for fn in fns.values():
            fn()
        for label, seconds in setup.timed(fns).items():
            rows.add(name=label, train=train, batch=batch, img_s=batch / seconds, step_ms=1e3 * seconds)


def stage_mfu(setup: Setup, rows: Rows) -> None:
    """SReT-S training model FLOP utilisation against a bf16 matmul timed in the same process."""
    n = 1024 if setup.dry_run else 8192
    a, b = (torch.randn(n, n, device=setup.device, dtype=setup.dtype) for _ in range(2))
    matmul = setup.timed({"matmul": lambda: a @ b})["matmul"]
    peak = 2 * n**3 / matmul
    macs = summarize(timm.create_model("sret_s", img_size=setup.img_size), setup.img_size)[-1].macs
    images = setup.images(setup.train_batch // (4 if not setup.dry_run else 1))
    fns = {"eager": _step_fn(setup.model("sret_s").train(), images, True, "bf16", fused=True)}
    for mode, compile_fn in _compile_modes(setup, in_dry_run=False).items():
        fns[mode] = _step_fn(compile_fn(setup.model("sret_s").train()), images, True, "bf16", fused=True)
        fns[mode]()
    for label, seconds in setup.timed(fns).items():
        flops = 6 * macs * images.shape[0] / seconds
        rows.add(name=f"sret_s {label}", img_s=images.shape[0] / seconds, matmul_tflops=peak / 1e12,
                 mfu_percent=100 * flops / peak)


def attention_shapes() -> list[tuple[str, int, int, int, int, int]]:
    """(model, tokens, groups, heads, head_dim, prefix) of every distinct sliced-attention call at 224 px."""
    shapes = []
    for model, heads, dims, schedules, side, prefix in (
            ("sret_t", (2, 4, 8), (32, 32, 32), ((8, 2), (4, 1), (1,)), 28, 0),
            ("sret_s", (3, 6, 12), (42, 42, 42), ((8, 2), (4, 1), (1,)), 28, 0),
            ("deit_tiny sliced", (3,), (64,), ((8, 2),), 14, 1),
            ("pit_ti sliced", (2, 4, 8), (32, 32, 32), ((8, 2), (4, 1), (1,)), 27, 1)):
        for _stage, (h, d, schedule) in enumerate(zip(heads, dims, schedules)):
            tokens = side * side
            for groups in dict.fromkeys(schedule):
                shapes.append((model, tokens, groups, h, d, prefix))
            side = (side + 1) // 2
    return shapes


def _sdpa_kernels() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def stage_attention(setup: Setup, rows: Rows) -> None:
    """Every attention kernel at every shape, forward + backward, in images per second."""
    batch = setup.train_batch
    for model, tokens, groups, heads, head_dim, prefix in attention_shapes():
        if setup.dry_run:
            tokens = min(tokens, 64)
        qkv = [torch.randn(batch, prefix + tokens, heads, head_dim, device=setup.device, dtype=setup.dtype)
               for _ in range(3)]
        grad = torch.randn_like(qkv[0])
        fns = {}
        for backend in available_backends(setup.device, setup.dtype, head_dim):
            fns[backend] = _attention_call(qkv, groups, prefix, backend, grad)
        for kernel, choice in _sdpa_kernels().items():
            fns[f"sdpa/{kernel}"] = _attention_call(qkv, groups, prefix, "sdpa", grad, choice)
        if head_dim % 8:
            padded = [torch.nn.functional.pad(t, (0, 8 - head_dim % 8)) for t in qkv]
            fns[f"sdpa padded to {padded[0].shape[-1]}"] = _attention_call(
                padded, groups, prefix, "sdpa", torch.nn.functional.pad(grad, (0, 8 - head_dim % 8)),
                scale=head_dim**-0.5)
        runnable = {}
        for label, fn in fns.items():
            try:
                fn()
                runnable[label] = fn
            except Exception as error:  # noqa: BLE001 - a kernel that refuses this shape is a result too
                rows.add(model=model, tokens=tokens, groups=groups, heads=heads, head_dim=head_dim, prefix=prefix,
                         kernel=label, unsupported=" ".join(str(error).split())[:300])
        for label, seconds in setup.timed(runnable).items():
            rows.add(model=model, tokens=tokens, groups=groups, heads=heads, head_dim=head_dim, prefix=prefix,
                     kernel=label, img_s=batch / seconds)


def _attention_call(qkv, groups, prefix, backend, grad, sdpa_choice=None, scale=None):
    def run():
        from torch.nn.attention import sdpa_kernel

        inputs = [t.detach().requires_grad_() for t in qkv]
        with sdpa_kernel(sdpa_choice) if sdpa_choice is not None else contextlib.nullcontext():
            out = group_attention(*inputs, groups, num_prefix_tokens=prefix, backend=backend, scale=scale)
            out.backward(grad)
    return run


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_step", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=(*STAGES, "all"), help="one stage, or all of them in turn (a dry run's way)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, tracing-only compile")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --dry-run to check the stage on CPU", file=sys.stderr)
        return 2
    setup = Setup(args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {"attention": stage_attention, "eager": stage_eager, "pool": stage_pool, "inference": stage_inference,
              "mfu": stage_mfu, "dynamic": stage_dynamic,
              "compiled-sret": lambda s, r: stage_compiled("sret_t", s, r),
              "compiled-deit": lambda s, r: stage_compiled(DEIT, s, r)}
    for name in STAGES if args.stage == "all" else (args.stage,):
        stages[name](setup, Rows(args.out, name, setup.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
