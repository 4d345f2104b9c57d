"""Prompt expansion: a short request rewritten, by the Qwen2.5-VL text encoder itself, into the kind of long, detailed
caption the Kandinsky 5 models were trained on.

The original repository expands every prompt with the 7B Qwen2.5-VL it already holds for text encoding (an
instruction, a few example captions, up to 256 new tokens, effectively greedy decoding). This module does the same
job with its own instruction and examples:

- the chat: a system message (:data:`EXPANSION_INSTRUCTION`), a few request / caption pairs as earlier turns
  (:data:`EXAMPLE_EXPANSIONS`: they show the length, the order of the aspects and the bare-answer format), then the
  request; rendered by the tokenizer's own chat template (``apply_chat_template(..., add_generation_prompt=True)``),
  or by :data:`CHATML_TEMPLATE`, the same ChatML format, for a tokenizer that has none (the tiny ones built in
  code);
- the decoding: our own loop over the base model ``text_encoder.model`` with a key/value cache, one prompt at a
  time (an expansion depends on its prompt and seed only, never on the rest of the batch), greedy by default (the
  same prompt always gives the same expansion), at most :data:`MAX_NEW_TOKENS` new tokens, a mild repetition
  penalty as in the official checkpoint's generation config; sampling (``do_sample=True``) draws from its own
  ``torch.Generator`` seeded with ``seed``, so the global random state is never touched;
- the language-model head is applied by us (``F.linear`` with its weight on the execution device) rather than by
  calling the ``lm_head`` module: block offload (runtime/block_offload.py) leaves that module on the host on purpose
  (text encoding never runs it), sequential offload would copy its 1 GB weight once per token, and
  ``transformers``' ``generate`` moves the inputs to ``model.device`` (the first parameter's: the vision tower's,
  on the host under block offload). The weight is copied to the device once per expansion when it is not there
  already and freed afterwards; no module is moved or modified, so every offload plan keeps its state.

The base model is called exactly as text encoding calls it, so the offload hooks (on the component and its direct
children) bring the text encoder in as they do for encoding.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# At most this many tokens are generated per prompt (as in the original): about 190 English words, well inside the
# default max_sequence_length of 512 tokens that text encoding keeps.
MAX_NEW_TOKENS = 256
# Applied to every token already in the sequence (prompt included), greedy or sampled: the official checkpoint's
# generation config uses 1.05, which keeps a long caption from looping on one phrase.
REPETITION_PENALTY = 1.05
# Sampling only (``do_sample=True``): softmax temperature and nucleus mass.
SAMPLING_TEMPERATURE = 0.7
SAMPLING_TOP_P = 0.9

EXPANSION_INSTRUCTION = "\n".join(
    [
        "You turn short requests for a text-to-video model into one detailed English description of the video, "
        "written like the captions that model learned from.",
        "Write a single paragraph of plain prose, about 80 to 150 words, in the present tense. Cover, where they "
        "apply and in this order:",
        "- the place and the time of day;",
        "- the main characters or objects and how they look;",
        "- what happens, action by action, in the order it happens, and how fast or calm the motion is;",
        "- the camera: static or moving (pan, tilt, tracking, zoom), its angle and framing, whether it follows the "
        "subject;",
        "- the light, the colours and the mood;",
        "- the visual style: live-action footage, amateur video, animation, video game, screen recording, and any "
        "visual effects or transitions.",
        "Keep everything the request states (subjects, their number, colours, words to be shown, style) and "
        "contradict none of it; invent only details that fit. If the request is not in English, describe it in "
        "English.",
        "Answer with the description alone: no title, no quotation marks, no list, no comment.",
    ]
)

# (request, expansion) pairs shown to the model as earlier turns of the chat: our own, in the training captions' style.
EXAMPLE_EXPANSIONS: tuple[tuple[str, str], ...] = (
    (
        "a kid flying a kite on the beach",
        "On a wide sandy beach under a pale blue sky streaked with thin clouds, a small boy in a yellow raincoat and "
        "rolled-up jeans runs along the waterline holding the string of a red diamond-shaped kite. The kite climbs "
        "and dips in the strong wind, its long ribbon tail twisting behind it. The boy slows down, looks up and "
        "laughs, then pulls the string so that the kite rises higher while shallow waves wash over his bare feet. "
        "The camera tracks him from the side at waist height, then tilts up to follow the kite against the sky. "
        "Bright afternoon daylight and soft shadows give the scene a fresh, cheerful mood. Realistic, professionally "
        "shot footage with a shallow depth of field.",
    ),
    (
        "old man fixing a bicycle",
        "In a cramped garage workshop lined with shelves of paint tins, coiled cables and hanging tools, an elderly "
        "man with a white beard, round glasses and a faded blue work jacket kneels beside an upturned green bicycle. "
        "He spins the rear wheel with one hand, stops it, and tightens a bolt on the hub with a small wrench, his "
        "movements slow and practised. He then wipes his fingers on a rag tucked into his pocket and spins the wheel "
        "again, watching it turn smoothly. The camera stays static in a medium close-up at his eye level, keeping his "
        "hands and the wheel in the centre of the frame. Warm tungsten light from a single bulb leaves the corners "
        "in shadow and gives a quiet, nostalgic atmosphere. Naturalistic documentary-style footage.",
    ),
    (
        "neon city at night in the rain, anime style",
        "A narrow street in a futuristic city at night, packed with glowing pink, cyan and violet neon signs in "
        "unreadable characters, stretches between tall buildings while heavy rain falls. A girl with short silver "
        "hair and a transparent umbrella walks away from the viewer past noodle stalls whose steam drifts into the "
        "light, and a small tram slides across the far end of the street. Puddles on the asphalt reflect the signs "
        "and ripple under the falling drops. The camera moves slowly forward at street level behind the girl, "
        "slightly below her shoulder height. Saturated colours, strong reflections and a dreamy, melancholic mood. "
        "Hand-drawn 2D anime animation with soft glow effects and detailed painted backgrounds.",
    ),
)

# Qwen's chat format (ChatML) for text-only messages: used only when the tokenizer carries no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def expansion_messages(prompt: str) -> list[dict[str, str]]:
    """The chat that asks for ``prompt``'s expansion: the instruction, the example turns, the request."""
    messages = [{"role": "system", "content": EXPANSION_INSTRUCTION}]
    for request, expansion in EXAMPLE_EXPANSIONS:
        messages += [{"role": "user", "content": request}, {"role": "assistant", "content": expansion}]
    messages.append({"role": "user", "content": prompt.strip()})
    return messages


