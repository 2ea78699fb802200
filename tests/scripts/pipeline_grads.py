"""Test-only worker script: one pipelined forward/backward of a fixed batch; every
stage writes the gradients of its parameters (named as in the full model) to
RUN_DIR/grads-<rank>.json for the test to compare with the unsplit model, and the
one line a batch of another shape is refused with.

With the argument ``mismatch``, the last stage is given half the batch: the shapes
it receives are computed from its own batch, so the first stage's larger
activations are refused by Gloo, never received into a buffer a peer sized.
"""

import json
import sys

import torch
import torch.nn.functional as F

import tessera
from pipeline_model import batch, make_model  # this script's folder is on sys.path
from tessera.parallel.pipeline import PipelineConfigError

session = tessera.init()
torch.set_num_threads(1)
full = make_model()
model = tessera.distribute(full, "sgd", lr=0.1, loss_fn=F.mse_loss)
x, y = batch()
if sys.argv[1:] == ["mismatch"] and tessera.rank() == tessera.num_workers() - 1:
    x, y = x[:8], y[:8]
loss = model.compute_gradients((x,), y)
grads = {name: p.grad.tolist() for name, p in full.named_parameters() if p.grad is not None}
try:
    model.compute_gradients((x[:8],), y[:8])
    refused = None
except PipelineConfigError as exc:
    refused = str(exc)
(session.run_dir / f"grads-{tessera.rank()}.json").write_text(
    json.dumps({"grads": grads, "loss": loss, "refused": refused}))
tessera.finish(steps=1)
