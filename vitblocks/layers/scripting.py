"""TorchScript `script` is refused by the layers whose forward is Python control flow."""

from __future__ import annotations

SCRIPT_REFUSAL = (
    "{name} cannot be compiled by torch.jit.script (deprecated since torch 2.14): its forward picks blocks, "
    "loops and token permutations in Python. Export the model with torch.export (and AOTInductor for a .pt2 "
    "package), torch.onnx.export or torch.jit.trace instead; docs/deploy.md shows each."
)


class NotScriptable:
    """Mixin for modules that `torch.jit.script` refuses with one clear error.

    `torch.jit.script` calls `__prepare_scriptable__` on a module and each of its
    submodules before compiling anything, so a model holding one of these layers fails
    at once, naming the layer and the export paths that work (tracing-based: `torch.export`,
    AOTInductor, ONNX, `torch.jit.trace`).
    """

    def __prepare_scriptable__(self):  # noqa: D105 - the hook torch.jit.script calls
        raise RuntimeError(SCRIPT_REFUSAL.format(name=type(self).__name__))
