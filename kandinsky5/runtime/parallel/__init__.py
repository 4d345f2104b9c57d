"""Several processes (GPUs) per generation: Ulysses sequence parallelism and CFG parallelism.

- :mod:`.mesh`: :class:`ParallelConfig` (the degrees), :class:`ParallelMesh` (the process groups),
  :func:`current_mesh` / :func:`use_mesh`.
"""

from kandinsky5.runtime.parallel.mesh import (
    ParallelConfig,
    ParallelMesh,
    current_mesh,
    require_distributed,
    use_mesh,
)

__all__ = ["ParallelConfig", "ParallelMesh", "current_mesh", "require_distributed", "use_mesh"]
