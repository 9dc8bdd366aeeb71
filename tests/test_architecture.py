"""The package's layering: which parts may import which, and no import cycles.

    io          (nothing from vitblocks)
    attention   <- io
    layers      <- attention
    models      <- layers, attention, io
    train, eval, summary, profiling   <- models and below
    deploy      <- eval, train and below (a run folder's model, data and preprocessing)
    export, predict                   <- deploy (the two deployment commands)
    vitblocks (the package root)       <- re-exports; imported by nothing inside

Inside `train/`, each room has one role and imports only the rooms below it:

    errors.py  <-  process/  <-  config/  <-  data/  <-  outputs/  <-  run/  <-  train/__init__, __main__

Every `import` statement counts, including those inside functions, except imports
under `if TYPE_CHECKING:` (annotations only).
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "vitblocks"

RANKS = {"io": 0, "attention": 1, "layers": 2, "models": 3, "train": 4, "eval": 4, "summary": 4, "profiling": 4,
         "deploy": 5, "export": 6, "predict": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or (
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, type_only_too: bool = False) -> set[str]:
    """vitblocks modules that a file imports (`from a.b import c` counts a.b, and a.b.c if it is a module);
    with `type_only_too`, also those imported under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skipped = set() if type_only_too else {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                                           and _type_checking_only(node) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    own = module_name(path)
    return {name for name in found if name.split(".")[0] == "vitblocks" and name in MODULES and name != own}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imported_modules(path) for name, path in MODULES.items()}


def rank(module: str) -> int:
    parts = module.split(".")
    return RANKS[parts[1]] if len(parts) > 1 else 99


TRAIN_ROOMS = {"errors": 0, "process": 1, "config": 2, "data": 3, "outputs": 4, "run": 5}
"""The rooms of `vitblocks.train`, lowest first (docs/architecture.md, "The trainer by role")."""


def train_room(module: str) -> int | None:
    """The rank of a `vitblocks.train` module's room (the package's own modules rank above all), or None."""
    parts = module.split(".")
    if parts[:2] != ["vitblocks", "train"]:
        return None
    return TRAIN_ROOMS[parts[2]] if len(parts) > 2 and parts[2] in TRAIN_ROOMS else 99


def test_every_module_of_the_trainer_is_in_a_room():
    loose = [m for m in MODULES if train_room(m) == 99 and m not in ("vitblocks.train", "vitblocks.train.__main__")]
    assert not loose, f"modules of vitblocks.train outside its rooms ({', '.join(TRAIN_ROOMS)}): {loose}"
    assert {m.split(".")[2] for m in MODULES if train_room(m) not in (None, 99)} == set(TRAIN_ROOMS)


def test_the_trainers_rooms_import_one_way():
    """Type-only imports included: a room names nothing above it, even in annotations (no `TYPE_CHECKING` circles)."""
    graph = {name: imported_modules(path, type_only_too=True) for name, path in MODULES.items()}
    wrong = [f"{a} imports {b}" for a, targets in graph.items() if train_room(a) is not None for b in targets
             if train_room(b) is not None and train_room(b) > train_room(a)]
    assert not wrong, "imports against the trainer's rooms (see docs/architecture.md):\n" + "\n".join(wrong)


def private_reads_of_others(path: Path) -> list[str]:
    """Private attributes a module reads of objects that are not its own: `x._name` for x other than
    self / cls, and `self._name` in a class that neither sets nor defines `_name` (a mixin's read)."""
    tree = ast.parse(path.read_text())
    found = []
    for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        own = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        own |= {t.attr for n in ast.walk(cls) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Attribute)}
        own |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        own |= {e.value for n in cls.body if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name) and t.id == "__slots__" for e in ast.walk(n.value)
                if isinstance(e, ast.Constant)}
        found += [f"{path.name}:{n.lineno} self.{n.attr}" for n in ast.walk(cls) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id == "self" and n.attr.startswith("_")
                  and not n.attr.startswith("__") and n.attr not in own]
    found += [f"{path.name}:{n.lineno} {ast.unparse(n)}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
              and n.attr.startswith("_") and not n.attr.startswith("__")
              and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))
              and not ast.unparse(n.value).startswith(("torch", "super()"))]
    return found


def test_no_module_of_the_trainer_reads_another_objects_private_attributes():
    """The trainer holds its parts through their public names: no mixin reading `self._x` set elsewhere,
    no `trainer._x` from a callback or the checkpointer."""
    found = [read for name, path in MODULES.items() if train_room(name) is not None or name == "vitblocks.eval"
             for read in private_reads_of_others(path)]
    assert not found, "private attributes read from outside their class:\n" + "\n".join(found)
    assert private_reads_of_others(Path(__file__).parent / "fixtures" / "mixin_example.py") == [
        "mixin_example.py:5 self._offset", "mixin_example.py:9 trainer._stop"]


def test_every_part_of_the_package_has_a_layer():
    assert {name.split(".")[1] for name in MODULES if "." in name} == set(RANKS)


def test_imports_flow_one_way():
    wrong = [f"{a} imports {b}" for a, targets in GRAPH.items() for b in targets
             if rank(b) > rank(a) or (b == "vitblocks" and a != "vitblocks")]
    assert not wrong, "imports against the layering (see docs/architecture.md):\n" + "\n".join(wrong)
    assert GRAPH["vitblocks.io"] == set()


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles (a submodule importing its package's __init__ counts):\n" + "\n".join(cycles)


@pytest.mark.slow  # starts processes
def test_attention_and_layers_import_without_models_or_timm_registrations():
    """Loaded under a bare `vitblocks` namespace, the layers build and run with no model registered."""
    code = f"""
import sys, types
package = types.ModuleType("vitblocks"); package.__path__ = [{str(PACKAGE)!r}]
sys.modules["vitblocks"] = package
import torch, timm
from vitblocks.layers import Recursive, TransformerBlock
from vitblocks.attention import group_attention
block = Recursive(TransformerBlock(dim=16, num_heads=2, groups=(2, 1)), loops=2)
assert block(torch.randn(1, 8, 16)).shape == (1, 8, 16)
loaded = sorted(m for m in sys.modules if m.startswith("vitblocks."))
assert not [m for m in loaded if m.startswith(("vitblocks.models", "vitblocks.train"))], loaded
assert not timm.is_model("sret_t")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


TRAIN_EXTRA = ("sklearn", "matplotlib", "tqdm")


def test_core_dependencies_are_those_of_the_layers_and_models():
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    core = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert [line.strip().strip('",').split(">")[0] for line in core.strip().splitlines()] == [
        "torch", "timm", "einops", "safetensors"]
    train = pyproject.split("train = [", 1)[1].split("]", 1)[0]
    assert all(name in train for name in ("scikit-learn", "matplotlib", "tqdm"))


@pytest.mark.slow  # starts processes
def test_layers_and_models_work_without_the_train_extra_and_the_trainer_says_what_to_install():
    """With scikit-learn, matplotlib and tqdm unimportable, as after a plain `pip install vitblocks`."""
    code = f"""
import sys
for name in {TRAIN_EXTRA!r}:
    sys.modules[name] = None  # makes `import name` raise ImportError
import torch, timm, vitblocks
from vitblocks import Recursive, SlicedGroupAttention, TransformerBlock
model = timm.create_model("sret_t", img_size=64).eval()
assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
assert timm.create_model("deit_tiny_rec_sliced_patch16_224") is not None
from vitblocks.train.data.datasets import _digits
from vitblocks.train.config.schema import DataConfig
try:
    _digits(DataConfig(dataset="digits"), train=True, seed=0)
except ImportError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("sklearn is not installed" in result.stdout
            and "pip install 'vitblocks[train]'" in result.stdout), result.stdout
