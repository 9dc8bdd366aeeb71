"""What a resumed run must keep: the checkpoint's model, optimizer, data, split and sample order.

A run resumed with another dataset, other classes, another validation split or another
seed would train on as if nothing had changed and mix two runs in one history (a seed
change re-splits the digits: most of the new validation images were training images).
`resume_changes` lists every such difference between a checkpoint and the run resuming
it, each naming its config field; `Trainer.resume` refuses them unless the field is
allowed on purpose (`--resume-changed FIELD`, or `allow_changes=` in Python).

What may change freely: epochs (the schedule follows the new length), batch size,
process count and accumulation (progress is kept in samples), learning rates,
augmentation, precision, logging. A dataset folder that moved (another `data.root` with
the same classes and image counts) is the same data and is allowed, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitblocks.train.config.names import is_timm_dataset
from vitblocks.train.config.recipe import migrated
from vitblocks.train.process.logs import listed

__all__ = ["ResumeChange", "data_identity", "refused_changes", "resume_changes"]

KEPT_FIELDS = {
    "model.name": "the checkpoint's weights are of that model",
    "data.num_classes": "the classifier has that many outputs",
    "optim.opt": "the optimizer state is of that optimizer",
    "data.img_size": "size-dependent weights (a position map) and their optimizer state have that size",
    "data.dataset": "the run trained on that data",
    "seed": "it fixes each epoch's sample order (and the digits' and synthetic data's validation split)",
}
"""Config fields a resumed run keeps, and why."""

SPLIT_FIELDS = {
    "digits": ("data.val_fraction",),
    "synthetic": ("data.synthetic_samples",),
}
"""Per dataset, the fields that decide which images are training and which validation images."""

TIMM_SPLIT_FIELDS = ("data.train_split", "data.val_split")


@dataclass(frozen=True)
class ResumeChange:
    """One way a resumed run differs from its checkpoint.

    Attributes:
        field: The config field, e.g. "seed" or "model.kwargs.embed_dims".
        says: What differs, for the message.
    """

    field: str
    says: str

    def allowed_by(self, allowed: set[str] | list[str] | tuple[str, ...]) -> bool:
        """Whether the user allowed this change (naming the field or a section above it).

        Args:
            allowed: Field names given with `--resume-changed`.

        Returns:
            True if `field` or one of its parents is among them.
        """
        return any(self.field == name or self.field.startswith(name + ".") for name in allowed)


def data_identity(classes: list[str], train_images: int | None, val_images: int | None) -> dict[str, Any]:
    """What a checkpoint records of its data, to recognise it on resume.

    Args:
        classes: Class names in label order.
        train_images: Images in the training split (None when unknown).
        val_images: Images in the validation split.

    Returns:
        A plain dict for the checkpoint.
    """
    return {"classes": list(classes), "train_images": train_images, "val_images": val_images}


def _lookup(config: dict[str, Any], path: str) -> Any:
    value: Any = config
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


_MISSING = object()


def _plain(value: Any) -> Any:
    """A value with tuples as lists, recursively: a list and a tuple of the same items are the same setting."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def resume_changes(saved: dict[str, Any], current: dict[str, Any], identity: dict[str, Any] | None = None
                   ) -> list[ResumeChange]:
    """Every difference between a checkpoint's run and the run resuming it that a resume must not hide.

    Args:
        saved: The checkpoint (its `config`, `classes` and `data` entries are read).
        current: The resuming run's config as plain data (`to_dict`).
        identity: The resuming run's `data_identity` (None: the data is not compared).

    Returns:
        The changes, one per field; empty when the run continues the checkpoint's.

    Examples:
        >>> saved = {"config": {"seed": 0, "model": {"name": "sret_t", "kwargs": {"embed_dims": [8, 16]}}}}
        >>> now = {"seed": 1, "model": {"name": "sret_t", "kwargs": {"embed_dims": (8, 16)}}}
        >>> print(*[change.field for change in resume_changes(saved, now)])
        seed
    """
    before = migrated(saved.get("config") or {})  # an earlier release's spelling of the same run is no change
    changes = []
    for path, why in KEPT_FIELDS.items():
        changes += _compare(before, current, path, why)
    changes += _kwargs_changes(before, current)
    dataset = _lookup(current, "data.dataset")
    if _lookup(before, "data.dataset") in (_MISSING, dataset):
        split_fields = SPLIT_FIELDS.get(dataset, TIMM_SPLIT_FIELDS if is_timm_dataset(str(dataset)) else ())
        for path in split_fields:
            changes += _compare(before, current, path, "it decides which images are training and which validation "
                                                       "images")
        if identity is not None:
            changes += _data_changes(saved, before, current, identity)
    return changes


