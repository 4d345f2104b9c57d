"""Text conditioning: Qwen2.5-VL hidden states of the templated prompt, and CLIP's pooled output.

The networks are transformers' own; this module holds the prompt template, the cleaning, the truncation and
the crop of the template prefix, all as the reference does them.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

VIDEO_PROMPT_TEMPLATE = "\n".join(
    [
        "<|im_start|>system\nYou are a prompt engineer. Describe the video in detail.",
        "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
        "Describe the location of the video, main characters or objects and their action.",
        "Describe the dynamism of the video and presented actions.",
        "Name the visual style of the video: whether it is a professional footage, user generated content, some kind"
        " of animation, video game or scren content.",
        "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
        "Pay attention to the order of key actions shown in the scene.<|im_end|>",
        "<|im_start|>user\n{}<|im_end|>",
    ]
)
# The image models' templates (diffusers' Kandinsky5T2IPipeline and Kandinsky5I2IPipeline): the editing model sees the
# source image, whose placeholder the image processor's token count replaces.
IMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nYou are a prompt engineer. Describe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>"
)
IMAGE_PLACEHOLDER = "<|image_pad|>"
EDIT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nYou are a prompt engineer. Based on the provided source image (first image) and target image "
    "(second image), create an interesting text prompt that can be used together with the source image to create the "
    "target image:<|im_end|><|im_start|>user{}<|vision_start|>" + IMAGE_PLACEHOLDER + "<|vision_end|><|im_end|>"
)
# The editing model's crop goes past the template's prefix into the prompt: diffusers crops 54 tokens (the real
# tokenizer's prefix is 49), the original repository 55 of its template's 52. We crop as diffusers does.
EDIT_CROP_PAST_PREFIX = 5
# The editing template's tokens after the image's: <|vision_end|><|im_end|>, and <|vision_start|> before it.
EDIT_TEMPLATE_IMAGE_FRAME_TOKENS = 3
# Qwen2.5-VL sees the source image at half its size (diffusers' and the original's choice).
EDIT_IMAGE_DOWNSCALE = 2
# When it reports what truncation removed, the reference drops this many tokens at the end of the ids and keeps
# this many fewer than max_sequence_length; we do the same so the cut text, and so the embeddings, are equal.
TEMPLATE_SUFFIX_TOKENS = 2
MAX_SEQUENCE_LENGTH_LIMIT = 1024
# A cut-off part of a prompt is quoted whole up to this many characters, else abbreviated around ELLIPSIS.
WARNING_TEXT_LIMIT = 120
ELLIPSIS = " ... "


def prompt_clean(text: str) -> str:
    """HTML-unescape (twice), fix text with ftfy when installed, collapse white space — as the reference."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def template_prefix_length(tokenizer, template: str = VIDEO_PROMPT_TEMPLATE) -> int:
    """Number of tokens of the template before the prompt: the part cropped from the encoder's output."""
    prefix = template.split("{}")[0]
    prefix_ids = tokenizer(prefix)["input_ids"]
    probe_ids = tokenizer(template.format("probe"))["input_ids"]
    if list(probe_ids[: len(prefix_ids)]) != list(prefix_ids):
        raise ValueError("The tokenizer splits the prompt template differently at the prompt boundary")
    return len(prefix_ids)


def load_tokenizers(root: Path):
    from transformers import AutoTokenizer, CLIPTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(root / "tokenizer_2"))
    return tokenizer, tokenizer_2


# Qwen2.5-VL's image processor configuration, beside the tokenizer in the Diffusers layout: its own file (as
# transformers 4 saves it), or nested in the processor's (transformers 5).
IMAGE_PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")


def load_image_processor(root: Path):
    """transformers' Qwen2-VL image processor from ``root/tokenizer`` (the editing model's vision input): its PIL
    implementation, which needs no torchvision, with the checkpoint's settings."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(root / "tokenizer"))


@contextmanager
def transformers_quietly() -> Iterator[None]:
    """transformers' progress bars off inside (loading and saving report nothing unless asked), then back as
    they were."""
    from transformers.utils import logging as transformers_logging

    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()


def load_text_encoders(root: Path, torch_dtype: torch.dtype | None):
    """Qwen2.5-VL and CLIP from ``root``, quietly: transformers' per-file progress bars are off while they load
    (and back as they were after), since a pipeline's loading reports nothing unless asked."""
    from transformers import CLIPTextModel, Qwen2_5_VLForConditionalGeneration

    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    with transformers_quietly():
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(root / "text_encoder"), **kwargs)
        text_encoder_2 = CLIPTextModel.from_pretrained(str(root / "text_encoder_2"), **kwargs)
    return text_encoder.eval().requires_grad_(False), text_encoder_2.eval().requires_grad_(False)


def abbreviated(text: str, limit: int = WARNING_TEXT_LIMIT) -> str:
    """``text`` itself when short, else its start and end around an ellipsis (a warning stays one readable line)."""
    if len(text) <= limit:
        return text
    half = (limit - len(ELLIPSIS)) // 2
    return f"{text[:half]}{ELLIPSIS}{text[-half:]}"


def truncate_prompts(tokenizer, texts: list[str], prefix_len: int, max_sequence_length: int) -> list[str]:
    """Shorten templated prompts whose prompt part exceeds ``max_sequence_length`` tokens, warning with the text
    that was cut. Follows the reference's character-level cut so that results stay equal."""
    ids = tokenizer(text=texts, return_tensors="pt", padding="longest")["input_ids"]
    if ids.shape[-1] <= prefix_len + max_sequence_length:
        return texts
    out = list(texts)
    for i, text in enumerate(texts):
        prompt_tokens = ids[i][prefix_len:-TEMPLATE_SUFFIX_TOKENS]
        removed = tokenizer.decode(prompt_tokens[max_sequence_length - TEMPLATE_SUFFIX_TOKENS :])
        if removed:
            out[i] = text[: -len(removed)]
            logger.warning(
                "Prompt %d is longer than max_sequence_length=%d tokens; %d characters were cut: %r",
                i,
                max_sequence_length,
                len(removed),
                abbreviated(removed),
            )
    return out


