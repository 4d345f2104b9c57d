"""Loading the Diffusers layout: sharded weights, and clear errors for every broken checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kandinsky5 import Kandinsky5T2VPipeline
from kandinsky5.loading.diffusers_format import CheckpointError, load_component
from kandinsky5.loading.hub import CheckpointNotFoundError, resolve_checkpoint
from kandinsky5.models.dit import Kandinsky5Transformer3DModel

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def checkpoint_copy(reference_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(reference_checkpoint[0], folder)
    return folder


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_sharded_weights_load_equal(checkpoint_copy):
    folder = checkpoint_copy / "transformer"
    state = load_file(str(folder / WEIGHTS))
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard))
        weight_map.update({k: shard for k in keys})
    (folder / WEIGHTS).unlink()
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_component(Kandinsky5Transformer3DModel, folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_missing_component_folder(checkpoint_copy):
    shutil.rmtree(checkpoint_copy / "vae")
    with pytest.raises(CheckpointError, match="'vae'"):
        Kandinsky5T2VPipeline.from_pretrained(checkpoint_copy)


def test_missing_weights_file(checkpoint_copy):
    (checkpoint_copy / "transformer" / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="neither"):
        Kandinsky5T2VPipeline.from_pretrained(checkpoint_copy)


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "transformer" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        Kandinsky5T2VPipeline.from_pretrained(checkpoint_copy)


def test_model_index_of_another_pipeline(checkpoint_copy):
    edit_json(checkpoint_copy / "model_index.json", _class_name="WanPipeline")
    with pytest.raises(CheckpointError, match="WanPipeline"):
        Kandinsky5T2VPipeline.from_pretrained(checkpoint_copy)


def test_image_to_video_checkpoint_named(checkpoint_copy):
    edit_json(checkpoint_copy / "model_index.json", _class_name="Kandinsky5I2VPipeline")
    with pytest.raises(CheckpointError, match="Kandinsky5I2VPipeline"):
        Kandinsky5T2VPipeline.from_pretrained(checkpoint_copy)


def test_missing_and_unexpected_tensors_are_named(checkpoint_copy):
    path = checkpoint_copy / "transformer" / WEIGHTS
    state = load_file(str(path))
    del state["out_layer.out_layer.bias"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="out_layer.out_layer.bias") as err:
        Kandinsky5T2VPipeline.from_pretrained(checkpoint_copy)
    assert "extra.weight" in str(err.value)


def test_shape_mismatch_is_named(checkpoint_copy):
    edit_json(checkpoint_copy / "transformer" / "config.json", ff_dim=64)
    with pytest.raises(CheckpointError, match="shape mismatch.*feed_forward"):
        Kandinsky5T2VPipeline.from_pretrained(checkpoint_copy)


def test_missing_local_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        Kandinsky5T2VPipeline.from_pretrained(tmp_path / "nope")


def test_unreachable_hub_id_says_offline_and_what_to_do(tmp_path):
    from importlib.metadata import entry_points

    with pytest.raises(CheckpointNotFoundError, match="offline.*local directory") as raised:
        resolve_checkpoint("kandinskylab/not-a-real-repo-Diffusers", cache_dir=tmp_path, local_files_only=True)
    # the command it names is one the installed huggingface_hub has
    assert "`hf download kandinskylab/not-a-real-repo-Diffusers --local-dir DIR`" in str(raised.value)
    assert "hf" in {script.name for script in entry_points(group="console_scripts")}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_name_the_file(checkpoint_copy, damage):
    path = checkpoint_copy / "transformer" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file")
    with pytest.raises(CheckpointError, match="truncated or corrupt") as raised:
        Kandinsky5T2VPipeline.from_pretrained(checkpoint_copy)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("torch_dtype", ["bfloat16", torch.int8, torch.float8_e4m3fn])
def test_bad_torch_dtype_is_named_before_reading(tmp_path, torch_dtype):
    with pytest.raises(ValueError, match="torch_dtype"):
        Kandinsky5T2VPipeline.from_pretrained(tmp_path / "never-read", torch_dtype=torch_dtype)


def test_loading_is_quiet(reference_checkpoint, capfd):
    from transformers.utils import logging as transformers_logging

    bars_on = transformers_logging.is_progress_bar_enabled()
    capfd.readouterr()
    Kandinsky5T2VPipeline.from_pretrained(reference_checkpoint[0])
    out, err = capfd.readouterr()
    assert out == "" and "Loading" not in err and "%|" not in err
    assert transformers_logging.is_progress_bar_enabled() == bars_on  # the user's setting is back
