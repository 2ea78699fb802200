"""Join the job's ``torch.distributed`` group without an open listener.

The collective modes (allreduce, hybrid, pipeline) run Gloo (CPU) or NCCL (GPU)
between the workers. Three things torch would otherwise do on its own are done here:

* **Rendezvous through the coordinator.** torch's usual rendezvous is a
  ``TCPStore`` hosted by rank 0 on all interfaces, which anyone who reaches the
  port may read and write: enough to learn every rank's address, or to feed a rank
  the address of a stranger. :class:`CoordinatorStore` is a
  ``torch.distributed.Store`` whose every call is a typed
  :class:`~tessera.transport.wire.StoreOp` over this worker's authenticated
  ZeroMQ connection to the coordinator (:mod:`tessera.cluster.store` keeps the
  keys). A process without the job's secret can neither publish nor read a rank's
  address, and no worker listens for the rendezvous at all.
* **Gloo pinned to the node's address.** Left alone, Gloo binds to the address
  its hostname resolves to and advertises it: often ``127.0.0.1``, which peers on
  other hosts then dial ("connectFullMesh failed ... remote=[127.0.0.1]"), or a
  public interface for a job meant to stay local. :func:`interface_of` finds the
  interface that holds the address Tessera already binds this node's servers to
  (``cluster.host``: ``127.0.0.1`` for a local job, the route to the coordinator
  for ``tessera node``), and :func:`tessera.config.env.pin_collectives` sets
  ``GLOO_SOCKET_IFNAME`` (and ``NCCL_SOCKET_IFNAME``) to it, so a local job's
  collective listeners are on loopback only.
* **A backend every rank can use.** On CUDA, NCCL refuses two ranks on one GPU
  ("Duplicate GPU detected"), which is what two workers on a one-GPU machine are.
  Before the group forms, every worker publishes its GPU's UUID through the same
  store (a CPU worker publishes ``cpu``) and all choose alike (:func:`choose_backend`):
  Gloo on CPUs; ``cpu:gloo,cuda:nccl`` when each has its own GPU (CPU tensors, such
  as the fp16 overflow flag, go over Gloo); plain Gloo when some share one (DDP's
  all-reduce and broadcast take CUDA tensors over Gloo through host memory); and a
  one-line error for pipeline stages on a shared GPU, whose point-to-point sends of
  CUDA tensors Gloo does not carry, and for a group of CPU and GPU workers.

What this does not do: Gloo's own data connections (rank to rank, on ports
the OS picks, on that interface) are neither authenticated nor encrypted; see the
threat model in docs/architecture.md.

Every wait has a timeout: each store call gives up after ``timeout_s`` (also the
group's own timeout), and checks the job's health every 100 ms meanwhile.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import socket
import struct
import threading
from typing import Callable, Optional

import torch.distributed as dist
import zmq

from tessera.config import env as envvars
from tessera.errors import TesseraError, UsageError
from tessera.transport import wire
from tessera.transport.endpoint import ClientEndpoint

_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's (primary) IPv4 address
_IF_INET6 = "/proc/net/if_inet6"


class RendezvousError(TesseraError):
    """The group could not rendezvous: the coordinator refused, or peers never came."""


class CoordinatorStore(dist.Store):
    """``torch.distributed.Store`` kept by the coordinator (module docstring).

    Its own DEALER connection (authenticated like every other), used under a lock:
    torch may call a store from its own threads."""

    def __init__(self, ctx: zmq.Context, coordinator: str, secret: str, *, timeout_s: float,
                 check: Callable[[], None] = lambda: None):
        super().__init__()
        self.timeout_s, self._check = timeout_s, check
        self._lock = threading.Lock()
        self._ep = ClientEndpoint(ctx, coordinator, secret, "coordinator (rendezvous store)",
                                  sndtimeo_s=timeout_s)
        self._ep.wait_connected(timeout_s, check)

    def _call(self, op: str, keys=(), **fields) -> wire.StoreReply:
        wait_s = fields.get("wait_s", 0.0)
        with self._lock:
            msg, _ = self._ep.request(
                wire.StoreOp(req=self._ep.new_req(), call=op, keys=list(keys), **fields),
                timeout_s=wait_s + self.timeout_s, what=f"rendezvous store {op}",
                check=self._check)
        if isinstance(msg, wire.Error):
            raise RendezvousError(msg.message)
        if not isinstance(msg, wire.StoreReply):
            raise RendezvousError(f"coordinator answered rendezvous store {op} with "
                                  f"{type(msg).__name__}")
        return msg

    def _wait_s(self, timeout: Optional[datetime.timedelta]) -> float:
        """torch asks for up to 30 minutes (new_group's default); never wait past ours."""
        asked = self.timeout_s if timeout is None else timeout.total_seconds()
        return min(asked, self.timeout_s) if asked > 0 else self.timeout_s

    def _missing(self, keys, waited_s: float) -> RendezvousError:
        return RendezvousError(
            f"torch.distributed rendezvous: {', '.join(keys)} not published within "
            f"{waited_s:g} s: a worker of the group did not reach its rendezvous (see the "
            f"other workers' logs)")

    # torch.distributed.Store's calls ------------------------------------------------

    def set(self, key: str, value) -> None:
        self._call("set", [key], value=_bytes(value))

    def get(self, key: str) -> bytes:
        wait_s = self.timeout_s
        reply = self._call("get", [key], wait_s=wait_s)
        if not reply.found:
            raise self._missing([key], wait_s)
        return reply.value

    def add(self, key: str, amount: int) -> int:
        return self._call("add", [key], amount=int(amount)).number

    def compare_set(self, key: str, expected, desired) -> bytes:
        return self._call("compare_set", [key], expected=_bytes(expected),
                          value=_bytes(desired)).value

    def wait(self, keys, timeout: Optional[datetime.timedelta] = None) -> None:
        wait_s = self._wait_s(timeout)
        if not self._call("wait", list(keys), wait_s=wait_s).found:
            raise self._missing(list(keys), wait_s)

    def exchange(self, keys, *, publish: str = "", value: bytes = b"", readers: int = 0,
                 wait_s: Optional[float] = None) -> Optional[list[bytes]]:
        """Tessera's own call (not torch's): set ``publish`` to ``value`` for ``readers``
        later exchanges, then the values of ``keys`` once all are set, in one round trip;
        None when some were still missing after ``wait_s`` (tessera.parallel.collectives)."""
        wait = self.timeout_s if wait_s is None else wait_s
        reply = self._call("exchange", list(keys), publish=publish, value=value,
                           amount=readers, wait_s=wait)
        return list(reply.values) if reply.found else None

    def check(self, keys) -> bool:
        return bool(self._call("check", list(keys)).number)

    def delete_key(self, key: str) -> bool:
        return bool(self._call("delete_key", [key]).number)

    def num_keys(self) -> int:
        return self._call("num_keys").number

    def close(self) -> None:
        with self._lock:
            self._ep.close()


def _bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


# ------------------------------------------------------------------ interface


def _ipv4_of(name: str) -> Optional[str]:
    """The (primary) IPv4 address of interface ``name``, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            got = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:  # no IPv4 address, or the interface went away
            return None
    return socket.inet_ntoa(got[20:24])


def _ipv6_interfaces() -> dict[str, str]:
    """IPv6 address -> interface name, from /proc/net/if_inet6 (Linux); {} elsewhere."""
    try:
        with open(_IF_INET6) as f:
            rows = [line.split() for line in f]
    except OSError:
        return {}
    return {str(ipaddress.IPv6Address(bytes.fromhex(r[0]))): r[5] for r in rows if len(r) >= 6}


def interface_of(host: str) -> str:
    """The name of this node's network interface holding ``host``'s address
    (a loopback address: the loopback interface); :class:`UsageError` if none does."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise UsageError(f"cluster.host {host!r} (--host) does not resolve ({exc}); give this "
                         f"node's own address") from None
    wanted = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    names = [name for _, name in socket.if_nameindex()]
    v4 = {name: _ipv4_of(name) for name in names}
    v6 = _ipv6_interfaces()
    for name in names:
        if v4[name] and ipaddress.ip_address(v4[name]) in wanted:
            return name
    for address, name in v6.items():
        if ipaddress.ip_address(address) in wanted:
            return name
    if any(a.is_loopback for a in wanted):  # 127.0.0.2: still the loopback interface
        for name in names:
            if v4[name] and ipaddress.ip_address(v4[name]).is_loopback:
                return name
    shown = ", ".join(f"{n} {a}" for n, a in v4.items() if a) or "none with IPv4"
    raise UsageError(
        f"cluster.host {host!r} (--host) is not an address of any network interface of this "
        f"node (interfaces: {shown}); Gloo binds to the interface holding it, so give this "
        f"node's own address")


