"""A tiny random-weight checkpoint in the exact Diffusers layout, written with the package alone.

It loads like an official checkpoint (ours and diffusers' loaders alike) and runs in seconds on a CPU; its videos
are noise, since the weights are random. It serves the README demo and smoke tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kandinsky5.models.dit import Kandinsky5Transformer3DModel, TransformerConfig
from kandinsky5.tiny_text import write_tiny_text_components

TINY_QWEN_HIDDEN = 32
TINY_CLIP_HIDDEN = 32
TINY_LATENT_CHANNELS = 16
# Flow-matching shift of the official Lite and Pro checkpoints.
TINY_SCHEDULER_SHIFT = 5.0

TINY_TRANSFORMER = TransformerConfig(
    in_visual_dim=TINY_LATENT_CHANNELS,
    out_visual_dim=TINY_LATENT_CHANNELS,
    in_text_dim=TINY_QWEN_HIDDEN,
    in_text_dim2=TINY_CLIP_HIDDEN,
    time_dim=32,
    patch_size=(1, 2, 2),
    model_dim=64,
    ff_dim=128,
    num_text_blocks=1,
    num_visual_blocks=2,
    axes_dims=(4, 6, 6),
    visual_cond=True,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=TINY_LATENT_CHANNELS,
    down_block_types=["HunyuanVideoDownBlock3D"] * 4,
    up_block_types=["HunyuanVideoUpBlock3D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    act_fn="silu",
    norm_num_groups=4,
    scaling_factor=0.476986,
    spatial_compression_ratio=8,
    temporal_compression_ratio=4,
    mid_block_add_attention=True,
)
PIPELINE_CLASSES = {"t2v": "Kandinsky5T2VPipeline", "i2v": "Kandinsky5I2VPipeline"}
MODEL_INDEX = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "text_encoder_2": ["transformers", "CLIPTextModel"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "transformer": ["diffusers", "Kandinsky5Transformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
}


def write_tiny_checkpoint(folder: Path, seed: int = 0, task: str = "t2v") -> Path:
    """Write the tiny checkpoint of ``task`` ("t2v" or "i2v") into ``folder`` (created if needed); return it.

    The checkpoint is written in a temporary folder beside ``folder`` and renamed into place when complete
    (:func:`kandinsky5.io.atomic.atomic_folder`): an error or an interrupt leaves no partial checkpoint."""
    if task not in PIPELINE_CLASSES:
        raise ValueError(f"task must be one of {sorted(PIPELINE_CLASSES)}, got {task!r}")
    from kandinsky5.io.atomic import atomic_folder
    from kandinsky5.models.vae import AutoencoderKLHunyuanVideo

    folder = Path(folder)
    with atomic_folder(folder) as temporary:
        # PyTorch's default initialisation, seeded; unlike the reference's, it leaves no layer at zero.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            Kandinsky5Transformer3DModel(TINY_TRANSFORMER).save_pretrained(temporary / "transformer")
            AutoencoderKLHunyuanVideo.from_config(TINY_VAE).save_pretrained(temporary / "vae")
        write_tiny_text_components(temporary, TINY_QWEN_HIDDEN, TINY_CLIP_HIDDEN, seed=seed)
        scheduler = {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": 1000,
            "shift": TINY_SCHEDULER_SHIFT,
        }
        (temporary / "scheduler").mkdir()
        (temporary / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        model_index = {"_class_name": PIPELINE_CLASSES[task], **MODEL_INDEX}
        (temporary / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return folder
