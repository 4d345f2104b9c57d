"""The tiny text components: they save and load like the real ones and tokenize the prompt template as they do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, Qwen2_5_VLForConditionalGeneration

from kandinsky5.models.text_encoders import VIDEO_PROMPT_TEMPLATE, template_prefix_length
from kandinsky5.tiny_text import (
    CLIP_MAX_LENGTH,
    QWEN_IM_END,
    QWEN_IM_START,
    QWEN_PAD_TOKEN,
    QWEN_TEMPLATE_PREFIX_TOKENS,
    build_tiny_clip_text_encoder,
    build_tiny_clip_tokenizer,
    build_tiny_qwen_text_encoder,
    build_tiny_qwen_tokenizer,
    write_tiny_text_components,
)

# The real tokenizers, beside the checkout (CI has them); only the comparison with the real tokenizer needs them.
TOKENIZERS_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tokenizers"
QWEN_HIDDEN = 32
CLIP_HIDDEN = 24
# Byte tokens, the template's merges and the special tokens; CLIP: bytes twice (plain and word-final) + 2 specials.
MAX_QWEN_VOCAB = 600
CLIP_VOCAB = 2 * 256 + 2
PROMPTS = ["A red fox jumps over a sleeping dog, cinematic lighting", "Кошка играет с клубком — 猫"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-text")
    write_tiny_text_components(root, qwen_hidden_size=QWEN_HIDDEN, clip_hidden_size=CLIP_HIDDEN, seed=0)
    return root


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_root):
    return AutoTokenizer.from_pretrained(str(tiny_root / "tokenizer"))


@pytest.fixture(scope="module")
def clip_tokenizer(tiny_root):
    return CLIPTokenizer.from_pretrained(str(tiny_root / "tokenizer_2"))


def test_layout(tiny_root):
    for folder in ("text_encoder", "text_encoder_2"):
        assert (tiny_root / folder / "config.json").is_file()
        assert (tiny_root / folder / "model.safetensors").is_file()
    for folder in ("tokenizer", "tokenizer_2"):
        assert (tiny_root / folder / "tokenizer_config.json").is_file()


def test_qwen_tokenizer_loads_as_qwen2(qwen_tokenizer):
    assert type(qwen_tokenizer).__name__ == "Qwen2Tokenizer"
    assert qwen_tokenizer.padding_side == "right"
    assert qwen_tokenizer.pad_token == QWEN_PAD_TOKEN
    assert qwen_tokenizer.eos_token == QWEN_IM_END
    assert len(qwen_tokenizer) <= MAX_QWEN_VOCAB


def test_qwen_tokenizer_matches_the_built_one(qwen_tokenizer):
    built = build_tiny_qwen_tokenizer()
    text = VIDEO_PROMPT_TEMPLATE.format(PROMPTS[0])
    assert qwen_tokenizer(text)["input_ids"] == built(text)["input_ids"]


def test_qwen_template_round_trip(qwen_tokenizer):
    special_ids = {qwen_tokenizer.convert_tokens_to_ids(t) for t in (QWEN_PAD_TOKEN, QWEN_IM_START, QWEN_IM_END)}
    assert len(special_ids) == 3 and all(i < len(qwen_tokenizer) for i in special_ids)
    for text in (VIDEO_PROMPT_TEMPLATE, *(VIDEO_PROMPT_TEMPLATE.format(p) for p in PROMPTS)):
        ids = qwen_tokenizer(text)["input_ids"]
        assert qwen_tokenizer.decode(ids) == text
        tokens = qwen_tokenizer.convert_ids_to_tokens(ids)
        # Each special token is one id, never spelt out in bytes.
        assert tokens.count(QWEN_IM_START) == 2 and tokens.count(QWEN_IM_END) == 2
        assert tokens[0] == QWEN_IM_START and tokens[-1] == QWEN_IM_END


def test_qwen_template_prefix_is_a_prefix(qwen_tokenizer):
    prefix_ids = qwen_tokenizer(VIDEO_PROMPT_TEMPLATE.split("{}")[0])["input_ids"]
    assert len(prefix_ids) == QWEN_TEMPLATE_PREFIX_TOKENS
    for prompt in PROMPTS:
        full_ids = qwen_tokenizer(VIDEO_PROMPT_TEMPLATE.format(prompt))["input_ids"]
        assert full_ids[: len(prefix_ids)] == prefix_ids
    assert template_prefix_length(qwen_tokenizer) == QWEN_TEMPLATE_PREFIX_TOKENS


@pytest.mark.skipif(not (TOKENIZERS_DIR / "qwen2_5_vl").is_dir(), reason="needs ../shared/reference/tokenizers")
def test_qwen_template_tokens_equal_the_real_tokenizers(qwen_tokenizer):
    real = AutoTokenizer.from_pretrained(str(TOKENIZERS_DIR / "qwen2_5_vl"))
    text = VIDEO_PROMPT_TEMPLATE.format("")
    tiny_tokens = qwen_tokenizer.convert_ids_to_tokens(qwen_tokenizer(text)["input_ids"])
    assert tiny_tokens == real.convert_ids_to_tokens(real(text)["input_ids"])


def test_qwen_padding(qwen_tokenizer):
    batch = qwen_tokenizer([VIDEO_PROMPT_TEMPLATE.format(p) for p in PROMPTS], padding=True, return_tensors="pt")
    short = int(batch["attention_mask"].sum(1).argmin())
    assert batch["input_ids"][short, -1] == qwen_tokenizer.pad_token_id
    assert batch["attention_mask"][short, -1] == 0 and batch["attention_mask"][short, 0] == 1


def test_clip_tokenizer(clip_tokenizer):
    assert len(clip_tokenizer) == CLIP_VOCAB
    assert clip_tokenizer.model_max_length == CLIP_MAX_LENGTH
    batch = clip_tokenizer(
        ["A Red Fox", "word " * 200], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True
    )
    for ids in batch["input_ids"]:
        assert len(ids) == CLIP_MAX_LENGTH
        assert ids[0] == clip_tokenizer.bos_token_id
    short, long = batch["input_ids"]
    assert long[-1] == clip_tokenizer.eos_token_id  # truncation keeps the closing token
    assert short[short.index(clip_tokenizer.eos_token_id) :] == [clip_tokenizer.eos_token_id] * (
        CLIP_MAX_LENGTH - short.index(clip_tokenizer.eos_token_id)
    )
    assert clip_tokenizer.decode(short, skip_special_tokens=True) == "a red fox"  # CLIP lower-cases
    assert build_tiny_clip_tokenizer()("A Red Fox")["input_ids"] == clip_tokenizer("A Red Fox")["input_ids"]


def test_qwen_text_encoder(tiny_root, qwen_tokenizer):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_root / "text_encoder")).eval()
    assert model.dtype == torch.float32
    inputs = qwen_tokenizer([VIDEO_PROMPT_TEMPLATE.format(p) for p in PROMPTS], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    assert len(hidden) == model.config.text_config.num_hidden_layers + 1
    assert hidden[-1].shape == (*inputs["input_ids"].shape, QWEN_HIDDEN)
    assert torch.isfinite(hidden[-1]).all() and hidden[-1].std() > 0


def test_clip_text_encoder(tiny_root, clip_tokenizer):
    model = CLIPTextModel.from_pretrained(str(tiny_root / "text_encoder_2")).eval()
    assert model.config.max_position_embeddings == CLIP_MAX_LENGTH
    inputs = clip_tokenizer(
        PROMPTS, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        pooled = model(**inputs).pooler_output
    assert pooled.shape == (len(PROMPTS), CLIP_HIDDEN)
    assert torch.isfinite(pooled).all()


def test_encoders_are_deterministic_from_the_seed():
    def weights(model):
        return list(model.state_dict().values())

    first, second = build_tiny_qwen_text_encoder(300, seed=3), build_tiny_qwen_text_encoder(300, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(weights(first), weights(second), strict=True))
    other = build_tiny_qwen_text_encoder(300, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(weights(first), weights(other), strict=True))
    clip_a, clip_b = (build_tiny_clip_text_encoder(CLIP_VOCAB, 16, seed=1) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(weights(clip_a), weights(clip_b), strict=True))
    # Building leaves the caller's random stream alone.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_tiny_clip_text_encoder(CLIP_VOCAB, 16, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_qwen_hidden_size_is_checked():
    with pytest.raises(ValueError, match="hidden_size"):
        build_tiny_qwen_text_encoder(300, hidden_size=30)


def test_byte_alphabet_is_the_byte_level_one():
    from tokenizers.pre_tokenizers import ByteLevel

    from kandinsky5.tiny_text import _byte_alphabet

    alphabet = _byte_alphabet()
    assert len(alphabet) == 256 and set(alphabet) == set(ByteLevel.alphabet())
    assert alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ" and alphabet[ord("a")] == "a"
