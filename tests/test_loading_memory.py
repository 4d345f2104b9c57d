"""Loading maps weight files instead of reading them: the values are the file's, bit for bit; a tensor kept in its
stored dtype is a view of a copy-on-write mapping of the file (shared page cache, never written back); a cast one is
an ordinary tensor; a broken file is still a ``CheckpointError`` naming it."""

import gc
import json
import mmap
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kandinsky5.loading import diffusers_format
from kandinsky5.loading.diffusers_format import (
    CheckpointError,
    checkpoint_bytes,
    load_component,
    map_safetensors,
    read_safetensors_header,
    weight_files,
)
from kandinsky5.models.dit import Kandinsky5Transformer3DModel
from kandinsky5.models.vae import AutoencoderKLHunyuanVideo

WEIGHTS = "diffusion_pytorch_model.safetensors"
COMPONENTS = [("transformer", Kandinsky5Transformer3DModel), ("vae", AutoencoderKLHunyuanVideo)]
PROC_MAPS = Path("/proc/self/maps")
needs_proc_maps = pytest.mark.skipif(not PROC_MAPS.exists(), reason="reads /proc/self/maps (Linux)")


@pytest.fixture
def transformer_folder(reference_checkpoint, tmp_path):
    """A private copy of the tiny transformer (float32 tensors), so that no other test's model maps it."""
    folder = tmp_path / "transformer"
    shutil.copytree(reference_checkpoint[0] / "transformer", folder)
    return folder


def read_the_old_way(cls, folder, torch_dtype=None):
    """The loader before mapping: every tensor read whole with safetensors, then cast."""
    state = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if torch_dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(torch.float32 if cls.keeps_fp32(name) else torch_dtype)
                state[name] = tensor
    return state


def file_regions(path) -> list[tuple[int, int]]:
    """The address ranges of this process that map the file ``path``."""
    real = os.path.realpath(path)
    regions = []
    for line in PROC_MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            regions.append((start, end))
    return regions


def is_mapped(tensor: torch.Tensor, regions) -> bool:
    start = tensor.data_ptr()
    return any(low <= start and start + tensor.nbytes <= high for low, high in regions)


@pytest.mark.parametrize("torch_dtype", [None, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("component", "cls"), COMPONENTS)
def test_mapped_load_equals_reading_the_file(reference_checkpoint, component, cls, torch_dtype):
    folder = reference_checkpoint[0] / component
    expected = read_the_old_way(cls, folder, torch_dtype)
    model = load_component(cls, folder, torch_dtype)
    gc.collect()  # the mappings outlive every file object and the loader's own references
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name
    assert not any(p.requires_grad for p in model.parameters())


@needs_proc_maps
def test_uncast_tensors_are_views_of_the_file(transformer_folder):
    path = transformer_folder / WEIGHTS
    model = load_component(Kandinsky5Transformer3DModel, transformer_folder)
    regions = file_regions(path)
    assert regions, "the weight file is not mapped"
    assert all(is_mapped(p, regions) for p in model.parameters())
    del model
    gc.collect()
    assert file_regions(path) == []  # unmapped with the last tensor viewing it: the OS may drop the pages


@needs_proc_maps
def test_cast_tensors_are_not_views_of_the_file(transformer_folder):
    path = transformer_folder / WEIGHTS
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.float32}
    model = load_component(Kandinsky5Transformer3DModel, transformer_folder, torch.bfloat16)
    regions = file_regions(path)
    islands = {name: model.keeps_fp32(name) for name, _ in model.named_parameters()}
    assert any(islands.values()) and not all(islands.values())
    for name, param in model.named_parameters():
        # float32 islands stay float32: no cast, mapped; the rest is cast to bfloat16, a tensor of its own
        assert param.dtype == (torch.float32 if islands[name] else torch.bfloat16), name
        assert is_mapped(param, regions) == islands[name], name


def test_writing_a_loaded_weight_leaves_the_file_alone(transformer_folder):
    path = transformer_folder / WEIGHTS
    on_disk = path.read_bytes()
    model = load_component(Kandinsky5Transformer3DModel, transformer_folder)
    weight = model.visual_transformer_blocks[0].feed_forward.in_layer.weight
    before = weight.clone()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    assert torch.equal(weight, before + 1.0)
    assert path.read_bytes() == on_disk
    again = load_component(Kandinsky5Transformer3DModel, transformer_folder)
    assert torch.equal(again.visual_transformer_blocks[0].feed_forward.in_layer.weight, before)
    assert torch.equal(weight, before + 1.0)  # and the other model's private pages stay its own