# ------------------------------------------------------------------ the group


def gpu_identity(device) -> str:
    """This process's GPU as peers on any node can compare it: the device's UUID (its host
    and index where torch gives none)."""
    import torch
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    return uuid or f"{socket.gethostname()} cuda:{index}"


#: What a worker that trains on the CPU publishes in place of a GPU's identity.
CPU = "cpu"


def choose_backend(gpus: list[str], *, p2p: bool) -> tuple[str, Optional[tuple[int, int]]]:
    """The group's backend for workers whose devices are ``gpus`` (rank order: a GPU's
    identity, or :data:`CPU`), and the first two ranks that share a GPU (None: none do).
    Every rank calls it on the same list, so all choose alike. ``p2p``: the group sends
    tensors point to point, which Gloo does not do for CUDA tensors, so a shared GPU is a
    :class:`UsageError`; so is a group of CPU and GPU workers."""
    on_cpu = [r for r, g in enumerate(gpus) if g == CPU]
    if len(on_cpu) == len(gpus):
        return "gloo", None
    if on_cpu:
        gpu = next(r for r, g in enumerate(gpus) if g != CPU)
        raise UsageError(
            f"worker {gpu} trains on a GPU ({gpus[gpu]}) but worker {on_cpu[0]} on the CPU: "
            f"every worker of an all-reduce or pipeline group must use the same kind of device "
            f"(tessera.device() gives each worker its own GPU, or the CPU where there is none)")
    first: dict[str, int] = {}
    for rank, gpu in enumerate(gpus):
        if gpu in first:
            shared = (first[gpu], rank)
            break
        first[gpu] = rank
    else:
        return "cpu:gloo,cuda:nccl", None
    if p2p:
        raise UsageError(
            f"workers {shared[0]} and {shared[1]} run on the same GPU ({gpus[shared[0]]}), and "
            f"pipeline stages send CUDA tensors over NCCL, which needs one GPU per worker: give "
            f"each worker its own GPU (tessera.device(), or cuda:LOCAL_RANK), run fewer "
            f"workers, or train on the CPU")
    return "gloo", shared


