"""Full-size models built on the meta device from the official configs: same keys and shapes as diffusers',
and the published parameter counts (Lite 2.008 B, Pro 19.31 B). Nothing is allocated."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE_DIR
from diffusers import AutoencoderKLHunyuanVideo as ReferenceVAE
from diffusers import Kandinsky5Transformer3DModel as ReferenceTransformer

from kandinsky5.models.dit import Kandinsky5Transformer3DModel
from kandinsky5.models.vae import AutoencoderKLHunyuanVideo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import LITE  # noqa: E402

PRO_CONFIG = REFERENCE_DIR / "checkpoint-pro-5s" / "transformer" / "config.json"
VAE_CONFIG = REFERENCE_DIR / "checkpoint-pro-5s" / "vae" / "config.json"


def config_of(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,billions", [("lite", 2.008), ("pro", 19.31)])
def test_transformer_matches_reference_shapes_and_size(name, billions):
    config = LITE if name == "lite" else config_of(PRO_CONFIG)
    with torch.device("meta"):
        ours = Kandinsky5Transformer3DModel.from_config(config)
        reference = ReferenceTransformer(**config)
    assert shapes(ours) == shapes(reference)
    count = sum(p.numel() for p in ours.parameters()) / 1e9
    assert count == pytest.approx(billions, abs=0.01)


def test_vae_matches_reference_shapes():
    config = config_of(VAE_CONFIG)
    with torch.device("meta"):
        ours = AutoencoderKLHunyuanVideo.from_config(config)
        reference = ReferenceVAE(**config)
    assert shapes(ours) == shapes(reference)
