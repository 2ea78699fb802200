"""``final.safetensors``: the trained model, written by worker 0 when a run ends.

The same format as ``tessera export`` (:mod:`tessera.ps.export`): the plain
module's ``state_dict`` keys, parameters and buffers, so the undistributed model
loads it with ``load_state_dict``. With asynchronous modes the worker's copy may
lag the servers by the other workers' last pushes, so it pulls the servers'
current values first (:meth:`DistributedModel.final_values`).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file


def export_final(model, path: Path) -> bool:
    """Write ``model``'s trained state to ``path``; False (nothing written) when this
    process does not hold the whole model (a pipeline stage)."""
    if not model.whole_model:
        return False
    model.final_values()
    save_file(model.export_state(), str(path), metadata={"format": "tessera-final"})
    return True
