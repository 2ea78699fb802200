"""Test-only: one ParameterServer in a process of its own, for tests that attack it
from outside (tests/test_security.py).

    TESSERA_SECRET=... python tests/scripts/lone_server.py ADDRESS_FILE [options]

It binds a :class:`ServerEndpoint` on 127.0.0.1 (an OS-chosen port), holds
``--partitions`` partitions of ``--elems`` fp32 elements each, partition p being
elements ``[p * elems, (p + 1) * elems)`` of :func:`initial_values`, and
initialises them through its own socket (an ``InitParams`` from a client in this
process, as worker 0 sends it: only the wire protocol, no reaching into the
server). Then it writes its address to ADDRESS_FILE (atomically) and serves until
SIGTERM or until its parent exits. At SIGTERM it prints one JSON line on stdout:
the server's stats plus its peak and current resident memory (``vm_hwm_kb``,
``vm_rss_kb``, from /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np

# The rest (torch among it, ~2.5 s of CPU) is imported in main(): tests import
# initial_values from here without paying for it.


def initial_values(seed: int, n: int) -> np.ndarray:
    """The values the server starts from (tests recompute them to compare)."""
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)


def memory_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[f"vm_{key[2:].lower()}_kb"] = int(rest.split()[0])
    return out


def _initialise(ctx, address: str, secret: str, parts: list, values: np.ndarray, ready: Path,
                failed: list[str]) -> None:
    from tessera.transport import wire
    from tessera.transport.endpoint import ClientEndpoint
    try:
        ep = ClientEndpoint(ctx, address, secret, "itself", sndtimeo_s=30)
        ep.wait_connected(30)
        frames = [memoryview(values[p.start:p.stop]).cast("B") for p in parts]
        msg, _ = ep.request(wire.InitParams(req=1, partitions=[p.id for p in parts]), frames,
                            timeout_s=30)
        ep.close()
        if not isinstance(msg, wire.Ack):
            raise RuntimeError(f"init answered with {msg!r}")
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(address)
        tmp.rename(ready)
    except BaseException as exc:  # noqa: BLE001 - ends the server, reported on stderr
        failed.append(repr(exc))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("address_file", type=Path)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--elems", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mode", default="async")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--max-frame-bytes", type=int, default=-1)
    args = ap.parse_args()
    secret = os.environ["TESSERA_SECRET"]

    import torch
    import zmq

    from tessera.config.schema import OptimizerConfig
    from tessera.ps.server import ParameterServer, ServerHooks, ServerOptions
    from tessera.transport import wire
    from tessera.transport.endpoint import ServerEndpoint

    torch.set_num_threads(1)
    ctx = zmq.Context()
    endpoint = ServerEndpoint(ctx, "127.0.0.1", secret, max_frame_bytes=args.max_frame_bytes)
    parts = [wire.PartitionInfo(id=p, start=p * args.elems, stop=(p + 1) * args.elems, server=0)
             for p in range(args.partitions)]
    values = initial_values(args.seed, args.partitions * args.elems)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = os.getppid()
    failed: list[str] = []

    def check() -> None:
        if failed:
            raise RuntimeError(f"initialisation failed: {failed[0]}")
        if os.getppid() != parent:
            raise SystemExit("lone_server: parent exited")

    server = ParameterServer(ServerOptions(rank=0, num_workers=args.workers, mode=args.mode),
                             endpoint=endpoint, partitions=parts,
                             optimizer=OptimizerConfig(name="sgd", lr=args.lr),
                             hooks=ServerHooks(check=check, should_stop=stop.is_set))
    threading.Thread(target=_initialise, daemon=True,
                     args=(ctx, endpoint.address, secret, parts, values, args.address_file,
                           failed)).start()
    server.serve()
    endpoint.close()
    print(json.dumps({**server.stats, **memory_kb()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
