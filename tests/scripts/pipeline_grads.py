"""Test-only worker script: one pipelined forward/backward of a fixed batch; every
stage writes the gradients of its parameters (named as in the full model) to
RUN_DIR/grads-<rank>.json for the test to compare with the unsplit model."""

import json

import torch
import torch.nn.functional as F

import tessera
from pipeline_model import batch, make_model  # this script's folder is on sys.path

session = tessera.init()
torch.set_num_threads(1)
full = make_model()
model = tessera.distribute(full, "sgd", lr=0.1, loss_fn=F.mse_loss)
x, y = batch()
loss = model.compute_gradients((x,), y)
grads = {name: p.grad.tolist() for name, p in full.named_parameters() if p.grad is not None}
(session.run_dir / f"grads-{tessera.rank()}.json").write_text(
    json.dumps({"grads": grads, "loss": loss}))
tessera.finish(steps=1)
