"""A user's script that makes one mistake Tessera refuses (argv[1] names it); run as one
process (no launcher), it must end with one line, not a traceback."""

import sys

import torch
from torch import nn

import tessera

mistake = sys.argv[1]
model = nn.Linear(4, 2)
if mistake == "optimizer_class":  # the class, not an object
    tessera.distribute(model, torch.optim.SGD)
if mistake == "unknown_name":
    tessera.distribute(model, "sgdd", lr=0.1)
if mistake == "bad_setting":  # the string form with an optimizer object as a setting
    tessera.distribute(model, "sgd", lr=torch.optim.SGD(model.parameters(), lr=0.1))
optimizer = (torch.optim.LBFGS(model.parameters()) if mistake == "lbfgs"
             else torch.optim.SGD(model.parameters(), lr=0.1))
model, optimizer = tessera.distribute(model, optimizer)
x = torch.randn(8, 4)
model(x).sum().backward()
if mistake == "second_backward":
    model(x).sum().backward()
if mistake == "closure":
    optimizer.step(lambda: 0.0)
tessera.finish()
