"""Reading checkpoints in the Diffusers layout.

A checkpoint is a folder with ``model_index.json`` and one subfolder per component. Our networks are built on
the ``meta`` device and receive the tensors by assignment, so the weights exist once in memory.

Weight files are memory-mapped, not read (:func:`map_safetensors`): a tensor stored in the dtype the model keeps
it in is a view of a private, copy-on-write mapping of the file. Its pages are the page cache's (shared with
other processes mapping the same file; the OS reads them on first use and may drop them again), writing to the
tensor copies the page it writes and never changes the file, and the mapping lives as long as a tensor viewing it
(``torch.frombuffer`` holds the ``mmap`` object; the file object itself is closed at once). A tensor whose data
does not start at a multiple of its element size, or on a big-endian machine, is copied instead. A tensor that
must be cast (``torch_dtype``) is cast one at a time from the mapping: no tensor is ever held twice beyond the one
being cast, and the network never twice. Moving the model to a GPU afterwards reads each mapped page once.

A mapped weight file must not be modified in place while a model loaded from it lives (truncating it makes the
next access to a lost page a SIGBUS). Replacing it by a rename, as the Hugging Face Hub's downloads and our own
writers (:mod:`kandinsky5.io.atomic`) do, is safe: the mapping keeps the old file's data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import mmap
import os
import sys
from collections.abc import Callable, Iterator
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

# safetensors' dtype names -> torch dtypes (those of the format that torch has as whole-byte element types)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    **({"F8_E8M0": torch.float8_e8m0fnu} if hasattr(torch, "float8_e8m0fnu") else {}),
}
# A safetensors file: an 8-byte little-endian header length N, N bytes of JSON, then the tensors' data.
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
METADATA_KEY = "__metadata__"
# safetensors stores little-endian data: mapped as it is only on a little-endian machine.
MAPPABLE_BYTE_ORDER = sys.byteorder == "little"
# Whether the pages of a tensor that was cast (or copied) at loading are given back once it has been: madvise's
# MADV_DONTNEED (Linux), which on a private file mapping that nothing wrote to only unmaps them (the file's data
# stays in the page cache; elsewhere its semantics differ, so the pages are left for the OS to reclaim).
RELEASE_PAGES = sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")


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


def _unreadable(path: Path, reason: Any) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable safetensors file ({reason}): it may be truncated or corrupt; download it again"
    )


@contextmanager
def open_weights(path: Path, device: str | torch.device = "cpu") -> Iterator:
    """``safe_open`` of one weight file; a truncated or corrupt file is a ``CheckpointError`` naming it (the
    header is checked against the file's size when it is opened, before any tensor is read)."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            yield f
    except SafetensorError as err:
        raise _unreadable(path, err) from err


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, as its header describes it; ``start`` and ``end`` are offsets in the file
    (the header's ``data_offsets`` plus the data section's start)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of the safetensors file ``path`` by name, in the header's order, from its header alone.

    The header is checked as safetensors checks it, against the file's size, before any tensor is read: a
    truncated or corrupt file (or a dtype torch has no element type for) is a ``CheckpointError`` naming it.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(HEADER_LENGTH_BYTES)
            if len(prefix) < HEADER_LENGTH_BYTES:
                raise _unreadable(path, f"{size} bytes, shorter than the header length")
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + length > size:
                raise _unreadable(path, f"header of {length} bytes in a file of {size}")
            raw = f.read(length)
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unreadable(path, f"header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise _unreadable(path, "header is not a JSON object")
    data_start = HEADER_LENGTH_BYTES + length
    entries: dict[str, StoredTensor] = {}
    for name, info in header.items():
        if name != METADATA_KEY:
            entries[name] = _stored_tensor(path, name, info, data_start)
    # the data section is covered exactly: each tensor starts where the previous one ends, with no gap or overlap
    end = data_start
    for name, entry in sorted(entries.items(), key=lambda item: item[1].start):
        if entry.start != end:
            raise _unreadable(path, f"invalid offsets for tensor {name!r}")
        end = entry.end
    if end != size:
        raise _unreadable(path, f"the tensors' data ends at byte {end} of a file of {size}")
    return entries


def _stored_tensor(path: Path, name: str, info: Any, data_start: int) -> StoredTensor:
    try:
        dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError) as err:
        raise _unreadable(path, f"bad header entry for tensor {name!r}") from err
    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype_name!r}, which torch cannot hold")
    if any(d < 0 for d in shape) or not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
        raise _unreadable(path, f"invalid shape or offsets for tensor {name!r}")
    return StoredTensor(dtype, shape, data_start + begin, data_start + end)


