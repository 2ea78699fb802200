"""What a parameter server measures when profiling is on (``--profile``).

Counters land in the profiler's trace and its summary (:mod:`tessera.profiler`):

* ``queue_ns.w<worker>``: from the worker's send to this server taking the push,
  i.e. the wire plus the queue behind earlier messages (clocks are aligned at
  start-up, so the two machines' times compare).
* ``bytes.w<worker>``, ``bytes.p<partition>``, ``pushes``: what arrived.
* ``barrier_ns.w<worker>`` (sync): how long each worker's push waited from its
  arrival until the last worker's push of the same clock arrived; the straggler
  shows as the worker with the smallest barrier time (as in Horovod's timeline).
* ``apply_ns.p<partition>`` and an ``apply`` span, recorded by the server itself.
"""

from __future__ import annotations

from tessera.profiler.recorder import SpanRecorder
from tessera.transport import wire


def profile_push(prof: SpanRecorder, msg: wire.Push, frames: list, parts: dict,
                 sums_clock: bool) -> None:
    now = prof.now()
    if msg.sent_ns:
        prof.count(f"queue_ns.w{msg.worker}", max(0, now - msg.sent_ns))
    prof.count(f"bytes.w{msg.worker}", sum(len(f) for f in frames))
    prof.count("pushes")
    for pid, frame in zip(msg.partitions, frames):
        prof.count(f"bytes.p{pid}", len(frame))
        st = parts.get(pid)
        if st is not None and sums_clock:
            st.arrivals[msg.worker] = now


def profile_apply(prof: SpanRecorder, st, start: int, elapsed: float) -> None:
    """Partition ``st`` applied an update that began at ``start`` and took ``elapsed`` s."""
    prof.add("apply", "server", start, int(elapsed * 1e9), partition=st.info.id)
    prof.count(f"apply_ns.p{st.info.id}", elapsed * 1e9)
    # Each worker's push waited from its arrival until the last worker's arrived.
    if st.arrivals:
        last = max(st.arrivals.values())
        for worker, at in st.arrivals.items():
            prof.count(f"barrier_ns.w{worker}", last - at)
        st.arrivals.clear()