def mapped_rss(path) -> int:
    """Bytes of this process's memory in its mappings of the file ``path`` (/proc/self/smaps' Rss)."""
    real, total, inside = os.path.realpath(path), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) == 6 and fields[5] == real
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@needs_proc_maps
@pytest.mark.skipif(not diffusers_format.RELEASE_PAGES, reason="pages are given back on Linux only")
def test_pages_of_cast_tensors_are_given_back(tmp_path):
    """A cast tensor's pages leave this process's memory once it is cast; a kept tensor's pages stay mapped."""
    megabyte = 1 << 20
    path = tmp_path / "two.safetensors"
    tensors = {"cast": torch.randn(megabyte // 4), "kept": torch.randn(megabyte // 4)}
    save_file(tensors, str(path))

    def convert(name, tensor):
        return tensor.to(torch.bfloat16) if name == "cast" else tensor

    loaded = dict(map_safetensors(path, convert=convert))
    assert torch.equal(loaded["cast"], tensors["cast"].to(torch.bfloat16))
    assert torch.equal(loaded["kept"], tensors["kept"])  # reads every page of it
    assert megabyte <= mapped_rss(path) <= megabyte + 4 * mmap.PAGESIZE  # the header's and boundary pages at most


def cut(data: bytes, where: str) -> bytes:
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    return {
        "length prefix": data[:5],
        "header": data[: header_end - 3],
        "data": data[: (header_end + len(data)) // 2],
        "last byte": data[:-1],
        "extra byte": data + b"\0",
        "empty": b"",
    }[where]


@pytest.mark.parametrize("where", ["length prefix", "header", "data", "last byte", "extra byte", "empty"])
def test_damaged_file_names_it(transformer_folder, where):
    path = transformer_folder / WEIGHTS
    path.write_bytes(cut(path.read_bytes(), where))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as raised:
        load_component(Kandinsky5Transformer3DModel, transformer_folder)
    assert str(path) in str(raised.value)


def write_raw_safetensors(path, tensors: dict[str, torch.Tensor], dtype_names: dict[str, str], pad: int) -> None:
    """A safetensors file written by hand, its header padded with ``pad`` spaces (safetensors pads to 8 bytes)."""
    header, offset, blobs = {}, 0, []
    for name, tensor in tensors.items():
        blob = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": dtype_names[name],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


@needs_proc_maps
def test_misaligned_tensors_are_copied(tmp_path):
    path = tmp_path / "odd.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float64), "b": torch.arange(5, dtype=torch.float32) / 3}
    for pad in range(8):  # pad the header until the data starts at an odd offset
        write_raw_safetensors(path, tensors, {"a": "F64", "b": "F32"}, pad)
        start = min(entry.start for entry in read_safetensors_header(path).values())
        if start % 2:
            break
    expected = load_file(str(path))  # safetensors reads such a file too
    mapped = dict(map_safetensors(path))
    regions = file_regions(path)
    for name, tensor in mapped.items():
        assert torch.equal(tensor, expected[name]), name
        assert tensor.data_ptr() % tensor.element_size() == 0, name
        assert not is_mapped(tensor, regions), name


def test_every_dtype_maps_to_its_torch_dtype(tmp_path):
    gen = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 4, generator=gen)
    tensors = {
        "f64": floats.double(),
        "f32": floats,
        "f16": floats.half(),
        "bf16": floats.bfloat16(),
        "f8_e4m3": floats.to(torch.float8_e4m3fn),
        "f8_e5m2": floats.to(torch.float8_e5m2),
        "i64": torch.arange(-6, 6).view(3, 4),
        "i32": torch.arange(12, dtype=torch.int32),
        "i16": torch.arange(12, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "dtypes.safetensors"
    save_file(tensors, str(path))
    mapped = dict(map_safetensors(path))
    assert mapped.keys() == tensors.keys()
    for name, tensor in tensors.items():
        got = mapped[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        # bytes compared (float8 has no equality kernel on every build)
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_a_dtype_torch_lacks_is_named(tmp_path):
    path = tmp_path / "f4.safetensors"
    write_raw_safetensors(path, {"w": torch.zeros(4, dtype=torch.uint8)}, {"w": "F4"}, 0)
    with pytest.raises(CheckpointError, match="'F4'") as raised:
        read_safetensors_header(path)
    assert str(path) in str(raised.value)


def test_big_endian_fallback_reads_the_same(reference_checkpoint, monkeypatch):
    folder = reference_checkpoint[0] / "transformer"
    mapped = load_component(Kandinsky5Transformer3DModel, folder).state_dict()
    monkeypatch.setattr(diffusers_format, "MAPPABLE_BYTE_ORDER", False)
    read = load_component(Kandinsky5Transformer3DModel, folder).state_dict()
    assert all(torch.equal(read[name], mapped[name]) for name in mapped)


def test_checkpoint_bytes_reads_the_headers_only(reference_checkpoint, tmp_path):
    folder = reference_checkpoint[0] / "transformer"
    state = load_file(str(folder / WEIGHTS))
    expected = sum(t.numel() * t.element_size() for t in state.values())
    assert checkpoint_bytes(folder) == expected
    # sharded: the same bytes over two files
    names = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for shard, keys in (("a.safetensors", names[::2]), ("b.safetensors", names[1::2])):
        save_file({k: state[k] for k in keys}, str(sharded / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (sharded / f"{WEIGHTS}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert checkpoint_bytes(sharded) == expected
