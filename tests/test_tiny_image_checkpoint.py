"""The tiny image checkpoints (text-to-image "t2i", image editing "i2i"): their layout and configs are the official
image checkpoints', their VAE round-trips an image, and their Qwen2.5-VL sees an image as the editing model shows
one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from kandinsky5 import tiny
from kandinsky5.loading.diffusers_format import load_component
from kandinsky5.models.text_encoders import VIDEO_PROMPT_TEMPLATE, template_prefix_length
from kandinsky5.models.vae2d import AutoencoderKL2D
from kandinsky5.tiny_text import (
    QWEN_IMAGE_PAD,
    QWEN_IMAGE_PROCESSOR_CONFIG,
    QWEN_SPECIAL_TOKENS,
    QWEN_TEMPLATE_PREFIX_TOKENS,
    QWEN_VISION_END,
    QWEN_VISION_START,
    QWEN_VISION_TOKEN_ID_FIELDS,
)

REAL_PREPROCESSOR = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "reference"
    / "tokenizers"
    / "qwen2_5_vl"
    / "preprocessor_config.json"
)
# diffusers 0.42.1 Kandinsky5I2IPipeline's template: the source image follows the prompt.
EDIT_TEMPLATE = (
    "<|im_start|>system\nYou are a prompt engineer. Based on the provided source image (first image) and target image "
    "(second image), create an interesting text prompt that can be used together with the source image to create the "
    "target image:<|im_end|><|im_start|>user{}<|vision_start|><|image_pad|><|vision_end|><|im_end|>"
)
SIZE = 64
# FLUX's VAE compresses 8x; its latents have 16 channels.
COMPRESSION = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-image")
    return {task: tiny.write_tiny_checkpoint(root / task, seed=0, task=task) for task in tiny.IMAGE_TASKS}


def read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("task", tiny.IMAGE_TASKS)
def test_configs_are_the_image_models(checkpoints, task):
    folder = checkpoints[task]
    index = read(folder, "model_index.json")
    assert index["_class_name"] == tiny.PIPELINE_CLASSES[task] == f"Kandinsky5{task.upper()}Pipeline"
    assert index["tokenizer"] == ["transformers", "Qwen2VLProcessor"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["transformer"] == ["diffusers", "Kandinsky5Transformer3DModel"]

    transformer = read(folder, "transformer/config.json")
    assert transformer["visual_cond"] is (task == "i2i")
    assert transformer["in_visual_dim"] == transformer["out_visual_dim"] == 16

    vae = read(folder, "vae/config.json")
    assert vae["_class_name"] == "AutoencoderKL"
    assert vae["down_block_types"] == ["DownEncoderBlock2D"] * 4 and vae["up_block_types"] == ["UpDecoderBlock2D"] * 4
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    assert vae["use_quant_conv"] is False and vae["use_post_quant_conv"] is False

    assert read(folder, "scheduler/scheduler_config.json")["shift"] == tiny.TINY_IMAGE_SCHEDULER_SHIFT == 3.0
    assert read(folder, "tokenizer/preprocessor_config.json") == QWEN_IMAGE_PROCESSOR_CONFIG


def test_video_checkpoints_keep_their_components(tmp_path):
    folder = tiny.write_tiny_checkpoint(tmp_path / "t2v", task="t2v")
    index = read(folder, "model_index.json")
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    assert index["vae"] == ["diffusers", "AutoencoderKLHunyuanVideo"]
    assert read(folder, "scheduler/scheduler_config.json")["shift"] == tiny.TINY_SCHEDULER_SHIFT == 5.0
    assert not (folder / "tokenizer" / "preprocessor_config.json").exists()


@pytest.mark.skipif(not REAL_PREPROCESSOR.is_file(), reason="needs ../shared/reference/tokenizers")
def test_image_processor_config_is_the_real_one():
    assert json.loads(REAL_PREPROCESSOR.read_text()) == QWEN_IMAGE_PROCESSOR_CONFIG


def test_vae_round_trips_an_image(checkpoints):
    vae = load_component(AutoencoderKL2D, checkpoints["i2i"] / "vae").eval()
    pixels = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 16, SIZE // COMPRESSION, SIZE // COMPRESSION)
    assert decoded.shape == pixels.shape
    assert torch.isfinite(latents).all() and torch.isfinite(decoded).all()

    # the same folder, read by diffusers' AutoencoderKL, decodes alike
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.AutoencoderKL.from_pretrained(str(checkpoints["i2i"] / "vae")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference.decode(latents).sample, decoded)


def test_tokenizer_and_config_share_the_vision_ids(checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoints["i2i"] / "tokenizer"))
    config = Qwen2_5_VLForConditionalGeneration.config_class.from_pretrained(str(checkpoints["i2i"] / "text_encoder"))
    ids = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    assert ids == list(range(len(tokenizer) - len(QWEN_SPECIAL_TOKENS), len(tokenizer)))  # last, in order
    for field, token in QWEN_VISION_TOKEN_ID_FIELDS.items():
        assert getattr(config, field) == tokenizer.convert_tokens_to_ids(token) < config.text_config.vocab_size
    # each a single token, never spelt out; the video template still crops as the real tokenizer's does
    tokens = tokenizer.tokenize(EDIT_TEMPLATE.format("a cat"))
    assert tokens[-4:] == [QWEN_VISION_START, QWEN_IMAGE_PAD, QWEN_VISION_END, tokenizer.eos_token]
    assert template_prefix_length(tokenizer, VIDEO_PROMPT_TEMPLATE) == QWEN_TEMPLATE_PREFIX_TOKENS
    vision = config.vision_config
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size, vision.in_channels) == (
        14,
        2,
        2,
        3,
    )
    assert vision.out_hidden_size == config.text_config.hidden_size == tiny.TINY_QWEN_HIDDEN


def test_qwen_sees_the_source_image(checkpoints):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = checkpoints["i2i"]
    processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder / "tokenizer"))
    assert processor.merge_size == 2 and processor.patch_size == 14
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder / "text_encoder")).eval()

    def hidden(picture: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        vision = processor(images=[picture], return_tensors="pt")
        grid = vision["image_grid_thw"]
        # what Qwen2VLProcessor does: one <|image_pad|> per merged patch
        count = int(grid.prod()) // processor.merge_size**2
        text = EDIT_TEMPLATE.format("make it blue").replace(QWEN_IMAGE_PAD, QWEN_IMAGE_PAD * count)
        inputs = tokenizer([text], return_tensors="pt")
        is_image = inputs["input_ids"] == model.config.image_token_id
        assert int(is_image.sum()) == count
        with torch.no_grad():
            out = model.model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=vision["pixel_values"],
                image_grid_thw=grid,
                mm_token_type_ids=is_image.int(),  # as the processor returns them: 1 at image tokens
            )
        return out.last_hidden_state[0], is_image[0]

    first, is_image = hidden(image(0))
    second, _ = hidden(image(1))
    assert first.shape == (len(is_image), tiny.TINY_QWEN_HIDDEN)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    image_positions = is_image.nonzero().flatten()
    before, after = slice(0, int(image_positions[0])), slice(int(image_positions[-1]) + 1, None)
    # causal attention: the text before the image does not see it, the text after it does
    torch.testing.assert_close(first[before], second[before])
    assert not torch.allclose(first[after], second[after])


class QwenProcessor:
    """What diffusers' I2I pipeline asks of ``Qwen2VLProcessor`` (which needs torchvision, absent here): the image
    processor's features, the text with one ``<|image_pad|>`` per merged patch tokenized, and the modality ids."""

    def __init__(self, folder: Path):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(QWEN_IMAGE_PAD)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def __call__(self, text, images, videos=None, **kwargs):
        from transformers import BatchFeature

        vision = self.image_processor(images=images, return_tensors="pt")
        counts = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        text = [t.replace(QWEN_IMAGE_PAD, QWEN_IMAGE_PAD * c) for t, c in zip(text, counts, strict=True)]
        inputs = self.tokenizer(text, **kwargs)
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).int()
        return BatchFeature({**inputs, **vision})


