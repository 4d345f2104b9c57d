"""Prompt expansion on the tiny checkpoint (real Qwen2.5-VL tokenizer, random 2-layer Qwen: the text is gibberish,
the mechanics are what is tested): the chat template, determinism, the length bound, seeded sampling, equality with
``transformers``' ``generate``, and every offload plan (the LM head left on the host by block offload)."""

import logging

import pytest
import torch
from conftest import TOKENIZERS_DIR

from kandinsky5 import Kandinsky5T2VPipeline
from kandinsky5.models import prompt_expansion as pe
from kandinsky5.runtime.block_offload import Transfers
from kandinsky5.sampling.control import GenerationCancelled, RunControl

PROMPT = "A red fox runs through fresh snow"
FEW = 8  # new tokens in most tests: the mechanics, quickly
SAMPLED = 4  # fewer where a test makes many expansions (sampling sorts the whole vocabulary at every step)
# Offloading on a CPU machine: the plans' hooks run, to and from the same memory.
EXECUTION = torch.device("cpu", 0)


@pytest.fixture(scope="module")
def base(reference_checkpoint):
    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(base):
    """A pipeline over the module's networks; offloading switched on by a test is switched off after it."""
    pipe = Kandinsky5T2VPipeline(**base.components)
    yield pipe
    pipe.remove_all_hooks()