@dataclass(frozen=True)
class QwenImages:
    """Source images as Qwen2.5-VL's image processor prepares them (``pixel_values``, ``image_grid_thw``), and the
    number of placeholder tokens each one takes in the text (what transformers' ``Qwen2VLProcessor`` inserts)."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    token_counts: tuple[int, ...]

    @classmethod
    def prepare(cls, image_processor, images: list) -> QwenImages:
        """PIL images, one per prompt, at half their size (PIL's default resampling, as the reference)."""
        images = [i.resize((i.size[0] // EDIT_IMAGE_DOWNSCALE, i.size[1] // EDIT_IMAGE_DOWNSCALE)) for i in images]
        processed = image_processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        counts = (grid.prod(-1) // image_processor.merge_size**2).tolist()
        return cls(processed["pixel_values"], grid, tuple(int(c) for c in counts))

    def expand(self, texts: list[str]) -> list[str]:
        """Each text's image placeholder repeated as many times as its image has tokens."""
        counts = self.token_counts
        return [text.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * n) for text, n in zip(texts, counts, strict=True)]


def truncate_edit_prompts(tokenizer, prompts: list[str], images: QwenImages, crop: int, max_sequence_length: int):
    """Shorten prompts so that the templated text with its image's tokens stays within ``crop +
    max_sequence_length`` tokens (the length diffusers allows), cutting the end of the prompt, with a warning.
    (diffusers' editing pipeline detects the excess the same way but cuts the template's end instead.)"""
    prefix_len = template_prefix_length(tokenizer, EDIT_PROMPT_TEMPLATE)
    out = list(prompts)
    for i, (prompt, count) in enumerate(zip(prompts, images.token_counts, strict=True)):
        ids = tokenizer(EDIT_PROMPT_TEMPLATE.format(prompt))["input_ids"]
        prompt_ids = ids[prefix_len : len(ids) - EDIT_TEMPLATE_IMAGE_FRAME_TOKENS - 1]
        budget = crop + max_sequence_length - prefix_len - count - EDIT_TEMPLATE_IMAGE_FRAME_TOKENS
        if budget < 1:
            raise ValueError(
                f"`image`: the source image takes {count} Qwen2.5-VL tokens, more than max_sequence_length="
                f"{max_sequence_length} leaves room for; pass a smaller image or a larger max_sequence_length "
                f"(at most {MAX_SEQUENCE_LENGTH_LIMIT})"
            )
        if len(prompt_ids) <= budget:
            continue
        removed = tokenizer.decode(prompt_ids[budget:])
        out[i] = prompt[: -len(removed)] if removed and prompt.endswith(removed) else prompt
        logger.warning(
            "Prompt %d is longer than max_sequence_length=%d tokens with its image's %d; %d characters were cut: %r",
            i,
            max_sequence_length,
            count,
            len(removed),
            abbreviated(removed),
        )
    return out


def encode_qwen(
    tokenizer,
    text_encoder,
    prompts: list[str],
    prefix_len: int,
    max_sequence_length: int,
    device: torch.device,
    dtype: torch.dtype,
    template: str = VIDEO_PROMPT_TEMPLATE,
    images: QwenImages | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states of the templated prompts with the first ``prefix_len`` tokens cropped, and
    ``cu_seqlens``. With ``images`` (the editing model: one per prompt) Qwen2.5-VL's vision tower sees them."""
    if images is None:
        texts = truncate_prompts(tokenizer, [template.format(p) for p in prompts], prefix_len, max_sequence_length)
    else:
        prompts = truncate_edit_prompts(tokenizer, prompts, images, prefix_len, max_sequence_length)
        texts = images.expand([template.format(p) for p in prompts])
    inputs = tokenizer(
        text=texts,
        max_length=prefix_len + max_sequence_length,
        truncation=True,
        return_tensors="pt",
        padding=True,
        padding_side="right",
    ).to(device)
    # The base model, not the language-model head: its logits are never used (and block offload leaves it on the
    # host). The hidden states are the same.
    if images is None:
        # Padding is on the right and the encoder is causal, so real tokens never see it; like the reference we
        # pass no attention mask, which keeps even the padding positions' states equal to the reference's.
        hidden = text_encoder.model(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states[-1]
    else:
        # As diffusers passes the processor's output: the mask, and the token types from which transformers
        # computes the image tokens' 3D rotary positions.
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        hidden = text_encoder.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=images.pixel_values.to(device=device, dtype=text_encoder.dtype),
            image_grid_thw=images.image_grid_thw.to(device),
            mm_token_type_ids=(inputs["input_ids"] == image_token_id).int(),
            output_hidden_states=True,
        ).hidden_states[-1]
    embeds = hidden[:, prefix_len:]
    lengths = inputs["attention_mask"][:, prefix_len:].sum(1)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, dim=0), (1, 0)).to(torch.int32)
    return embeds.to(dtype), cu_seqlens


def encode_clip(tokenizer_2, text_encoder_2, prompts: list[str], device: torch.device, dtype: torch.dtype):
    """CLIP's pooled output for the bare prompts, padded and truncated to CLIP's context length."""
    inputs = tokenizer_2(
        prompts,
        max_length=text_encoder_2.config.max_position_embeddings,
        truncation=True,
        add_special_tokens=True,
        padding="max_length",
        return_tensors="pt",
    ).to(device)
    return text_encoder_2(**inputs).pooler_output.to(dtype)
