"""Tiny random text encoders and tokenizers, built in code, for tiny checkpoints in the official Diffusers layout.

The official checkpoints hold Qwen2.5-VL-7B (``text_encoder/``, ``tokenizer/``) and CLIP ViT-L/14's text model
(``text_encoder_2/``, ``tokenizer_2/``). These stand-ins have the same classes, file formats and special tokens but
vocabularies of a few hundred tokens and 32-wide networks, so tests and smoke runs need neither a download nor the
real tokenizer files.

The tiny Qwen tokenizer is byte-level BPE whose merges are chosen so that the video prompt template splits into the
same 128 prefix tokens as the real tokenizer: diffusers' video pipelines crop a hard-coded 128 tokens, so a tiny video
checkpoint behaves in them exactly as a real one does (the image templates' words fall mostly to single bytes, as
prompts do). It has the real special tokens the templates use, vision ones included, and the tiny Qwen2.5-VL's config
carries their tiny ids, so an image can be shown to it as the image-editing model shows one.

The image checkpoints' ``tokenizer/`` also holds ``preprocessor_config.json``, Qwen's image processor with the real
values (:data:`QWEN_IMAGE_PROCESSOR_CONFIG`).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from kandinsky5.models.text_encoders import transformers_quietly

# Special tokens, as in the real tokenizers.
QWEN_PAD_TOKEN = "<|endoftext|>"
QWEN_IM_START = "<|im_start|>"
QWEN_IM_END = "<|im_end|>"
QWEN_VISION_START = "<|vision_start|>"
QWEN_VISION_END = "<|vision_end|>"
QWEN_IMAGE_PAD = "<|image_pad|>"
QWEN_VIDEO_PAD = "<|video_pad|>"
# In the real vocabulary's order (its ids 151643-151645, 151652, 151653, 151655, 151656); the tiny one has them last.
QWEN_SPECIAL_TOKENS = (
    QWEN_PAD_TOKEN,
    QWEN_IM_START,
    QWEN_IM_END,
    QWEN_VISION_START,
    QWEN_VISION_END,
    QWEN_IMAGE_PAD,
    QWEN_VIDEO_PAD,
)
# Qwen2_5_VLConfig's fields for the vision tokens' ids (the model finds image tokens and their positions by them).
QWEN_VISION_TOKEN_ID_FIELDS = {
    "vision_start_token_id": QWEN_VISION_START,
    "vision_end_token_id": QWEN_VISION_END,
    "image_token_id": QWEN_IMAGE_PAD,
    "video_token_id": QWEN_VIDEO_PAD,
}
CLIP_BOS_TOKEN = "<|startoftext|>"
CLIP_EOS_TOKEN = "<|endoftext|>"
CLIP_END_OF_WORD = "</w>"
CLIP_MAX_LENGTH = 77
BYTE_VALUES = 256
# The real Qwen2.5-VL tokenizer's model_max_length.
QWEN_MAX_LENGTH = 131072

# Words of the prompt template that the real Qwen2.5-VL tokenizer splits in two (byte-level spelling: "Ġ" is a space).
QWEN_TEMPLATE_SPLITS = {
    "Ġdynamism": ("Ġdynam", "ism"),
    "Ġscren": ("Ġscre", "n"),
    "Ġpostprocessing": ("Ġpost", "processing"),
}
# Tokens of the video template's prefix (before "{}") under the real tokenizer, which diffusers crops.
QWEN_TEMPLATE_PREFIX_TOKENS = 128
# Qwen2.5-VL's image processor, as the real ``preprocessor_config.json`` has it: images resized to multiples of
# patch_size * merge_size = 28 pixels with min_pixels <= area <= max_pixels, normalised with CLIP's mean and std.
QWEN_IMAGE_MIN_PIXELS = 3136
QWEN_IMAGE_MAX_PIXELS = 12845056
QWEN_PATCH_SIZE = 14
QWEN_TEMPORAL_PATCH_SIZE = 2
QWEN_MERGE_SIZE = 2
QWEN_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
QWEN_IMAGE_PROCESSOR_CONFIG = {
    "min_pixels": QWEN_IMAGE_MIN_PIXELS,
    "max_pixels": QWEN_IMAGE_MAX_PIXELS,
    "patch_size": QWEN_PATCH_SIZE,
    "temporal_patch_size": QWEN_TEMPORAL_PATCH_SIZE,
    "merge_size": QWEN_MERGE_SIZE,
    "image_mean": list(QWEN_IMAGE_MEAN),
    "image_std": list(QWEN_IMAGE_STD),
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
QWEN_IMAGE_CHANNELS = 3

# Tiny network sizes. Qwen: head_dim = hidden / heads; mrope_section splits head_dim / 2 rotary frequencies into
# (time, height, width) in the real 16:24:24 proportion.
QWEN_NUM_LAYERS = 2
QWEN_NUM_HEADS = 2
QWEN_NUM_KV_HEADS = 1
QWEN_INTERMEDIATE_MULTIPLE = 2
QWEN_ROPE_THETA = 1_000_000.0
QWEN_RMS_NORM_EPS = 1e-6
# RoPE has no position table: this is only the length the config declares (the templated prompt is ~130 + prompt).
QWEN_MAX_POSITIONS = 4096
QWEN_MROPE_PROPORTIONS = (2, 3, 3)
VISION_HIDDEN_SIZE = 16
VISION_DEPTH = 1
VISION_NUM_HEADS = 2
VISION_INTERMEDIATE_SIZE = 32
CLIP_NUM_LAYERS = 2
CLIP_NUM_HEADS = 2
CLIP_INTERMEDIATE_MULTIPLE = 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character, bytes printable in Latin-1 as themselves,
    the others (controls, space) moved to the code points after 255 in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    shift = 0
    for byte in range(BYTE_VALUES):
        if byte not in printable:
            printable.append(byte)
            codes.append(BYTE_VALUES + shift)
            shift += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def _byte_alphabet() -> list[str]:
    return [char for _, char in sorted(_bytes_to_unicode().items())]


def _merge_chain(token: str) -> list[tuple[str, str]]:
    """Merges that build ``token`` left to right: (t0, t1), (t0t1, t2), ..."""
    return [(token[: i - 1], token[i - 1]) for i in range(2, len(token) + 1)]


def _template_tokens(pre_tokenizer, template: str) -> list[str]:
    """The byte-level tokens the real tokenizer makes of ``template``'s text (special tokens left out)."""
    specials = "|".join(re.escape(token) for token in QWEN_SPECIAL_TOKENS)
    tokens = []
    for piece in re.split(specials, template.replace("{}", "")):
        for word, _ in pre_tokenizer.pre_tokenize_str(piece):
            tokens.extend(QWEN_TEMPLATE_SPLITS.get(word, (word,)))
    return tokens