def chat_template_kwargs(tokenizer) -> dict:
    """No override when the tokenizer has its own chat template; else :data:`CHATML_TEMPLATE`."""
    if getattr(tokenizer, "chat_template", None):
        return {}
    logger.info("The tokenizer has no chat template; prompt expansion uses Qwen's ChatML format")
    return {"chat_template": CHATML_TEMPLATE}


def expansion_text(tokenizer, prompt: str) -> str:
    """The rendered chat for ``prompt``, ending with the assistant's turn opened."""
    return tokenizer.apply_chat_template(
        expansion_messages(prompt), add_generation_prompt=True, tokenize=False, **chat_template_kwargs(tokenizer)
    )


def expansion_input_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of :func:`expansion_text` (the template holds the special tokens: none are added)."""
    return list(tokenizer(expansion_text(tokenizer, prompt), add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer) -> set[int]:
    """Tokens that end an answer: Qwen's ``<|im_end|>`` (the tokenizer's eos) and ``<|endoftext|>`` (its pad), as
    in the official generation config."""
    ids = set()
    for token in (tokenizer.eos_token, tokenizer.pad_token, "<|im_end|>", "<|endoftext|>"):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def logits_processors(do_sample: bool):
    """The score transforms of one decoding step (``transformers``' own, as ``generate`` would apply them)."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(REPETITION_PENALTY)])
    if do_sample:
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        processors += [TemperatureLogitsWarper(SAMPLING_TEMPERATURE), TopPLogitsWarper(SAMPLING_TOP_P)]
    return processors


def _cache_keyword(base_model) -> str:
    """The key/value cache argument of the base model's forward: ``cache`` (recent transformers 5 releases), else
    ``past_key_values`` (the earlier ones)."""
    return "cache" if "cache" in inspect.signature(base_model.forward).parameters else "past_key_values"


class LanguageModelHead:
    """``text_encoder.lm_head`` applied functionally, its weight on the hidden states' device: copied there once
    (on first use) when it rests elsewhere, the module itself untouched."""

    def __init__(self, lm_head: torch.nn.Module):
        self.module = lm_head
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.module, torch.nn.Linear):  # not a plain linear layer (quantized): run it as it is
            return self.module(hidden).float()
        if self.weight is None or self.weight.device != hidden.device:
            self.weight = self.module.weight.detach().to(hidden.device)
            bias = self.module.bias
            self.bias = None if bias is None else bias.detach().to(hidden.device)
        return F.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()


