"""A language model's recipe pieces that change how backward and the optimizer run: the
decoder's weight tied to the embedding (one parameter under two names), activation
checkpointing (``torch.utils.checkpoint``, reentrant: the parameters' gradients arrive
during a second forward inside backward) and ``OneCycleLR``, which moves AdamW's lr and
its ``betas[0]`` at every step. ``--plain``: the same script in one process, without
Tessera. Writes the losses, the final state_dict, lr and betas as JSON."""

import argparse
import json

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

ap = argparse.ArgumentParser()
ap.add_argument("--plain", action="store_true")
ap.add_argument("--out", required=True)
args = ap.parse_args()
STEPS, VOCAB = 12, 20


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(checkpoint(self.body, self.emb(x), use_reentrant=True))


torch.manual_seed(0)
model = TiedLM()
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
if not args.plain:
    import tessera
    model, optimizer = tessera.distribute(model, optimizer)
schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=STEPS)
losses = []
for step in range(STEPS):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randint(0, VOCAB, (16, 5), generator=g), torch.randint(0, VOCAB, (16, 5), generator=g)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()
    optimizer.step()
    schedule.step()
    losses.append(loss.item())
group = optimizer.param_groups[0]
with open(args.out, "w") as f:
    json.dump({"losses": losses, "lr": group["lr"], "betas": list(group["betas"]),
               "params": {k: v.reshape(-1).tolist() for k, v in model.state_dict().items()}}, f)
if not args.plain:
    tessera.finish()
