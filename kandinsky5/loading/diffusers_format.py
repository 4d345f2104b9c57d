"""Reading checkpoints in the Diffusers layout.

A checkpoint is a folder with ``model_index.json`` and one subfolder per component. Our networks are built on
the ``meta`` device and receive the tensors by assignment, so the weights exist once in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kandinsky5.models.base import ModelBase, check_compute_dtype

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
CONFIG_FILE = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing something or does not fit the model."""


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"Missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def read_model_index(root: Path, accepted_classes: tuple[str, ...]) -> dict[str, Any]:
    """``model_index.json`` of ``root``, checked to describe one of ``accepted_classes``."""
    index = read_json(root / MODEL_INDEX)
    name = index.get("_class_name")
    if name not in accepted_classes:
        raise CheckpointError(
            f"{root / MODEL_INDEX} describes a {name!r} pipeline; this loader reads {', '.join(accepted_classes)}"
        )
    return index


def component_folder(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise CheckpointError(f"Checkpoint {root} has no {name!r} folder")
    return folder


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a component: one file, or the shards listed in its index."""
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index_path = folder / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        shards = sorted(set(read_json(index_path).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in {WEIGHTS_INDEX_NAME} are missing: {missing}")
        return [folder / s for s in shards]
    raise CheckpointError(f"{folder} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")


@contextmanager
def open_weights(path: Path, device: str | torch.device = "cpu") -> Iterator:
    """``safe_open`` of one weight file; a truncated or corrupt file is a ``CheckpointError`` naming it (the
    header is checked against the file's size when it is opened, before any tensor is read)."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            yield f
    except SafetensorError as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}): it may be truncated or corrupt; download it again"
        ) from err


def _check_keys(model: torch.nn.Module, names: dict[str, tuple[int, ...]], folder: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_preview(unexpected)}")
    mismatched = [
        f"{k}: checkpoint {names[k]} vs model {expected[k]}" for k in expected if k in names and names[k] != expected[k]
    ]
    if mismatched:
        problems.append(f"shape mismatch {_preview(mismatched)}")
    if problems:
        raise CheckpointError(f"{folder} does not fit {type(model).__name__}: " + "; ".join(problems))


def _preview(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} in all)"


def load_component(
    cls: type[ModelBase], folder: Path, torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> ModelBase:
    """Build ``cls`` from ``folder/config.json`` on ``meta`` and assign the checkpoint's tensors.

    With ``torch_dtype``, floating tensors are cast to it, except those of the model's float32 islands, and it is the
    model's compute dtype; without, the compute dtype is the one the checkpoint stores (see
    :func:`kandinsky5.models.base.stored_compute_dtype`).
    """
    if torch_dtype is not None:
        check_compute_dtype(torch_dtype)
    config = read_json(folder / CONFIG_FILE)
    with torch.device("meta"):
        model = cls.from_config(config)
    files = weight_files(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with open_weights(path) as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    _check_keys(model, shapes, folder)

    state: dict[str, torch.Tensor] = {}
    for path in files:
        with open_weights(path, device) as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if torch_dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(torch.float32 if cls.keeps_fp32(name) else torch_dtype)
                state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    if torch_dtype is not None:
        model.compute_dtype = torch_dtype
    return model.eval().requires_grad_(False)