@torch.no_grad()
def generate_expansion_ids(
    tokenizer,
    text_encoder,
    input_ids: list[int],
    device: torch.device,
    max_new_tokens: int = MAX_NEW_TOKENS,
    do_sample: bool = False,
    seed: int | None = None,
    head: LanguageModelHead | None = None,
    before_step: Callable[[], None] | None = None,
) -> list[int]:
    """The new tokens the text encoder generates after ``input_ids`` (a stop token ends them and is left out).

    ``before_step`` is called before every model call (a run's cancellation check: it may raise)."""
    base_model = text_encoder.model
    head = head or LanguageModelHead(text_encoder.get_output_embeddings())
    from transformers import DynamicCache

    cache_keyword = _cache_keyword(base_model)
    cache = DynamicCache()
    processors = logits_processors(do_sample)
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stops = stop_token_ids(tokenizer)
    sequence = torch.tensor([input_ids], dtype=torch.long, device=device)
    step_ids = sequence
    new_ids: list[int] = []
    while len(new_ids) < max_new_tokens:
        if before_step is not None:
            before_step()
        start = sequence.shape[1] - step_ids.shape[1]
        positions = torch.arange(start, sequence.shape[1], device=device)[None]
        hidden = base_model(
            input_ids=step_ids, position_ids=positions, use_cache=True, **{cache_keyword: cache}
        ).last_hidden_state
        scores = processors(sequence, head(hidden[:, -1]))
        if do_sample:
            next_id = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)
        else:
            next_id = scores.argmax(dim=-1, keepdim=True)
        token = int(next_id.item())
        if token in stops:
            break
        new_ids.append(token)
        step_ids = next_id
        sequence = torch.cat([sequence, next_id], dim=1)
    return new_ids


def decode_expansion(tokenizer, new_ids: list[int]) -> str:
    """The generated text, stripped (of white space and of quotation marks around all of it)."""
    text = tokenizer.decode(new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def check_expansion_arguments(max_new_tokens: int, do_sample: bool, seed: int | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"`do_sample` must be True or False, got {do_sample!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"`seed` must be an integer or None, got {seed!r}")


@torch.no_grad()
def expand_prompts(
    tokenizer,
    text_encoder,
    prompts: list[str],
    device: torch.device,
    max_new_tokens: int = MAX_NEW_TOKENS,
    do_sample: bool = False,
    seed: int | None = None,
    before_step: Callable[[], None] | None = None,
) -> list[str]:
    """Each prompt rewritten as a detailed video caption by ``text_encoder`` (Qwen2.5-VL), in order.

    Greedy by default: the same prompt gives the same expansion. ``do_sample=True`` samples (temperature
    :data:`SAMPLING_TEMPERATURE`, top-p :data:`SAMPLING_TOP_P`); with a ``seed`` each prompt's draw is seeded with
    it, so a prompt and a seed give the same expansion in any batch. At most ``max_new_tokens`` tokens are
    generated per prompt. An empty answer leaves the prompt as it was (with a warning). ``before_step`` is called
    before every model call (e.g. ``RunControl.raise_if_cancelled``).
    """
    check_expansion_arguments(max_new_tokens, do_sample, seed)
    device = torch.device(device)
    head = LanguageModelHead(text_encoder.get_output_embeddings())
    expanded = []
    for prompt in prompts:
        input_ids = expansion_input_ids(tokenizer, prompt)
        new_ids = generate_expansion_ids(
            tokenizer, text_encoder, input_ids, device, max_new_tokens, do_sample, seed, head, before_step
        )
        text = decode_expansion(tokenizer, new_ids)
        if not text:
            logger.warning("Prompt expansion returned nothing for %r; the prompt is used as it is", prompt)
            text = prompt
        expanded.append(text)
    return expanded
