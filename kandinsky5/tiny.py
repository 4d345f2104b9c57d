"""A tiny random-weight checkpoint in the exact Diffusers layout, written with the package alone.

One per task: text-to-video ("t2v"), image-to-video ("i2v"), text-to-image ("t2i") and image editing ("i2i"). It
loads like an official checkpoint of its task (ours and diffusers' loaders alike) and runs in seconds on a CPU; its
videos and images are noise, since the weights are random. It serves the README demo and smoke tests.

The video checkpoints hold the HunyuanVideo 3D VAE; the image ones FLUX's 2D VAE (Diffusers' ``AutoencoderKL``, our
:class:`~kandinsky5.models.vae2d.AutoencoderKL2D`) and, beside the Qwen tokenizer, Qwen2.5-VL's image processor
config, with which the editing model shows the source image to Qwen2.5-VL.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from kandinsky5.models.dit import Kandinsky5Transformer3DModel, TransformerConfig
from kandinsky5.tiny_text import write_tiny_text_components

TINY_QWEN_HIDDEN = 32
TINY_CLIP_HIDDEN = 32
TINY_LATENT_CHANNELS = 16
# Flow-matching shift of the official Lite and Pro video checkpoints.
TINY_SCHEDULER_SHIFT = 5.0
# The image models' (the original repository's image default, scheduler_scale=3.0).
TINY_IMAGE_SCHEDULER_SHIFT = 3.0

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
# FLUX's VAE (the image models') narrowed: 16 latent channels, 8x spatial compression, no quant convolutions.
TINY_IMAGE_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=TINY_LATENT_CHANNELS,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    act_fn="silu",
    norm_num_groups=4,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
# Diffusers' T2I pipeline feeds the transformer the noise latents alone; I2I (as I2V) adds the source image's
# latents and a one-channel mask.
TINY_T2I_TRANSFORMER = dataclasses.replace(TINY_TRANSFORMER, visual_cond=False)
TINY_I2I_TRANSFORMER = dataclasses.replace(TINY_TRANSFORMER, visual_cond=True)
PIPELINE_CLASSES = {
    "t2v": "Kandinsky5T2VPipeline",
    "i2v": "Kandinsky5I2VPipeline",
    "t2i": "Kandinsky5T2IPipeline",
    "i2i": "Kandinsky5I2IPipeline",
}
IMAGE_TASKS = ("t2i", "i2i")
# The image VAE's class in the official checkpoints' vae/config.json (ours, AutoencoderKL2D, saves its own name).
IMAGE_VAE_CLASS_NAME = "AutoencoderKL"
MODEL_INDEX = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "text_encoder_2": ["transformers", "CLIPTextModel"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "transformer": ["diffusers", "Kandinsky5Transformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
}
# The official image checkpoints': Qwen's processor (tokenizer and image processor) and FLUX's VAE.
IMAGE_MODEL_INDEX = {
    **MODEL_INDEX,
    "tokenizer": ["transformers", "Qwen2VLProcessor"],
    "vae": ["diffusers", IMAGE_VAE_CLASS_NAME],
}


def write_tiny_checkpoint(folder: Path, seed: int = 0, task: str = "t2v") -> Path:
    """Write the tiny checkpoint of ``task`` (one of :data:`PIPELINE_CLASSES`: "t2v", "i2v", "t2i", "i2i") into
    ``folder`` (created if needed); return it.

    The checkpoint is written in a temporary folder beside ``folder`` and renamed into place when complete
    (:func:`kandinsky5.io.atomic.atomic_folder`): an error or an interrupt leaves no partial checkpoint."""
    if task not in PIPELINE_CLASSES:
        raise ValueError(f"task must be one of {sorted(PIPELINE_CLASSES)}, got {task!r}")
    from kandinsky5.io.atomic import atomic_folder
    from kandinsky5.models.vae import AutoencoderKLHunyuanVideo
    from kandinsky5.models.vae2d import AutoencoderKL2D

    image = task in IMAGE_TASKS
    transformer = {"t2i": TINY_T2I_TRANSFORMER, "i2i": TINY_I2I_TRANSFORMER}.get(task, TINY_TRANSFORMER)
    vae_class, vae_config = (AutoencoderKL2D, TINY_IMAGE_VAE) if image else (AutoencoderKLHunyuanVideo, TINY_VAE)
    folder = Path(folder)
    with atomic_folder(folder) as temporary:
        # PyTorch's default initialisation, seeded; unlike the reference's, it leaves no layer at zero.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            Kandinsky5Transformer3DModel(transformer).save_pretrained(temporary / "transformer")
            vae_class.from_config(vae_config).save_pretrained(temporary / "vae")
        write_tiny_text_components(temporary, TINY_QWEN_HIDDEN, TINY_CLIP_HIDDEN, seed=seed, image_processor=image)
        scheduler = {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": 1000,
            "shift": TINY_IMAGE_SCHEDULER_SHIFT if image else TINY_SCHEDULER_SHIFT,
        }
        (temporary / "scheduler").mkdir()
        (temporary / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        model_index = {"_class_name": PIPELINE_CLASSES[task], **(IMAGE_MODEL_INDEX if image else MODEL_INDEX)}
        (temporary / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return folder
