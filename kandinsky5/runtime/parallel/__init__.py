"""Several processes (GPUs) per generation: Ulysses sequence parallelism and CFG parallelism.

- :mod:`.mesh`: :class:`ParallelConfig` (the degrees), :class:`ParallelMesh` (the process groups),
  :func:`current_mesh` / :func:`use_mesh`, :func:`broadcast_from_main`.
- :mod:`.ulysses`: :class:`UlyssesStage` (the visual-blocks wrapper that shards the tokens) and
  :class:`UlyssesExchange` (the all-to-alls at the attention choke point).
- :mod:`.cfg`: :class:`CfgParallelGuidance` (one guidance branch per rank).

The pipeline turns them on with ``pipe.enable_parallelism(ulysses_degree=None, cfg_degree=None)``.
"""

from kandinsky5.runtime.parallel.mesh import (
    ParallelConfig,
    ParallelMesh,
    broadcast_from_main,
    current_mesh,
    require_distributed,
    use_mesh,
)

__all__ = [
    "ParallelConfig",
    "ParallelMesh",
    "broadcast_from_main",
    "current_mesh",
    "require_distributed",
    "use_mesh",
]
