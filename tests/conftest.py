"""Shared fixtures: tiny random checkpoints in the exact Diffusers layout, written by diffusers itself.

diffusers 0.42.1 is the oracle: it builds and saves the checkpoint, and its pipeline's output is what ours must
reproduce. The text side uses the real tokenizers from ``../shared/reference/tokenizers``.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from kandinsky5 import tiny
from kandinsky5.runtime.memory_plan import NABLA_ATTENTION as OFFICIAL_NABLA_ATTENTION

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"
TOKENIZERS_DIR = REFERENCE_DIR / "tokenizers"

QWEN_HIDDEN = 32
CLIP_HIDDEN = 24  # unlike Qwen's, so a swapped text input cannot go unnoticed

# The package's tiny checkpoint shapes, narrower still for speed, with distinct text widths.
TINY_TRANSFORMER = dict(
    tiny.TINY_TRANSFORMER.to_dict(),
    in_text_dim=QWEN_HIDDEN,
    in_text_dim2=CLIP_HIDDEN,
    time_dim=16,
    model_dim=32,
    ff_dim=48,
)
TINY_VAE = dict(tiny.TINY_VAE)
# the official NABLA checkpoints' attention settings, on the tiny DiT
NABLA_ATTENTION = dict(OFFICIAL_NABLA_ATTENTION)


@pytest.fixture(autouse=True, scope="session")
def sigint_raises_keyboard_interrupt():
    """Python's own SIGINT handler for the session, whatever the runner inherited (a shell's background job starts
    with SIGINT ignored), since the interrupt tests raise SIGINT; the inherited one back after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Random weights everywhere, modulation included (the reference zero-initialises it, hiding errors);
    norm scales near 1 so activations keep their size."""
    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)
    with torch.no_grad():
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=gen)
                if isinstance(sub, norms) and name == "weight":
                    param.copy_(1.0 + 0.1 * noise)
                else:
                    param.copy_(std * noise)


def build_reference_pipeline(nabla: bool = False, seed: int = 0):
    """A tiny diffusers Kandinsky5T2VPipeline with random weights and the real tokenizers."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline
    from diffusers import Kandinsky5Transformer3DModel as RefTransformer
    from transformers import AutoTokenizer, CLIPTokenizer

    from kandinsky5.tiny_text import build_tiny_clip_text_encoder, build_tiny_qwen_text_encoder

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZERS_DIR / "qwen2_5_vl"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(TOKENIZERS_DIR / "clip_vit_large_patch14"))
    config = dict(TINY_TRANSFORMER, **(NABLA_ATTENTION if nabla else {}))
    transformer = RefTransformer(**config).eval()
    randomize_(transformer, seed)
    vae = AutoencoderKLHunyuanVideo(**TINY_VAE).eval()
    randomize_(vae, seed + 1, std=0.1)
    text_encoder = build_tiny_qwen_text_encoder(len(tokenizer), hidden_size=QWEN_HIDDEN, seed=seed + 2).eval()
    text_encoder_2 = build_tiny_clip_text_encoder(len(tokenizer_2), hidden_size=CLIP_HIDDEN, seed=seed + 3).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe = Kandinsky5T2VPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """(folder written by diffusers' save_pretrained, the diffusers pipeline)."""
    pipe = build_reference_pipeline()
    folder = tmp_path_factory.mktemp("tiny-t2v")
    pipe.save_pretrained(str(folder))
    return folder, pipe


@pytest.fixture(scope="session")
def reference_nabla_checkpoint(tmp_path_factory):
    pipe = build_reference_pipeline(nabla=True, seed=10)
    folder = tmp_path_factory.mktemp("tiny-t2v-nabla")
    pipe.save_pretrained(str(folder))
    return folder, pipe


@pytest.fixture(scope="session")
def our_pipeline(reference_checkpoint):
    from kandinsky5 import Kandinsky5T2VPipeline

    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def reference_i2v_checkpoint(tmp_path_factory):
    """(folder, diffusers Kandinsky5I2VPipeline): the tiny components under the image-to-video class."""
    from diffusers import Kandinsky5I2VPipeline

    pipe = Kandinsky5I2VPipeline(**build_reference_pipeline(seed=20).components)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("tiny-i2v")
    pipe.save_pretrained(str(folder))
    return folder, pipe


