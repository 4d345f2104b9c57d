"""Ulysses sequence parallelism: ``n`` ranks share one transformer call, each holding ``1/n`` of the visual tokens.

Two pieces, no monkeypatching:

- :class:`UlyssesStage`, a ``wrap_stage("visual_blocks", ...)`` wrapper: it keeps this rank's contiguous slice of
  the token sequence as the blocks see it (after NABLA's fractal reordering, so in blocks order) and the RoPE rows of
  those tokens, runs the blocks on them inside :func:`~kandinsky5.attention.backends.sequence_exchange`, and
  all-gathers the output so every rank leaves the stage with the whole sequence. The text, the time embedding and
  the modulation are replicated (every rank computed them on the whole input); the text blocks, tiny, run
  replicated before the stage.
- :class:`UlyssesExchange`, what the stage makes current for the attention choke point
  (:func:`kandinsky5.attention.attention`): the visual self-attention's rotated query, key and value go from
  sequence shards to head shards by one all-to-all (``(b, s/n, h, d) -> (b, s, h/n, d)``), so each rank attends
  over all tokens for ``h/n`` heads (NABLA's block map is computed there, per head from the whole sequence, as a
  single process computes it), and the output comes back by a second all-to-all. Cross-attention needs no exchange:
  its keys and values come from the replicated text, and each query token attends independently.

The context reaches the attention through the stage's duration, not through a model's attributes: the wrapper
sets the exchange (a module global of the attention backends, which ``torch.compile`` guards on, like the backend
choice) for exactly the time ``run`` takes, and the visual self-attention is flagged ``sequence_parallel=True`` by
its block. The collectives run outside compiled graphs (``torch.compiler.disable``): regional compilation breaks
the graph around them.

Every rank computes the same products on the same values as a single process, except the linear layers, which see
``s/n`` rows instead of ``s`` (a matrix multiply may pick another summation order for another row count), so the
result equals the single-process one up to float rounding (see tests/test_parallel.py).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from kandinsky5.attention.backends import sequence_exchange

if TYPE_CHECKING:
    from kandinsky5.models.dit import StageRun, VisualBlocksInputs
    from kandinsky5.models.forward_context import ForwardContext


def check_heads(num_heads: int, degree: int) -> None:
    """ValueError unless ``degree`` divides the attention heads (each rank attends with ``heads / degree``)."""
    if num_heads % degree:
        raise ValueError(
            f"ulysses_degree ({degree}) must divide the transformer's attention heads ({num_heads}); choose a "
            f"divisor of {num_heads}"
        )


def check_tokens(num_tokens: int, degree: int) -> None:
    """ValueError unless ``degree`` divides the visual token count (each rank holds ``tokens / degree``)."""
    if num_tokens % degree:
        raise ValueError(
            f"ulysses_degree ({degree}) must divide the visual token count ({num_tokens} = latent frames x "
            "height / 16 x width / 16); choose another size or degree"
        )


class UlyssesExchange:
    """The all-to-alls between sequence shards and head shards over ``group`` (``degree`` ranks)."""

    def __init__(self, group: dist.ProcessGroup, degree: int):
        self.group = group
        self.degree = degree

    @torch.compiler.disable
    def to_heads(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(b, s/n, h, d)`` tensors (this rank's tokens, all heads) -> ``(b, s, h/n, d)`` (all tokens, this rank's
        heads: the ``r``-th of ``n`` equal head groups on ``ulysses_rank`` r). Tensors of one shape and dtype go in
        one all-to-all."""
        first = tensors[0]
        if all(t.shape == first.shape and t.dtype == first.dtype for t in tensors):
            return tuple(self._to_heads(torch.stack(tensors)).unbind(0))
        return tuple(self._to_heads(t.unsqueeze(0))[0] for t in tensors)

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        # x: (k, b, s/n, h, d) -> send head group j to rank j; receive token shard j from rank j
        n = self.degree
        k, b, local, heads, d = x.shape
        check_heads(heads, n)
        send = x.reshape(k, b, local, n, heads // n, d).permute(3, 0, 1, 2, 4, 5).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        # received: (n, k, b, s/n, h/n, d), the sequence shards in rank order
        return received.permute(1, 2, 0, 3, 4, 5).reshape(k, b, n * local, heads // n, d)

    @torch.compiler.disable
    def to_sequence(self, tensor: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_heads` for one ``(b, s, h/n, d)`` tensor -> ``(b, s/n, h, d)``."""
        n = self.degree
        b, seq, heads, d = tensor.shape
        send = tensor.reshape(b, n, seq // n, heads, d).permute(1, 0, 2, 3, 4).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        # received: (n, b, s/n, h/n, d), the head groups in rank order
        return received.permute(1, 2, 0, 3, 4).reshape(b, seq // n, n * heads, d)


@torch.compiler.disable
def all_gather_sequence(tensor: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """Every rank's ``(b, s/n, ...)`` shard -> the whole ``(b, s, ...)``, shards in rank order."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(degree)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=1)


class UlyssesStage:
    """The visual-blocks wrapper of Ulysses sequence parallelism (a ``StageWrapper``; see the module doc).

    ``rank``: this rank's index in ``group`` (its shard of the tokens), ``degree``: the group's size. The wrapper
    holds only that configuration; a call's state lives in the call.
    """

    def __init__(self, group: dist.ProcessGroup, rank: int, degree: int):
        self.group = group
        self.rank = rank
        self.degree = degree
        self.exchange = UlyssesExchange(group, degree)

    @classmethod
    def for_mesh(cls, mesh) -> UlyssesStage:
        """The stage of a :class:`~kandinsky5.runtime.parallel.mesh.ParallelMesh`'s Ulysses group."""
        return cls(mesh.ulysses_group, mesh.ulysses_rank, mesh.ulysses_degree)

    def shard(self, visual: torch.Tensor, inputs: VisualBlocksInputs) -> tuple[torch.Tensor, VisualBlocksInputs]:
        """This rank's contiguous slice of the tokens ``(b, s, c)`` and the inputs with its tokens' RoPE rows."""
        seq = visual.shape[1]
        check_tokens(seq, self.degree)
        local = seq // self.degree
        start = self.rank * local
        rope = inputs.rope[:, start : start + local]
        return visual[:, start : start + local], dataclasses.replace(inputs, rope=rope)

    def __call__(
        self, run: StageRun, visual: torch.Tensor, inputs: VisualBlocksInputs, *, context: ForwardContext | None
    ) -> torch.Tensor:
        local, local_inputs = self.shard(visual, inputs)
        with sequence_exchange(self.exchange):
            out = run(local, local_inputs)
        return all_gather_sequence(out, self.group, self.degree)
