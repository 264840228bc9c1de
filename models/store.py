"""Saving model folders into the BentoML model store, all or nothing."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402

from models.runtime import read_info  # noqa: E402


@dataclass
class ModelSpec:
    """A model folder to store under `name`, with its labels and metadata."""

    name: str
    folder: Path
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def storable(value: Any) -> Any:
    """`value` without None entries: BentoML metadata takes only basic types, and None is not one."""
    if isinstance(value, dict):
        return {k: storable(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value if v is not None]
    return value


def save_all(specs: list[ModelSpec]) -> list[str]:
    """Store every model or, if any step fails, none: those already saved are deleted again."""
    saved: list[str] = []
    try:
        for spec in specs:
            info = read_info(spec.folder)
            metadata = storable({**info, **spec.metadata})
            labels = {"runtime": info["runtime"], **spec.labels}
            with bentoml.models.create(spec.name, labels=labels, metadata=metadata) as model:
                shutil.copytree(spec.folder, model.path, dirs_exist_ok=True)
            saved.append(str(model.tag))
    except BaseException:
        for tag in saved:
            bentoml.models.delete(tag)
        raise
    return saved


def exists(tag: str) -> bool:
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        return False
    return True


def resolve(tag: str) -> str:
    """The full `name:version` tag of `tag` (which may say `latest`)."""
    return str(bentoml.models.get(tag).tag)


def path_of(tag: str) -> Path:
    return Path(bentoml.models.get(tag).path)


def metadata_of(tag: str) -> dict[str, Any]:
    return dict(bentoml.models.get(tag).info.metadata)