def _map_file(path: Path) -> mmap.mmap:
    """A private copy-on-write mapping of the whole file (writable pages, never written back)."""
    extra = {"trackfd": False} if sys.version_info >= (3, 13) else {}  # no duplicated descriptor held
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY, **extra)


def map_safetensors(
    path: Path,
    entries: dict[str, StoredTensor] | None = None,
    convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor of the safetensors file ``path``, in the header's order, each a view of one
    copy-on-write memory map of the file (see the module's doc); a tensor whose data is not aligned to its element
    size, an empty one, or any tensor on a big-endian machine, is copied instead. ``entries``: the file's
    :func:`read_safetensors_header`, when already read.

    ``convert(name, view)`` (a cast, a move to another device) turns each tensor into the one yielded, one tensor at
    a time. When it returns a tensor of its own (not a view of the mapping), the pages that held only that tensor
    are given back (``RELEASE_PAGES``): they stay in the page cache but no longer count in this process's memory.
    ``convert`` must not keep the view it is given.
    """
    path = Path(path)
    entries = read_safetensors_header(path) if entries is None else entries
    if not MAPPABLE_BYTE_ORDER:
        with open_weights(path) as f:
            for name in entries:
                tensor = f.get_tensor(name)
                yield name, tensor if convert is None else convert(name, tensor)
        return
    mapping = _map_file(path) if any(entry.nbytes for entry in entries.values()) else None
    for name, entry in entries.items():
        mapped = False
        if entry.nbytes == 0:
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
        elif entry.start % entry.dtype.itemsize == 0:
            count = entry.nbytes // entry.dtype.itemsize
            tensor = torch.frombuffer(mapping, dtype=entry.dtype, count=count, offset=entry.start).view(entry.shape)
            mapped = True
        else:
            raw = torch.frombuffer(mapping, dtype=torch.uint8, count=entry.nbytes, offset=entry.start)
            tensor = raw.clone().view(entry.dtype).view(entry.shape)
            _release_pages(mapping, entry)
        if convert is not None:
            view, tensor = tensor, convert(name, tensor)
            if mapped and not _shares_memory(tensor, view):
                del view
                _release_pages(mapping, entry)
        yield name, tensor


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _release_pages(mapping: mmap.mmap, entry: StoredTensor) -> None:
    """Drop this process's pages of the mapping that lie wholly inside ``entry``'s bytes (pages shared with another
    tensor stay). Nothing has written to them, so a later access would read the file again."""
    if not RELEASE_PAGES:
        return
    start = -(-entry.start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = entry.end // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """The bytes of a component's weights as stored (the sum of its tensors' sizes in the safetensors headers of
    :func:`weight_files`; headers excluded), read without reading any tensor. A ``torch_dtype`` that casts at
    loading changes what they take in memory (float32 -> bfloat16 halves it; float32 islands excepted)."""
    return sum(entry.nbytes for path in weight_files(Path(folder)) for entry in read_safetensors_header(path).values())


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
    headers = {path: read_safetensors_header(path) for path in weight_files(folder)}
    shapes = {name: entry.shape for entries in headers.values() for name, entry in entries.items()}
    _check_keys(model, shapes, folder)

    # Mapped, not read (see the module's doc): a tensor kept in its stored dtype on the CPU stays a view of the
    # file's mapping; one cast (or moved) is converted alone, from the mapping.
    def convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
        dtype = None
        if torch_dtype is not None and tensor.is_floating_point():
            dtype = torch.float32 if cls.keeps_fp32(name) else torch_dtype
        return tensor.to(device=device, dtype=dtype)

    state: dict[str, torch.Tensor] = {}
    for path, entries in headers.items():
        state.update(map_safetensors(path, entries, convert))
    model.load_state_dict(state, strict=True, assign=True)
    if torch_dtype is not None:
        model.compute_dtype = torch_dtype
    return model.eval().requires_grad_(False)
