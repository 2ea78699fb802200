"""A user's script that makes one mistake Tessera refuses (argv[1] names it); run as one
process (no launcher), it must end with one line, not a traceback."""

import sys

import torch
from torch import nn

import tessera

mistake = sys.argv[1]
if mistake == "grad_scaler_async":  # the same script in async mode
    import msgspec

    from tessera.cluster import inprocess
    cfg = inprocess.script_config()
    inprocess.start(msgspec.structs.replace(cfg, ps=msgspec.structs.replace(cfg.ps, mode="async")))
if mistake == "copy_tables":  # an EMA of a model whose table rows live on the servers
    import copy

    import tessera.nn
    table = tessera.nn.ShardedEmbedding(10, 4, name="users", optimizer="sgd", lr=0.1)
    copy.deepcopy(tessera.distribute(nn.Sequential(table), "sgd", lr=0.1))
model = nn.Linear(4, 2)
if mistake == "sync_batchnorm":  # a DDP model converted with convert_sync_batchnorm
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(4, 4),
                                                                  nn.BatchNorm1d(4)))
if mistake == "optim_state_other_class":  # Adam's moments loaded into the servers' SGD
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 4)).sum().backward()
    adam.step()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.load_state_dict(adam.state_dict())  # torch takes it (it checks only the groups)
    tessera.distribute(model, sgd)
if mistake == "bf16_model":  # a model cast to bf16 (pure bf16 training)
    model = model.bfloat16()
if mistake == "double_buffer":  # BatchNorm's statistics in float64
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].running_mean = model[1].running_mean.double()
if mistake == "optimizer_class":  # the class, not an object
    tessera.distribute(model, torch.optim.SGD)
if mistake == "unknown_name":
    tessera.distribute(model, "sgdd", lr=0.1)
if mistake == "bad_setting":  # the string form with an optimizer object as a setting
    tessera.distribute(model, "sgd", lr=torch.optim.SGD(model.parameters(), lr=0.1))
if mistake == "unfreeze":  # frozen at distribute, made trainable after it
    model.bias.requires_grad_(False)
optimizer = (torch.optim.LBFGS(model.parameters()) if mistake == "lbfgs"
             else torch.optim.SGD(model.parameters(), lr=0.1))
net = model
model, optimizer = tessera.distribute(model, optimizer)
if mistake == "unfreeze":
    net.bias.requires_grad_(True)
if mistake == "freeze_later":  # frozen after distribute, without find_unused_parameters
    net.bias.requires_grad_(False)
if mistake == "load_after":  # weights loaded into the module after distribute
    net.load_state_dict({k: v + 1 for k, v in net.state_dict().items()})
if mistake == "clamp":  # a step, then WGAN's weight clipping: the servers' next values win
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        for p in model.parameters():
            p.clamp_(-0.01, 0.01)
if mistake == "second_model":  # a GAN's discriminator with its own optimizer
    critic = nn.Linear(2, 1)
    tessera.distribute(critic, torch.optim.Adam(critic.parameters(), lr=1e-3))
if mistake == "collective_too_big":  # a model-sized all_reduce (DDP-style averaging)
    import torch.distributed as dist
    dist.all_reduce(torch.ones(1 << 18))
if mistake == "reduce_scatter":  # a collective the server modes' group does not carry
    import torch.distributed as dist
    dist.reduce_scatter(torch.zeros(2), [torch.ones(2)])
if mistake == "reduce_scatter_tensor":  # FSDP's collective, torch's flat form
    import torch.distributed as dist
    dist.reduce_scatter_tensor(torch.zeros(2), torch.ones(2 * dist.get_world_size()))
if mistake == "add_group":
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
x = torch.randn(8, 4)
if mistake == "skip_first":  # the script's own rule skips the job's first step after backward
    model(x).sum().backward()
    optimizer.zero_grad()
if mistake.startswith("grad_scaler"):  # torch's fp16 recipe: a scaled loss, scaler.step
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(x).sum()).backward()
    if mistake == "grad_scaler_unscaled":  # unscaled before the step (to clip, say)
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    tessera.finish()
    sys.exit(0)
if mistake == "second_backward":  # accumulation that starts after the first step
    model(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    model(x).sum().backward()
model(x).sum().backward()
if mistake == "closure":
    optimizer.step(lambda: 0.0)
if mistake == "torch_clip":  # DDP's clipping: these gradients left during backward
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
if mistake == "clip_value":
    torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
if mistake == "read_grads":  # not a mistake: reading them (a logged norm) changes nothing
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm > 0 and all(p.grad is not None for p in model.parameters())
if mistake in ("torch_clip", "clip_value", "read_grads", "unfreeze", "freeze_later",
               "load_after", "clamp"):
    optimizer.step()
    optimizer.zero_grad()
tessera.finish()
