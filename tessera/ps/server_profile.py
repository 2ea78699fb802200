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

:class:`MessageCosts` breaks each request's server CPU into phases (decode,
validation, dedup, copy, replicate, apply, encode): the server's ``stats`` carry it
as ``cpu_us_per_msg`` when ``ServerOptions.cost_breakdown`` is on (benchmarks print
it), and a profiled server counts it as ``cpu_ns.<phase>``.
"""

from __future__ import annotations

import time

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


#: The phases of a request's server CPU that :class:`MessageCosts` tells apart.
PHASES = ("decode", "validation", "dedup", "copy", "replicate", "apply", "encode", "other")


class MessageCosts:
    """Server CPU per push or pull, by phase (``ServerOptions.cost_breakdown``).

    The serve loop calls :meth:`start` before it takes a message and :meth:`lap` after
    each phase; a lap charges the serve thread's CPU time since the previous one to its
    phase (``time.thread_time_ns``: a wall clock would charge whatever phase was running
    when the OS preempted the thread, which on a loaded machine is most of it; each lap
    costs one ``clock_gettime``, ~0.3-1 µs, only while on, and what one read costs is taken
    off each lap). ZeroMQ's I/O thread is not
    in it: the process's CPU per request minus this total is the I/O thread's share:

    * ``decode``: taking the frames off the socket and msgspec-decoding the header;
    * ``validation``: partition ids, payload lengths, the push's fields (and, under
      loss scaling, the finiteness test);
    * ``dedup``: ``(worker, seq)`` retries, stale pushes, the consistency rule's
      bookkeeping;
    * ``copy``: payload into fp32 (the clock's sum, a scale, a cast) and the master
      into reply buffers;
    * ``replicate``: forwarding an update to the backup;
    * ``apply``: the optimizer step;
    * ``encode``: building, encoding and sending the reply;
    * ``other``: the rest of the loop's turn (membership, snapshots).

    Off (the default) the server holds None instead and every lap site is one test of
    a local variable.
    """

    __slots__ = ("ns", "messages", "_t", "_cur", "clock_ns")

    def __init__(self) -> None:
        self.ns = dict.fromkeys(PHASES, 0)
        self.messages = 0
        self._t = 0
        self._cur = dict.fromkeys(PHASES, 0)
        #: What one read of the clock costs (the least of 50 back-to-back reads): taken
        #: off each lap, so that short phases are not charged the measuring itself.
        reads = [time.thread_time_ns() for _ in range(51)]
        self.clock_ns = max(0, min(b - a for a, b in zip(reads, reads[1:])))

    def start(self) -> None:
        self._t = time.thread_time_ns()

    def lap(self, phase: str) -> None:
        now = time.thread_time_ns()
        self._cur[phase] += max(0, now - self._t - self.clock_ns)
        self._t = now

    def done(self, counted: bool) -> None:
        """One request served: the rest of its turn is ``other``. Only ``counted`` ones
        (pushes and pulls) go into the totals: an init or a join is a one-off."""
        self.lap("other")
        cur = self._cur
        if counted:
            ns = self.ns
            for phase, spent in cur.items():
                ns[phase] += spent
            self.messages += 1
        self._cur = dict.fromkeys(PHASES, 0)

    def per_message_us(self) -> dict[str, float]:
        """Microseconds of CPU per request, by phase, and their total."""
        n = max(1, self.messages)
        out = {phase: round(ns / n / 1e3, 2) for phase, ns in self.ns.items()}
        out["total"] = round(sum(self.ns.values()) / n / 1e3, 2)
        return out
