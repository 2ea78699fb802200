"""Pipeline model parallelism, for users: the ``Stage`` marker.

Put ``tessera.pipeline.Stage()`` between children of an ``nn.Sequential`` to say
where a new stage begins; see :mod:`tessera.parallel.pipeline`.
"""

from tessera.parallel.pipeline import PipelineParallel, Stage

__all__ = ["Stage", "PipelineParallel"]
