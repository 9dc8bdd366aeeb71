"""mkdocs hooks: draw the figures and render the config reference from the code."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from pathlib import Path

DOCS = Path(__file__).parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def attribute_docs(cls: type) -> dict[str, str]:
    """The `Attributes:` entries of a Google-style class docstring."""
    doc = cls.__doc__ or ""
    block = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        match = re.match(r"\s{8}(\w+):\s*(.*)", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2)
        elif current and line.strip():
            entries[current] += " " + line.strip()
    return entries


def config_reference() -> str:
    """Markdown tables of every TrainConfig field: path, type, default, meaning."""
    from vitblocks.train.config.schema import TrainConfig

    sections = []
    top_rows = []
    hints = typing.get_type_hints(TrainConfig)
    docs = attribute_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(TrainConfig(), f.name)
        if dataclasses.is_dataclass(value):
            cls = type(value)
            sub_hints, sub_docs = typing.get_type_hints(cls), attribute_docs(cls)
            rows = [f"| `{f.name}.{s.name}` | `{_type(sub_hints[s.name])}` | `{getattr(value, s.name)!r}` | "
                    f"{sub_docs.get(s.name, '')} |" for s in dataclasses.fields(cls)]
            sections.append(f"### `{f.name}` — {cls.__name__}\n\n"
                            "| key | type | default | meaning |\n|---|---|---|---|\n"
                            + "\n".join(rows))
        else:
            top_rows.append(f"| `{f.name}` | `{_type(hints[f.name])}` | `{value!r}` | {docs.get(f.name, '')} |")
    top = "### Top level\n\n| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(top_rows)
    return "\n\n".join([top, *sections])


def _type(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def on_pre_build(config, **kwargs) -> None:
    _load("figures").generate(DOCS / "figures")


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    return markdown.replace("<!-- config-reference -->", config_reference())