def _compare(before: dict[str, Any], current: dict[str, Any], path: str, why: str) -> list[ResumeChange]:
    old, new = _lookup(before, path), _lookup(current, path)
    if old is _MISSING or _plain(old) == _plain(new):
        return []
    return [ResumeChange(path, f"{path}: {old!r} in the checkpoint, {new!r} now ({why})")]


def _kwargs_changes(before: dict[str, Any], current: dict[str, Any]) -> list[ResumeChange]:
    old, new = _lookup(before, "model.kwargs"), _lookup(current, "model.kwargs")
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    changes = []
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key, _MISSING), new.get(key, _MISSING)
        if was is not _MISSING and now is not _MISSING and _plain(was) == _plain(now):
            continue
        shown = [("not set" if value is _MISSING else repr(value)) for value in (was, now)]
        changes.append(ResumeChange(f"model.kwargs.{key}", f"model.kwargs.{key}: {shown[0]} in the checkpoint, "
                                                           f"{shown[1]} now (the weights were trained with it)"))
    return changes


def _data_changes(saved: dict[str, Any], before: dict[str, Any], current: dict[str, Any],
                  identity: dict[str, Any]) -> list[ResumeChange]:
    """Classes and image counts: other data behind the same settings, or a root that points elsewhere."""
    recorded = saved.get("data") or {}
    classes = recorded.get("classes", saved.get("classes"))
    old_root, new_root = _lookup(before, "data.root"), _lookup(current, "data.root")
    dataset = _lookup(current, "data.dataset")
    rooted = dataset == "imagefolder" or is_timm_dataset(str(dataset))
    field = "data.root" if rooted else "data.dataset"
    where = f"{new_root}" if rooted else f"data.dataset={dataset!r}"
    if classes is not None and set(classes) != set(identity["classes"]):
        gone, new = sorted(set(classes) - set(identity["classes"])), sorted(set(identity["classes"]) - set(classes))
        return [ResumeChange(field, f"{field}: the checkpoint's run trained on {len(classes)} classes "
                                    f"({listed(classes)}), {where} has {len(identity['classes'])} "
                                    f"({listed(identity['classes'])}); not in the checkpoint's: "
                                    f"{listed(new) or 'none'}; missing: {listed(gone) or 'none'}")]
    for split in ("train", "val") if rooted else ():  # generated data: its settings decide its images
        old, new = recorded.get(f"{split}_images"), identity.get(f"{split}_images")
        if old is not None and new is not None and old != new:
            return [ResumeChange(field, f"{field}: the checkpoint's run had {old} {split} images, {where} has {new}")]
    if recorded or not rooted or old_root is _MISSING or _plain(old_root) == _plain(new_root):
        return []  # the same classes and image counts (under another root: the data moved)
    return [ResumeChange(field, f"{field}: {old_root!r} in the checkpoint, {new_root!r} now (the checkpoint "
                                "predates recorded image counts, so the data cannot be compared)")]


def refused_changes(changes: list[ResumeChange], allowed: set[str] | list[str] | tuple[str, ...]) -> list[ResumeChange]:
    """The changes the user did not allow.

    Args:
        changes: From `resume_changes`.
        allowed: Fields given with `--resume-changed`.

    Returns:
        The changes none of `allowed` covers.
    """
    return [change for change in changes if not change.allowed_by(allowed)]