@pytest.fixture(scope="session")
def our_i2v_pipeline(reference_i2v_checkpoint):
    from kandinsky5 import Kandinsky5I2VPipeline

    pipe = Kandinsky5I2VPipeline.from_pretrained(reference_i2v_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------ the image models

# the image models' transformer is the video one's; text-to-image feeds the noise channels alone
# the package's tiny image VAE, narrower: the images are 1024-class (diffusers snaps every size to those)
TINY_IMAGE_VAE = dict(tiny.TINY_IMAGE_VAE, block_out_channels=[4, 4, 8, 8])
IMAGE_SCHEDULER_SHIFT = 3.0


def image_only_qwen_processor(tokenizer):
    """transformers' own ``Qwen2VLProcessor`` (its image processing and placeholder expansion) for diffusers'
    editing pipeline, without the video processor, which needs torchvision (absent here): the subclass declares
    the image processor and tokenizer as its only parts. The image processor is the real configuration's."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(TOKENIZERS_DIR / "qwen2_5_vl"))
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_reference_image_pipeline(edit: bool, seed: int = 0):
    """A tiny diffusers Kandinsky5T2IPipeline (or, ``edit``, Kandinsky5I2IPipeline) with random weights, the real
    tokenizers and, for editing, the real Qwen2.5-VL image processor configuration."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Kandinsky5I2IPipeline, Kandinsky5T2IPipeline
    from diffusers import Kandinsky5Transformer3DModel as RefTransformer
    from transformers import AutoTokenizer, CLIPTokenizer

    from kandinsky5.tiny_text import build_tiny_clip_text_encoder, build_tiny_qwen_text_encoder, qwen_vision_token_ids

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZERS_DIR / "qwen2_5_vl"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(TOKENIZERS_DIR / "clip_vit_large_patch14"))
    transformer = RefTransformer(**dict(TINY_TRANSFORMER, visual_cond=edit)).eval()
    randomize_(transformer, seed)
    vae = AutoencoderKL(**TINY_IMAGE_VAE).eval()
    randomize_(vae, seed + 1, std=0.1)
    text_encoder = build_tiny_qwen_text_encoder(
        len(tokenizer), hidden_size=QWEN_HIDDEN, seed=seed + 2, vision_token_ids=qwen_vision_token_ids(tokenizer)
    ).eval()
    text_encoder_2 = build_tiny_clip_text_encoder(len(tokenizer_2), hidden_size=CLIP_HIDDEN, seed=seed + 3).eval()
    pipeline_class = Kandinsky5I2IPipeline if edit else Kandinsky5T2IPipeline
    pipe = pipeline_class(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=image_only_qwen_processor(tokenizer) if edit else tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=IMAGE_SCHEDULER_SHIFT),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_image_checkpoint(pipe, folder: Path) -> Path:
    """diffusers' save_pretrained, with model_index.json naming the tokenizer as the official checkpoints do
    (the test's processor subclass is saved in transformers' format under another name)."""
    import json

    pipe.save_pretrained(str(folder))
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2))
    return folder


@pytest.fixture(scope="session")
def reference_t2i_checkpoint(tmp_path_factory):
    """(folder, diffusers Kandinsky5T2IPipeline)."""
    pipe = build_reference_image_pipeline(edit=False, seed=30)
    return save_image_checkpoint(pipe, tmp_path_factory.mktemp("tiny-t2i")), pipe


@pytest.fixture(scope="session")
def reference_i2i_checkpoint(tmp_path_factory):
    """(folder, diffusers Kandinsky5I2IPipeline)."""
    pipe = build_reference_image_pipeline(edit=True, seed=40)
    return save_image_checkpoint(pipe, tmp_path_factory.mktemp("tiny-i2i")), pipe


@pytest.fixture(scope="session")
def our_t2i_pipeline(reference_t2i_checkpoint):
    from kandinsky5 import Kandinsky5T2IPipeline

    pipe = Kandinsky5T2IPipeline.from_pretrained(reference_t2i_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def our_i2i_pipeline(reference_i2i_checkpoint):
    from kandinsky5 import Kandinsky5I2IPipeline

    pipe = Kandinsky5I2IPipeline.from_pretrained(reference_i2i_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe
