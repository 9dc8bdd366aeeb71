"""The registry of attention backends: where a new kernel plugs in.

    class MyBackend(AttentionBackend):
        name, priority, devices = "mine", 30, ("cuda",)
        def attend(self, q, k, v, scale, dropout_p): ...

    register_backend(MyBackend())

A registered backend is chosen by name everywhere a backend name is taken (layer and
model arguments, `attention_backend(...)`, `VITBLOCKS_ATTENTION`, the trainer's
`model.backend`), and `auto` tries it in priority order.
"""

from __future__ import annotations

from vitblocks.attention.backends import BUILTIN_BACKENDS, AttentionBackend

AUTO = "auto"
"""The name of the automatic choice (see `vitblocks.attention.dispatch.auto_order`)."""

BACKENDS: dict[str, AttentionBackend] = {}
"""Every registered backend by name, highest priority first (the order `auto` tries them)."""


def register_backend(backend: AttentionBackend, replace: bool = False) -> AttentionBackend:
    """Make a backend available by its name and to `auto`, in the order of its priority.

    Args:
        backend: The backend instance; its `name` must be new (or `replace=True`).
        replace: Replace a registered backend of the same name.

    Returns:
        `backend`, so that registering can be one expression.

    Raises:
        ValueError: For an empty or reserved name, or a name already registered.

    Examples:
        >>> from vitblocks.attention import BACKENDS, AttentionBackend, register_backend, unregister_backend
        >>> class Doubled(AttentionBackend):
        ...     name, priority = "doubled_math", -1
        ...     def attend(self, q, k, v, scale, dropout_p):
        ...         return BACKENDS["math"].attend(q, k, v, scale, dropout_p)
        >>> _ = register_backend(Doubled())
        >>> list(BACKENDS)[-1]
        'doubled_math'
        >>> unregister_backend("doubled_math")
    """
    if not backend.name or backend.name == AUTO:
        raise ValueError(f"a backend needs a name other than {AUTO!r}; got {backend.name!r}")
    if backend.name in BACKENDS and not replace:
        raise ValueError(f"an attention backend named {backend.name!r} is already registered; pass replace=True")
    BACKENDS[backend.name] = backend
    ordered = sorted(BACKENDS.values(), key=lambda b: -b.priority)  # stable: equal priorities keep their order
    BACKENDS.clear()
    BACKENDS.update((b.name, b) for b in ordered)
    return backend


def unregister_backend(name: str) -> None:
    """Remove a registered backend.

    Args:
        name: Its name.

    Raises:
        KeyError: If no backend has that name.
    """
    del BACKENDS[name]


def backend_names() -> tuple[str, ...]:
    """Every name a backend can be chosen by.

    Returns:
        "auto", then the registered backends, highest priority first.

    Examples:
        >>> backend_names()
        ('auto', 'sdpa', 'xformers', 'math')
    """
    return (AUTO, *BACKENDS)


for _builtin in BUILTIN_BACKENDS:
    register_backend(_builtin)