def agree_backend(store: dist.Store, rank: int, world_size: int, gpu: str, *, p2p: bool,
                  generation: int = 0, log: Callable[[str], None] = lambda line: None) -> str:
    """Publish this rank's GPU (``gpu``: :func:`gpu_identity`, or :data:`CPU`) in the store, read every
    rank's (each read waits up to the store's timeout), and return the backend
    :func:`choose_backend` picks from them: the same on every rank."""
    key = f"tessera/gpu/{generation}/"
    store.set(f"{key}{rank}", gpu.encode())
    gpus = [store.get(f"{key}{r}").decode() for r in range(world_size)]
    backend, shared = choose_backend(gpus, p2p=p2p)
    if shared and rank == 0:
        log(f"worker 0: workers {shared[0]} and {shared[1]} share GPU {gpus[shared[0]]}; "
            f"NCCL needs one GPU per worker, so the group's collectives go over Gloo "
            f"(through host memory: slower; give each worker its own GPU for NCCL)")
    return backend


def join_process_group(ctx: zmq.Context, coordinator: str, secret: str, *, host: str, rank: int,
                       world_size: int, cuda_device=None, p2p: bool = False, generation: int = 0,
                       timeout_s: float, check: Callable[[], None] = lambda: None,
                       log: Callable[[str], None] = lambda line: None) -> CoordinatorStore:
    """``dist.init_process_group`` for this worker, rendezvousing through the coordinator
    and pinned to ``host``'s interface, on a backend every rank can use (module docstring;
    ``cuda_device``: this worker's ``torch.device`` when it trains on a GPU, ``p2p``: the
    group sends point to point); returns the store (the group keeps using it for
    ``new_group``)."""
    interface = interface_of(host)
    replaced = envvars.pin_collectives(interface)
    if replaced and rank == 0:
        log(f"worker 0: collectives bind to {interface} (cluster.host {host}), not "
            f"{', '.join(f'{k}={v}' for k, v in replaced.items())}")
    store = CoordinatorStore(ctx, coordinator, secret, timeout_s=timeout_s, check=check)
    gpu = CPU if cuda_device is None else gpu_identity(cuda_device)
    backend = agree_backend(store, rank, world_size, gpu, p2p=p2p, generation=generation,
                            log=log)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return store
