"""A server's side of ``optimizer.state_dict()`` and ``load_state_dict()`` (server modes).

The servers run the script's ``torch.optim`` class on their partitions, so its
per-element state (Adam's moments, SGD's momentum buffer) and its scalars (``step``)
live there. A worker asks for them with :class:`~tessera.transport.wire.OptimState`
and gets each partition's state as flat float32 frames, the layout checkpoints use
(:meth:`tessera.ps.optim.TorchOptimRule.state_tensors`); worker 0 sends a loaded state
the same way. The worker maps partitions to the script's parameters
(:mod:`tessera.parallel.optim_state`).

A server checks the whole of a load before any of its partitions takes it (the worker
checked the names and sizes before sending, so servers that disagree mean a broken
peer): every partition named is held
here and has its values, each partition's names are exactly those the class keeps for
its groups (:meth:`~tessera.ps.optim.TorchOptimRule.state_kinds`: loading SGD's state
into Adam is refused, not stepped into a KeyError later), and each frame has the
partition's element count (one for a scalar; a scalar may come per element, where the
parameters' counts differ, as :meth:`~tessera.ps.optim.TorchOptimRule.state_tensors`
gives it). Not with ``--replication 2``: the backup
would keep the old state.
"""

from __future__ import annotations

import torch

from tessera.ps.consistency import RequestError
from tessera.transport import wire
from tessera.transport.frames import frame_to_tensor, raw, tensor_to_frame

#: More state names than any torch.optim class keeps (Adam with amsgrad: 4).
MAX_NAMES = 16


def answer(msg: wire.OptimState, states: list) -> tuple[wire.OptimState, list]:
    """The state of ``states`` (partitions), as a reply to ``msg`` and its frames."""
    if msg.names or msg.scalar:
        raise RequestError("a request for optimizer state carries no names")
    names, scalar, frames = [], [], []
    for st in states:
        tensors = st.rule.state_tensors() if st.rule is not None else {}
        names.append(list(tensors))
        scalar.append([t.dim() == 0 for t in tensors.values()])
        frames += [tensor_to_frame(t.detach().to(torch.float32).reshape(-1))
                   for t in tensors.values()]
    return wire.OptimState(req=msg.req, partitions=msg.partitions, names=names,
                           scalar=scalar), frames


def load(msg: wire.OptimState, states: list, frames: list, backs_up) -> None:
    """Give ``states`` (partitions) the state ``msg`` carries, once all of it is checked."""
    if len(msg.names) != len(states) or len(msg.scalar) != len(states):
        raise RequestError(f"optimizer state for {len(states)} partitions carries "
                           f"{len(msg.names)} name lists and {len(msg.scalar)} scalar lists")
    wanted = sum(len(n) for n in msg.names)
    if len(frames) != wanted:
        raise RequestError(f"optimizer state names {wanted} tensors but {len(frames)} "
                           f"payload frames were sent")
    loads, at = [], 0
    for st, names, scalar in zip(states, msg.names, msg.scalar):
        pid = st.info.id
        if st.rule is None:
            raise RequestError(f"partition {pid} has no values yet to load optimizer state for")
        if backs_up(st):
            raise RequestError("optimizer state cannot be loaded into a job with "
                               "--replication 2 yet (the backups would keep the old state)")
        if len(names) > MAX_NAMES or len(scalar) != len(names) or len(set(names)) != len(names):
            raise RequestError(f"partition {pid}: {len(names)} state names (distinct, at most "
                               f"{MAX_NAMES}) with {len(scalar)} scalar marks")
        kinds = st.rule.state_kinds()
        # A scalar (``step``) may come per element: its parameters' counts differ.
        if set(names) != set(kinds) or \
                any(is_scalar and not kinds[n] for n, is_scalar in zip(names, scalar)):
            raise RequestError(
                f"partition {pid}: optimizer state {sorted(names)} is not what the servers' "
                f"{st.rule.class_name} keeps ({sorted(kinds)}): load a state_dict of the same "
                f"optimizer class and settings")
        tensors = {}
        for name, is_scalar in zip(names, scalar):
            try:
                t = frame_to_tensor(raw(frames[at]), "float32", 1 if is_scalar else st.numel)
            except ValueError as exc:
                raise RequestError(f"partition {pid} state {name!r}: {exc}") from None
            tensors[name] = t.clone().reshape(()) if is_scalar else t.clone()
            at += 1
        loads.append((st, tensors))
    for st, tensors in loads:
        st.rule.load_state(tensors)