@pytest.mark.parametrize("task", tiny.IMAGE_TASKS)
def test_diffusers_pipelines_run_the_checkpoints(checkpoints, task):
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = checkpoints[task]
    pipe = getattr(diffusers, tiny.PIPELINE_CLASSES[task])(
        transformer=diffusers.Kandinsky5Transformer3DModel.from_pretrained(str(folder / "transformer")),
        vae=diffusers.AutoencoderKL.from_pretrained(str(folder / "vae")),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder / "text_encoder")),
        tokenizer=QwenProcessor(folder / "tokenizer")
        if task == "i2i"
        else AutoTokenizer.from_pretrained(str(folder / "tokenizer")),
        text_encoder_2=CLIPTextModel.from_pretrained(str(folder / "text_encoder_2")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder / "scheduler")),
    )
    size = 2 * SIZE  # the I2I pipeline shows Qwen the image at half size: 64 pixels, Qwen's minimum area
    pipe.resolutions = [(size, size)]  # the pipelines accept only the official (large) sizes
    pipe.set_progress_bar_config(disable=True)
    source = {"image": image(0).resize((size, size))} if task == "i2i" else {}
    out = pipe(prompt="a red fox", height=size, width=size, num_inference_steps=2, output_type="pt", **source).image
    assert out.shape == (1, 3, size, size) and torch.isfinite(out).all()


def test_write_refuses_an_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="i2i"):
        tiny.write_tiny_checkpoint(tmp_path / "x", task="t2x")
    assert not (tmp_path / "x").exists()


def test_cli_offers_every_tiny_task():
    from kandinsky5.cli.main import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    task = next(a for a in subparsers.choices["tiny-checkpoint"]._actions if a.dest == "task")
    assert task.choices == sorted(tiny.PIPELINE_CLASSES)
    assert parser.parse_args(["tiny-checkpoint", "out", "--task", "i2i"]).task == "i2i"
