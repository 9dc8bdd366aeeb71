"""The docs build strictly, their examples run, and every public name is documented."""

import enum
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import timm

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def code_blocks(language):
    for page in PAGES:
        for block in re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S):
            yield pytest.param(block, id=f"{page.name}:{block.strip().splitlines()[0][:40]}")


@pytest.mark.slow  # runs every example, or builds the site
@pytest.mark.parametrize("code", list(code_blocks("python")))
def test_python_examples_run(code, tmp_path, monkeypatch):
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # examples run as if from the repository root
    monkeypatch.chdir(tmp_path)
    environment = os.environ.copy()
    try:
        exec(compile(code, "docs", "exec"), {"__name__": "__main__"})  # as a script runs it
    finally:  # an example may set environment variables for its own process
        os.environ.clear()
        os.environ.update(environment)


@pytest.mark.slow  # runs every example, or builds the site
@pytest.mark.parametrize("command", list(code_blocks("bash")))
def test_shell_examples_run(command):
    words = shlex.split(command.replace("\\\n", " "))
    assert words[0] == "python", "shell examples in the docs start with python"
    result = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow  # runs every example, or builds the site
def test_mkdocs_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "api" / "layers" / "index.html").is_file()
    assert "Recursive" in (tmp_path / "api" / "layers" / "index.html").read_text()
    assert "train.epochs" not in (tmp_path / "recipes" / "index.html").read_text()  # top-level keys have no prefix
    assert "optim.lr_per_512" in (tmp_path / "recipes" / "index.html").read_text()
    assert not list(tmp_path.rglob("*.py"))  # docs/hooks.py and docs/figures.py are not published
    examples = 0
    for page in (tmp_path / "api").rglob("index.html"):
        html = page.read_text()
        assert "<blockquote>" not in html and "::</p>" not in html, page  # doctests and RST literals as code
        sections = html.split('class="doc-section-title">Examples:</span></p>')[1:]
        assert all(section.lstrip().startswith('<div class="highlight"><pre><span></span><code>')
                   for section in sections), page
        examples += len(sections)
    in_source = sum(p.read_text().count("Examples:\n") for p in (ROOT / "vitblocks").rglob("*.py"))
    assert examples >= in_source > 40  # every docstring example is on a page, rendered as code


def documented_modules():
    for page in sorted((DOCS / "api").glob("*.md")):
        yield from re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M)


def test_every_package_module_has_an_api_page():
    documented = set(documented_modules())
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "vitblocks").rglob("*.py") if not p.name.startswith("_")
    }
    assert modules - documented == set()


def public_objects():
    for module_name in documented_modules():
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{module_name}.{name}", obj
                if inspect.isclass(obj):
                    for attr, member in vars(obj).items():
                        if inspect.isfunction(member) and not attr.startswith("_"):
                            yield f"{module_name}.{name}.{attr}", member


def missing_sections(obj):
    doc = inspect.getdoc(obj) or ""
    if not doc.strip():
        return ["docstring"]
    target = obj.__init__ if inspect.isclass(obj) else obj
    if inspect.isclass(obj) and (obj.__init__ is object.__init__ or getattr(obj, "__dataclass_fields__", None)):
        return [] if "Attributes:" in doc or not getattr(obj, "__dataclass_fields__", None) else ["Attributes"]
    if inspect.isclass(obj) and issubclass(obj, (tuple, BaseException, enum.Enum)):
        return []  # named tuples document Attributes; exceptions take a message; enum members are documented
    if inspect.isfunction(obj) and timm.is_model(obj.__name__):
        return []  # thin registered entry points, timm style: one line naming the variant
    params = [p for p in inspect.signature(target).parameters.values() if p.name not in ("self", "cls")]
    missing = []
    if params and "Args:" not in doc and not (inspect.isclass(obj) and "Args:" in (inspect.getdoc(obj.__init__) or "")):
        missing.append("Args")
    returns = inspect.signature(target).return_annotation
    if (not inspect.isclass(obj) and returns not in (None, "None", inspect.Signature.empty)
            and not re.search(r"Returns:|Yields:", doc)):
        missing.append("Returns")
    return missing


ONE_LINE_OK = {"forward", "extra_repr"}  # nn.Module protocol methods documented by their class


def test_every_public_name_has_a_docstring_with_args_and_returns():
    problems = []
    for qualname, obj in public_objects():
        short = qualname.rsplit(".", 1)[-1]
        if short in ONE_LINE_OK and inspect.getdoc(obj):
            continue
        missing = missing_sections(obj)
        if missing:
            problems.append(f"{qualname}: missing {', '.join(missing)}")
    assert not problems, "\n".join(problems)