class CallRecorder:
    """Records the keyword arguments of every call of ``module`` (a forward pre-hook; nothing is replaced)."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[dict] = []
        self.handle = module.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append(dict(kwargs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def real_qwen_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZERS_DIR / "qwen2_5_vl"))


def test_checkpoint_tokenizer_carries_qwens_chat_template(pipe):
    # the tiny checkpoint's tokenizer is the real one (saved by diffusers), chat template included
    assert pipe.tokenizer.chat_template
    assert pipe.tokenizer.chat_template == real_qwen_tokenizer().chat_template
    text = pe.expansion_text(pipe.tokenizer, f"  {PROMPT} ")
    # our system message replaces Qwen's default one; the examples are earlier turns; the assistant's turn is open
    assert text.startswith(f"<|im_start|>system\n{pe.EXPANSION_INSTRUCTION}<|im_end|>\n")
    assert "You are a helpful assistant" not in text
    for request, expansion in pe.EXAMPLE_EXPANSIONS:
        assert f"<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n{expansion}<|im_end|>\n" in text
    assert text.endswith(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_without_chat_template_gets_the_same_chatml(pipe):
    from kandinsky5.tiny_text import build_tiny_qwen_tokenizer

    tiny = build_tiny_qwen_tokenizer()  # what `kandinsky5 tiny-checkpoint` writes: no chat template
    assert not tiny.chat_template
    assert pe.expansion_text(tiny, PROMPT) == pe.expansion_text(pipe.tokenizer, PROMPT)


def test_generation_starts_from_the_chat_template_ids(pipe):
    expected = pipe.tokenizer.apply_chat_template(pe.expansion_messages(PROMPT), add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    with CallRecorder(pipe.text_encoder.model) as recorder:
        pipe.expand_prompt(PROMPT, max_new_tokens=FEW)
    first = recorder.calls[0]
    assert first["input_ids"].tolist() == [expected]
    assert first["position_ids"].tolist() == [list(range(len(expected)))]
    # then one token per call, cached
    assert all(call["input_ids"].shape == (1, 1) for call in recorder.calls[1:])


def test_greedy_is_deterministic_and_equals_transformers_generate(pipe):
    from transformers import GenerationConfig

    first = pipe.expand_prompt(PROMPT, max_new_tokens=FEW)
    assert isinstance(first, str) and first
    assert pipe.expand_prompt(PROMPT, max_new_tokens=FEW) == first
    # our decoding loop makes the same tokens as transformers' generate with the same settings
    ids = pe.expansion_input_ids(pipe.tokenizer, PROMPT)
    ours = pe.generate_expansion_ids(pipe.tokenizer, pipe.text_encoder, ids, torch.device("cpu"), FEW)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=FEW,
        repetition_penalty=pe.REPETITION_PENALTY,
        eos_token_id=sorted(pe.stop_token_ids(pipe.tokenizer)),
        pad_token_id=pipe.tokenizer.pad_token_id,
    )
    theirs = pipe.text_encoder.generate(torch.tensor([ids]), generation_config=config)[0, len(ids) :]
    assert ours == theirs.tolist()
    assert first == pe.decode_expansion(pipe.tokenizer, ours)


def test_length_is_bounded_by_max_new_tokens(pipe):
    assert pe.MAX_NEW_TOKENS == 256
    for limit in (1, FEW):
        with CallRecorder(pipe.text_encoder.model) as recorder:
            text = pipe.expand_prompt(PROMPT, max_new_tokens=limit)
        assert len(recorder.calls) <= limit  # one model call per generated token
        assert len(pipe.tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit


def test_lists_are_expanded_one_by_one(pipe):
    prompts = [PROMPT, "a cat"]
    got = pipe.expand_prompt(prompts, max_new_tokens=SAMPLED)
    assert isinstance(got, list) and len(got) == 2
    # a prompt's expansion does not depend on the rest of the batch nor on its place in it
    assert pipe.expand_prompt(prompts[::-1], max_new_tokens=SAMPLED) == got[::-1]
    assert pipe.expand_prompt(prompts[1], max_new_tokens=SAMPLED) == got[1]


def test_sampling_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone(pipe):
    sample = dict(max_new_tokens=SAMPLED, do_sample=True)
    state = torch.get_rng_state()
    first = pipe.expand_prompt(PROMPT, seed=1, **sample)
    assert pipe.expand_prompt(PROMPT, seed=1, **sample) == first
    assert torch.equal(torch.get_rng_state(), state)
    assert pipe.expand_prompt(PROMPT, seed=2, **sample) != first


class CountingTransfers(Transfers):
    def __init__(self):
        self.runs: list[int] = []

    def block_runs(self, block, slot):
        self.runs.append(id(block.stack))


@pytest.mark.parametrize("plan", ["model", "sequential", "block"])
def test_expansion_under_offload_is_unchanged_and_leaves_the_lm_head_alone(pipe, plan):
    from kandinsky5.runtime.block_offload import BlockOffload

    expected = pipe.expand_prompt(PROMPT, max_new_tokens=FEW)
    lm_head = pipe.text_encoder.lm_head
    weight = lm_head.weight
    transfers = CountingTransfers()
    if plan == "model":
        pipe.enable_model_cpu_offload(device=EXECUTION)
    elif plan == "sequential":
        pipe.enable_sequential_cpu_offload(device=EXECUTION)
    else:
        pipe._enable_offload(BlockOffload, None, EXECUTION, transfers=transfers)
    with CallRecorder(pipe.text_encoder.model) as recorder:
        got = pipe.expand_prompt(PROMPT, max_new_tokens=FEW)
    assert got == expected
    assert recorder.calls[0]["input_ids"].device.type == EXECUTION.type
    if plan == "block":
        # the decoder layers streamed; the LM head module never left the host and is the same tensor
        assert id(pipe.text_encoder.model.language_model.layers) in transfers.runs
        assert lm_head.weight is weight
        assert lm_head.weight.device.type == "cpu"
    pipe.maybe_free_model_hooks()
    assert pipe.text_encoder.lm_head.weight.device.type == "cpu"


def test_language_model_head_copies_its_weight_to_the_hidden_states_device():
    layer = torch.nn.Linear(4, 6)
    head = pe.LanguageModelHead(layer)
    hidden = torch.randn(2, 4)
    assert torch.equal(head(hidden), layer(hidden))
    # hidden states elsewhere (the execution device; "meta" stands in for a GPU): the weight is copied there once,
    # the module stays where it rests
    logits = head(torch.empty(2, 4, device="meta"))
    assert logits.device.type == "meta" and logits.dtype == torch.float32
    assert head.weight.device.type == "meta" and head.bias.device.type == "meta"
    assert layer.weight.device.type == "cpu" and layer.bias.device.type == "cpu"


def test_an_empty_answer_keeps_the_prompt(pipe, caplog):
    """A Qwen whose head always says ``<|im_end|>``: nothing is generated and the prompt is kept, with a warning."""
    from kandinsky5.tiny_text import build_tiny_qwen_text_encoder

    tokenizer = pipe.tokenizer
    encoder = build_tiny_qwen_text_encoder(len(tokenizer), hidden_size=12, seed=5)
    silent = torch.nn.Linear(12, len(tokenizer))
    with torch.no_grad():
        silent.weight.zero_()
        silent.bias.zero_()
        silent.bias[tokenizer.convert_tokens_to_ids("<|im_end|>")] = 1.0
    encoder.lm_head = silent
    ids = pe.expansion_input_ids(tokenizer, PROMPT)
    assert pe.generate_expansion_ids(tokenizer, encoder, ids, torch.device("cpu"), FEW) == []
    with caplog.at_level(logging.WARNING):
        assert pe.expand_prompts(tokenizer, encoder, [PROMPT], torch.device("cpu")) == [PROMPT]
    assert "returned nothing" in caplog.text


def test_decode_strips_white_space_and_enclosing_quotes(pipe):
    ids = pipe.tokenizer('  "A fox in the snow."  ', add_special_tokens=False)["input_ids"]
    assert pe.decode_expansion(pipe.tokenizer, ids) == "A fox in the snow."


def test_cancel_stops_the_expansion_before_its_next_token(pipe):
    control = RunControl()
    handle = pipe.text_encoder.model.register_forward_hook(lambda *_: control.cancel())
    try:
        with CallRecorder(pipe.text_encoder.model) as recorder, pytest.raises(GenerationCancelled):
            pipe.expand_prompt(PROMPT, max_new_tokens=FEW, control=control)
    finally:
        handle.remove()
    assert len(recorder.calls) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(max_new_tokens=0), "`max_new_tokens` must be an integer >= 1"),
        (dict(max_new_tokens=True), "`max_new_tokens` must be an integer >= 1"),
        (dict(do_sample="yes"), "`do_sample` must be True or False"),
        (dict(seed=1.5), "`seed` must be an integer or None"),
    ],
)
def test_bad_arguments_are_refused(pipe, arguments, message):
    with pytest.raises(ValueError, match=message):
        pipe.expand_prompt(PROMPT, **arguments)
    with pytest.raises(ValueError, match="`prompt` must be a string or a non-empty list"):
        pipe.expand_prompt([])


def test_the_expanded_prompt_is_what_gets_encoded(reference_checkpoint):
    """``pipe(..., expand_prompt=True)`` gives the video of the expansion itself, not of the prompt."""
    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    small = dict(height=32, width=48, num_frames=5, num_inference_steps=1, guidance_scale=1.0, output_type="latent")

    def latents(prompt, **options):
        return pipe(prompt, generator=torch.Generator().manual_seed(0), **small, **options).frames

    expansion = pipe.expand_prompt("a cat")
    expanded = latents("a cat", expand_prompt=True)
    assert torch.equal(expanded, latents(expansion))
    assert not torch.equal(expanded, latents("a cat"))
