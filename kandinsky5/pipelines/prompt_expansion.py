"""``pipe.expand_prompt(prompt)``: the pipeline's own Qwen2.5-VL rewrites a short prompt as a detailed video caption
(see kandinsky5/models/prompt_expansion.py for the instruction, the examples and the decoding)."""

from __future__ import annotations

import torch

from kandinsky5.models.prompt_expansion import MAX_NEW_TOKENS, expand_prompts
from kandinsky5.sampling.control import RunControl


class PromptExpansionMixin:
    """Prompt expansion for a pipeline with ``tokenizer``, ``text_encoder`` (Qwen2.5-VL) and ``_execution_device``.

    Works under every offload plan: the text encoder is brought to the device by the plan's hooks as for text
    encoding (model offload: whole; block offload: its decoder layers stream, the vision tower stays on the host),
    and the language-model head is applied with its weight copied to the device for the call (block offload
    leaves that layer on the host). Like ``encode_prompt``, a call leaves the text encoder where offloading put it:
    call ``pipe.maybe_free_model_hooks()`` afterwards to send everything back to the CPU.
    """

    @torch.no_grad()
    def expand_prompt(
        self,
        prompt: str | list[str],
        max_new_tokens: int = MAX_NEW_TOKENS,
        do_sample: bool = False,
        seed: int | None = None,
        *,
        control: RunControl | None = None,
    ) -> str | list[str]:
        """``prompt`` (one or a list) rewritten as detailed video captions of the kind the model was trained on.

        Greedy by default (the same prompt gives the same text); ``do_sample=True`` samples, reproducibly with a
        ``seed``. At most ``max_new_tokens`` new tokens per prompt. Returns a string for a string, a list for a
        list. With a ``control``, ``control.cancel()`` stops the expansion before its next token
        (:class:`~kandinsky5.sampling.control.GenerationCancelled`).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}")
        expanded = expand_prompts(
            self.tokenizer,
            self.text_encoder,
            prompts,
            self._execution_device,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            seed=seed,
            before_step=None if control is None else control.raise_if_cancelled,
        )
        return expanded[0] if isinstance(prompt, str) else expanded