def build_tiny_qwen_tokenizer():
    """A ``transformers.Qwen2Tokenizer`` over the 256 byte tokens, merges for the video prompt template's words, and
    the special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos),
    ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``, placed last as in the real one."""
    from transformers import Qwen2Tokenizer

    from kandinsky5.models.text_encoders import VIDEO_PROMPT_TEMPLATE

    alphabet = _byte_alphabet()
    byte_level = Qwen2Tokenizer(vocab={char: i for i, char in enumerate(alphabet)}, merges=[])
    merges: list[tuple[str, str]] = []
    for token in _template_tokens(byte_level.backend_tokenizer.pre_tokenizer, VIDEO_PROMPT_TEMPLATE):
        merges.extend(merge for merge in _merge_chain(token) if merge not in merges)
    vocab = {char: i for i, char in enumerate(alphabet)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=QWEN_IM_END,
        pad_token=QWEN_PAD_TOKEN,
        additional_special_tokens=[token for token in QWEN_SPECIAL_TOKENS if token != QWEN_PAD_TOKEN],
        model_max_length=QWEN_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    # BPE applies merges by rank, so one word's chain could in principle pre-empt another's: check the outcome.
    prefix_ids = tokenizer(VIDEO_PROMPT_TEMPLATE.split("{}")[0])["input_ids"]
    if len(prefix_ids) != QWEN_TEMPLATE_PREFIX_TOKENS:
        raise RuntimeError(
            f"The tiny Qwen tokenizer splits the template prefix into {len(prefix_ids)} tokens, "
            f"not the real tokenizer's {QWEN_TEMPLATE_PREFIX_TOKENS}"
        )
    return tokenizer


def qwen_vision_token_ids(tokenizer) -> dict[str, int]:
    """``Qwen2_5_VLConfig``'s vision token id fields (``image_token_id``, ...) with ``tokenizer``'s ids."""
    return {field: tokenizer.convert_tokens_to_ids(token) for field, token in QWEN_VISION_TOKEN_ID_FIELDS.items()}


def build_tiny_clip_tokenizer():
    """A ``transformers.CLIPTokenizer`` over the 256 byte tokens, each also with CLIP's end-of-word mark, no merges,
    then ``<|startoftext|>`` and ``<|endoftext|>`` (eos and pad), last as in the real one: 514 tokens."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(char + CLIP_END_OF_WORD for char in alphabet), CLIP_BOS_TOKEN, CLIP_EOS_TOKEN]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[],
        unk_token=CLIP_EOS_TOKEN,
        bos_token=CLIP_BOS_TOKEN,
        eos_token=CLIP_EOS_TOKEN,
        pad_token=CLIP_EOS_TOKEN,
        model_max_length=CLIP_MAX_LENGTH,
        padding_side="right",
    )


@contextmanager
def _seeded(seed: int):
    """Seeds torch's global generator for the block (weight initialisation draws from it), then restores it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _mrope_section(hidden_size: int) -> list[int]:
    """Rotary frequency pairs per (time, height, width) axis: head_dim / 2 in all, in QWEN_MROPE_PROPORTIONS."""
    head_dim, rest = divmod(hidden_size, QWEN_NUM_HEADS)
    if rest or head_dim % 2 or head_dim // 2 < len(QWEN_MROPE_PROPORTIONS):
        raise ValueError(
            f"hidden_size must split into {QWEN_NUM_HEADS} heads of an even size >= {2 * len(QWEN_MROPE_PROPORTIONS)}, "
            f"got {hidden_size}"
        )
    pairs, total = head_dim // 2, sum(QWEN_MROPE_PROPORTIONS)
    section = [max(1, share * pairs // total) for share in QWEN_MROPE_PROPORTIONS]
    section[-1] += pairs - sum(section)
    return section


def build_tiny_qwen_text_encoder(
    vocab_size: int,
    hidden_size: int = 32,
    seed: int = 0,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    vision_token_ids: dict[str, int] | None = None,
):
    """A randomly initialised float32 ``transformers.Qwen2_5_VLForConditionalGeneration`` with a 2-layer text model
    of width ``hidden_size`` and a 1-block vision tower with Qwen2.5-VL's real patching (14-pixel patches, 2 frames
    a patch, 2x2 patches merged into one token of width ``hidden_size``), so the real image processor feeds it.

    ``eos_token_id`` and ``pad_token_id`` are only recorded in the config (nothing here generates text); left None
    they are unset, rather than the real vocabulary's ids, which lie outside a tiny one. ``vision_token_ids`` (see
    :func:`qwen_vision_token_ids`) sets the config's ``image_token_id`` etc., by which the model places image
    features; left None they keep the real vocabulary's ids.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    mrope_section = _mrope_section(hidden_size)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=QWEN_INTERMEDIATE_MULTIPLE * hidden_size,
            num_hidden_layers=QWEN_NUM_LAYERS,
            num_attention_heads=QWEN_NUM_HEADS,
            num_key_value_heads=QWEN_NUM_KV_HEADS,
            max_position_embeddings=QWEN_MAX_POSITIONS,
            rms_norm_eps=QWEN_RMS_NORM_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": QWEN_ROPE_THETA, "mrope_section": mrope_section},
            bos_token_id=None,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        ),
        vision_config=dict(
            depth=VISION_DEPTH,
            hidden_size=VISION_HIDDEN_SIZE,
            intermediate_size=VISION_INTERMEDIATE_SIZE,
            num_heads=VISION_NUM_HEADS,
            in_channels=QWEN_IMAGE_CHANNELS,
            patch_size=QWEN_PATCH_SIZE,
            temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE,
            spatial_merge_size=QWEN_MERGE_SIZE,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[VISION_DEPTH - 1],
        ),
        tie_word_embeddings=False,  # as in the real checkpoints: lm_head is a weight of its own
        **(vision_token_ids or {}),
    )
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.float().eval()


def build_tiny_clip_text_encoder(vocab_size: int, hidden_size: int = 32, seed: int = 0):
    """A randomly initialised float32 ``transformers.CLIPTextModel``, 2 layers of width ``hidden_size``, 77 positions.

    As in CLIP's vocabulary, ``<|startoftext|>`` and ``<|endoftext|>`` are taken to be the last two ids; the pooled
    output is read at the first ``<|endoftext|>``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=CLIP_INTERMEDIATE_MULTIPLE * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=CLIP_NUM_LAYERS,
        num_attention_heads=CLIP_NUM_HEADS,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    with _seeded(seed):
        model = CLIPTextModel(config)
    return model.float().eval()


def write_qwen_image_processor_config(folder: Path) -> Path:
    """Write Qwen2.5-VL's image processor config (:data:`QWEN_IMAGE_PROCESSOR_CONFIG`) as ``folder``'s
    ``preprocessor_config.json``, as the official image checkpoints' ``tokenizer/`` holds it; return its path."""
    path = Path(folder) / IMAGE_PROCESSOR_FILE
    path.write_text(json.dumps(QWEN_IMAGE_PROCESSOR_CONFIG, indent=2) + "\n")
    return path


def write_tiny_text_components(
    root: Path, qwen_hidden_size: int, clip_hidden_size: int, seed: int = 0, *, image_processor: bool = False
) -> None:
    """Save tiny tokenizers and random text encoders into ``root/{text_encoder,tokenizer,text_encoder_2,
    tokenizer_2}`` with ``save_pretrained`` (safetensors), as in the official Diffusers checkpoints; with
    ``image_processor``, also Qwen's image processor config into ``root/tokenizer`` (the image checkpoints').

    Qwen's weights come from ``seed``, CLIP's from ``seed + 1``."""
    root = Path(root)
    tokenizer = build_tiny_qwen_tokenizer()
    tokenizer_2 = build_tiny_clip_tokenizer()
    text_encoder = build_tiny_qwen_text_encoder(
        len(tokenizer),
        hidden_size=qwen_hidden_size,
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vision_token_ids=qwen_vision_token_ids(tokenizer),
    )
    text_encoder_2 = build_tiny_clip_text_encoder(len(tokenizer_2), hidden_size=clip_hidden_size, seed=seed + 1)
    with transformers_quietly():
        tokenizer.save_pretrained(str(root / "tokenizer"))
        tokenizer_2.save_pretrained(str(root / "tokenizer_2"))
        text_encoder.save_pretrained(str(root / "text_encoder"), safe_serialization=True)
        text_encoder_2.save_pretrained(str(root / "text_encoder_2"), safe_serialization=True)
    if image_processor:
        write_qwen_image_processor_config(root / "tokenizer")
