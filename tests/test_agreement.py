"""Held sync clocks decided by the servers among themselves (tessera.ps.agreement).

Real servers on loopback sockets (in this process's threads) and real clients: each
worker pushes its held partitions and sends the pull of the next clock at once, with
the clipping threshold, before any verdict is back. The servers exchange their verdicts
and apply the clipped mean (or skip the clock everywhere), as torch would in one process.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from tessera.config.schema import OptimizerConfig
from tessera.ps.agreement import KEEP_CLOCKS, decide
from tessera.ps.client import ServerError
from tessera.transport import wire
from tests import test_server_inproc
from tests.test_server_inproc import Reference, assemble, pull_all, start

make_cluster = test_server_inproc.make_cluster  # its fixture: servers in threads, on loopback

ADAM = OptimizerConfig(name="adam", lr=0.01)
SGD = OptimizerConfig(name="sgd", lr=0.1)


def _step(clients, smap, grads, clock, clip, nonfinite=("", "")):
    """Every worker: held pushes of every partition, then the agreed pull at once."""
    pushes, pulls = [], []
    for c, g, bad in zip(clients, grads, nonfinite):
        pushes.append([c.push(p.id, g[p.start:p.stop], clock, hold=True, norm_type=2.0,
                              nonfinite=bad) for p in smap.partitions])
        pulls.append(c.pull(clock=clock + 1, agree=len(smap.partitions), clip=clip))
    verdicts = [[h.wait() for h in hs] for hs in pushes]
    values = []
    for hs in pulls:
        got = {}
        for h in hs:
            got.update(h.wait())
        values.append(assemble(smap, got))
    return verdicts, values


def test_servers_agree_on_the_clipping_coefficient_without_a_commit(make_cluster):
    model, cluster, clients = start(make_cluster, mode="sync", num_workers=2, optimizer=ADAM,
                                    agree=True)
    smap = cluster.shard_map
    assert all(smap.on_server(s) for s in range(2)) and len(smap.partitions) > 2
    ref = Reference(model, ADAM)
    gen = torch.Generator().manual_seed(3)
    clipped = 0
    for clock in range(4):
        grads = [torch.randn(smap.total_elems, generator=gen) * (clock + 1) for _ in clients]
        mean = (grads[0] + grads[1]) / 2
        norm = float(mean.norm())
        clip = 12.0  # norms about 7 x (clock + 1): the later clocks clip
        clipped += norm > clip
        verdicts, values = _step(clients, smap, grads, clock, clip)
        # Each push was still answered with its partition's verdict (what unscale_() and
        # clip_grad_norm_() read), and the workers' formula gives the same norm.
        for vs in verdicts:
            assert all(isinstance(v, wire.Verdict) and v.finite for v in vs)
            _, _, total = decide({v.partitions[0]: (v.finite, v.norm) for v in vs}, clip, 2.0)
            assert total == pytest.approx(norm, rel=1e-5)
        ref.step(mean * min(1.0, clip / (norm + 1e-6)))
        for got in values:
            torch.testing.assert_close(got, ref.flat(), rtol=1e-6, atol=1e-7)
    assert 0 < clipped < 4
    torch.testing.assert_close(pull_all(clients[1], clock=4), ref.flat(), rtol=1e-6, atol=1e-7)
    for ps in cluster.servers:
        assert ps.stats["errors"] == 0 and all(st.clock == 4 for st in ps.parts.values())


def test_an_overflow_on_one_worker_skips_the_clock_on_every_server(make_cluster):
    model, cluster, clients = start(make_cluster, mode="sync", num_workers=2, optimizer=ADAM,
                                    agree=True)
    smap = cluster.shard_map
    before = pull_all(clients[0])
    grads = [torch.ones(smap.total_elems), torch.ones(smap.total_elems)]
    grads[1][smap.partitions[-1].start] = math.inf  # on server 1's last partition only
    verdicts, values = _step(clients, smap, grads, 0, 0.0, nonfinite=("", "0.weight"))
    assert not all(v.finite for v in verdicts[0])
    for got in values:  # the clock was skipped everywhere: the values did not move
        torch.testing.assert_close(got, before, rtol=0, atol=0)
    for ps in cluster.servers:
        assert ps.stats["skipped"] == len(ps.parts)
        assert all(st.clock == 1 for st in ps.parts.values())
    # The next clock is applied as usual.
    ref = Reference(model, ADAM)
    grads = [torch.full((smap.total_elems,), 0.5), torch.full((smap.total_elems,), 1.5)]
    _, values = _step(clients, smap, grads, 1, 0.0)
    ref.step((grads[0] + grads[1]) / 2)
    torch.testing.assert_close(values[0], ref.flat(), rtol=1e-6, atol=1e-7)


def test_an_agreed_pull_is_refused_in_one_line_where_servers_do_not_agree(make_cluster):
    _, cluster, clients = start(make_cluster, mode="sync", num_workers=1, optimizer=ADAM,
                                agree=False)
    with pytest.raises(ServerError, match=r"do not decide held clocks among themselves"):
        for h in clients[0].pull(clock=1, agree=3, clip=1.0):
            h.wait()


@pytest.mark.parametrize("fields, says", [
    (dict(agree=1000), "the model has"),
    (dict(agree=1, clip=-1.0), "clip must be a finite threshold"),
    (dict(agree=1, clip=math.inf), "clip must be a finite threshold"),
    (dict(agree=1, norm_type=0.0), "norm_type must be > 0"),
    (dict(agree=1, commit=True), "not both"),
])
def test_bad_agreement_fields_are_refused_naming_the_field(make_cluster, fields, says):
    _, cluster, clients = start(make_cluster, mode="sync", num_workers=1, optimizer=ADAM,
                                agree=True)
    with pytest.raises(ServerError, match=says):
        for h in clients[0].pull(clock=1, **fields):
            h.wait()
    for ps in cluster.servers:
        assert all(st.clock == 0 for st in ps.parts.values())


def test_a_server_heard_of_later_is_sent_the_kept_verdicts():
    """A server started mid-job (tessera scale) may be given a partition whose clock the
    others judged before they heard of it: they send it their kept verdicts when they do,
    once; a rank scaled away and started again is a new process and is sent them again.
    (One piece alone: the peers are recorders, not servers.)"""
    from tessera.ps.agreement import Agreement

    sent = []

    class Peer:
        def __init__(self, rank):
            self.rank = rank

        def send(self, msg):
            sent.append((self.rank, msg.clock, msg.partitions, msg.norms))

        def close(self):
            pass

    ranks = [1]
    agreement = Agreement(0, {0, 1, 2}, peers=lambda: list(ranks), connect=Peer)
    agreement.follow()  # nothing judged yet: nothing to send, no connection made
    assert sent == []
    agreement.judged(5, 0, True, 0.5)
    assert sent == [(1, 5, [0], [0.5])]
    ranks.append(2)
    agreement.follow()
    agreement.follow()
    assert sent[1:] == [(2, 5, [0], [0.5])]
    ranks.remove(2)
    agreement.follow()
    ranks.append(2)
    agreement.follow()
    assert sent[2:] == [(2, 5, [0], [0.5])]


# ------------------------------------------------------------------ judged clocks


def _judged_step(clients, smap, grads, clock, scale, words):
    """Every worker: its pushes of every partition, fp16 at ``scale``, each with the
    worker's word on its whole gradient (``Push.judged``); -> each worker's replies."""
    handles = [[c.push(p.id, (g[p.start:p.stop] * scale).to(torch.float16), clock,
                       scale=scale, nonfinite=word, judged=True) for p in smap.partitions]
               for c, g, word in zip(clients, grads, words)]
    return [[h for h in hs if h.wait() is not None] for hs in handles]


def _fp16_two_servers(make_cluster):
    """Two workers and two servers under loss scaling, every partition's clients on an
    fp16 wire, partitions on both servers; torch's Adam on the unsplit model beside them."""
    model, cluster, clients = start(make_cluster, mode="sync", num_workers=2, optimizer=ADAM,
                                    two_phase=True)
    smap = cluster.shard_map
    assert all(smap.on_server(s) for s in range(2)) and len(smap.partitions) > 2
    for c in clients:
        c.wire_dtype = "float16"
    return cluster, clients, smap, Reference(model, ADAM)


def _assert_clock_answered(handles, smap, skipped: bool, before, ref) -> None:
    """Every worker's replies to one judged clock: values, never a Verdict; all skipped or
    none; the values unmoved where skipped, else torch's step (to fp16 rounding)."""
    for hs in handles:
        assert all(isinstance(h.wait(), dict) for h in hs)
        assert {h.skipped for h in hs} == {skipped}
        got = assemble(smap, {pid: t.float() for h in hs for pid, t in h.wait().items()})
        if skipped:  # nothing moved, on either server
            torch.testing.assert_close(got, before.half().float(), rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, ref.flat().half().float(), rtol=1e-3, atol=1e-3)


def test_judged_clocks_are_applied_or_skipped_by_every_server_from_the_workers_word(
        make_cluster):
    """Loss scaling in sync mode, a step not held: each push carries its worker's word on
    the whole gradient, so the servers need no verdicts and no exchange (these do not
    agree among themselves at all) and still skip a clock all alike, with the values as
    the replies."""
    cluster, clients, smap, ref = _fp16_two_servers(make_cluster)
    gen = torch.Generator().manual_seed(5)
    scale = 1024.0
    for clock in range(3):
        grads = [torch.randn(smap.total_elems, generator=gen) for _ in clients]
        words = ("", "0.weight") if clock == 1 else ("", "")
        if clock == 1:  # worker 1 overflowed in a partition of server 1 only
            grads[1][smap.partitions[-1].start] = math.inf
        before = pull_all(clients[0], clock=clock)
        replies = _judged_step(clients, smap, grads, clock, scale, words)
        if clock != 1:
            ref.step(sum((g * scale).half().float() / scale for g in grads) / 2)
        _assert_clock_answered(replies, smap, clock == 1, before, ref)
        if clock == 1:
            for c in clients:  # the replies named who overflowed, and where
                assert {(o.worker, o.param) for o in c.take_overflows()} == {(1, "0.weight")}
    for ps in cluster.servers:
        assert ps.stats["skipped"] == len(ps.parts) and ps.stats["errors"] == 0
        assert all(st.clock == 3 for st in ps.parts.values())
        assert len(ps._words) <= KEEP_CLOCKS  # the words kept: a few clocks', not a run's
    clients[0].wire_dtype = "float32"  # the masters themselves: as torch's, to fp32 rounding
    torch.testing.assert_close(pull_all(clients[0], clock=3), ref.flat(), rtol=1e-5, atol=1e-6)


def _until(cond, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _pending_pushes(client, smap, grad, clock, scale, bad_pid=None, bad=""):
    """One worker's judged pushes of every partition as backward sends them: pending,
    each naming its own partitions' overflow (``bad`` in partition ``bad_pid``)."""
    return [client.push(p.id, (grad[p.start:p.stop] * scale).to(torch.float16), clock,
                        scale=scale, judged=True, pending=True,
                        nonfinite=bad if p.id == bad_pid else "") for p in smap.partitions]


def test_pending_judged_pushes_complete_with_every_workers_word(make_cluster):
    """fp16, sync: pushes that left during backward (``pending``) are summed at once, and
    their clock waits for every worker's word (``Word``). A worker whose gradient overflowed
    in a partition of server 1 only tells server 0 by its word alone, and both skip."""
    cluster, clients, smap, ref = _fp16_two_servers(make_cluster)
    last = smap.partitions[-1]
    assert last in smap.on_server(1) and last not in smap.on_server(0)
    gen = torch.Generator().manual_seed(9)
    scale = 512.0
    for clock in range(3):
        grads = [torch.randn(smap.total_elems, generator=gen) for _ in clients]
        word = "2.bias" if clock == 1 else ""
        if clock == 1:  # worker 1 overflowed in the last partition, on server 1 only
            grads[1][last.start] = math.inf
        before = pull_all(clients[0], clock=clock)
        handles = [_pending_pushes(c, smap, g, clock, scale, last.id, word if w else "")
                   for w, (c, g) in enumerate(zip(clients, grads))]
        states = [st for ps in cluster.servers for st in ps.parts.values()]
        _until(lambda: all(st.awaiting == {0, 1} for st in states),
               "every partition sums both pushes and awaits both words")
        for server in range(2):
            clients[0].word(server, clock, "")
        _until(lambda: all(st.awaiting == {1} for st in states), "worker 0's words are in")
        assert all(st.clock == clock for st in states)  # none completed without worker 1's
        for server in range(2):
            clients[1].word(server, clock, word)
        if clock != 1:
            ref.step(sum((g * scale).half().float() / scale for g in grads) / 2)
        _assert_clock_answered(handles, smap, clock == 1, before, ref)
        if clock == 1:
            for c in clients:  # server 0's replies too: it learned of it from the word
                assert (1, "2.bias") in {(o.worker, o.param) for o in c.take_overflows()}
    for ps in cluster.servers:
        assert ps.stats["skipped"] == len(ps.parts) and ps.stats["errors"] == 0
        assert all(st.clock == 3 and not st.awaiting for st in ps.parts.values())
    clients[0].wire_dtype = "float32"
    torch.testing.assert_close(pull_all(clients[0], clock=3), ref.flat(), rtol=1e-5, atol=1e-6)


def test_the_push_backward_finishes_with_carries_the_word_to_its_server(make_cluster):
    """A worker's last push of backward knows its word and carries it (judged, not
    pending): its server takes it for that worker's pending pushes too, and only the
    other servers wait for a Word."""
    model, cluster, clients = start(make_cluster, mode="sync", num_workers=2, optimizer=SGD,
                                    two_phase=True)
    smap = cluster.shard_map
    last = smap.partitions[-1]
    on1 = [st for st in cluster.servers[1].parts.values()]
    on0 = [st for st in cluster.servers[0].parts.values()]
    assert len(on1) > 1 and last.id in cluster.servers[1].parts
    gen = torch.Generator().manual_seed(17)
    grads = [torch.randn(smap.total_elems, generator=gen) for _ in clients]
    handles = []
    for c, g in zip(clients, grads):
        handles += [c.push(p.id, g[p.start:p.stop].half(), 0, judged=True, pending=p != last)
                    for p in smap.partitions]
    _until(lambda: all(st.awaiting == {0, 1} for st in on0), "server 0 awaits both words")
    _until(lambda: all(st.clock == 1 for st in on1), "server 1 had both words: done")
    assert all(st.clock == 0 for st in on0) and not any(st.awaiting for st in on1)
    for c in clients:
        c.word(0, 0, "")
    ref = Reference(model, SGD)
    ref.step(sum(g.half().float() for g in grads) / 2)
    got = {pid: t.float() for h in handles[:len(smap.partitions)] for pid, t in h.wait().items()}
    torch.testing.assert_close(assemble(smap, got), ref.flat(), rtol=1e-6, atol=1e-6)


def test_a_worker_dead_before_its_word_leaves_its_pending_pushes_in_the_clock(make_cluster):
    """A worker declared dead after its pending pushes and before its words: no server
    waits for them; its pushes stay in the clock's sum (as any push a worker sent before
    it died), and the one partition its own push named an overflow in skips the clock."""
    model, cluster, clients = start(make_cluster, mode="sync", num_workers=2, optimizer=SGD,
                                    two_phase=True)
    smap = cluster.shard_map
    last = smap.partitions[-1]
    before = pull_all(clients[0])
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(smap.total_elems, generator=gen) for _ in clients]
    grads[1][last.start] = math.inf  # worker 1's own overflow, in the last partition
    survivor = _pending_pushes(clients[0], smap, grads[0], 0, 1.0)
    _pending_pushes(clients[1], smap, grads[1], 0, 1.0, last.id, "2.bias")
    for server in range(2):
        clients[0].word(server, 0, "")
    states = [st for ps in cluster.servers for st in ps.parts.values()]
    _until(lambda: all(st.awaiting == {1} for st in states), "worker 1's words awaited")
    cluster.departed[1] = 0  # the coordinator's word: worker 1 (incarnation 0) died
    got = {pid: t.float() for h in survivor for pid, t in h.wait().items()}
    ref = Reference(model, SGD)
    ref.step(sum(g.half().float() for g in grads) / 2)
    for p in smap.partitions:
        expected = (before if p.id == last.id else ref.flat())[p.start:p.stop]
        torch.testing.assert_close(got[p.id], expected, rtol=1e-6, atol=1e-6)
    assert any(h.skipped for h in survivor)  # the last partition's reply says so
    for ps in cluster.servers:
        assert all(st.clock == 1 and not st.awaiting for st in ps.parts.values())
        assert ps.stats["errors"] == 0


def test_a_pending_push_after_its_word_is_not_kept_waiting(make_cluster):
    """A pending push that reaches a server after its worker's word (sent again on a
    reconnect) finds the word kept there: its clock completes without another."""
    model, cluster, clients = start(make_cluster, mode="sync", num_workers=2, optimizer=SGD,
                                    two_phase=True)
    smap = cluster.shard_map
    gen = torch.Generator().manual_seed(13)
    grads = [torch.randn(smap.total_elems, generator=gen) for _ in clients]
    for server in range(2):
        clients[0].word(server, 0, "")
    handles = _pending_pushes(clients[0], smap, grads[0], 0, 1.0)
    handles += [clients[1].push(p.id, grads[1][p.start:p.stop].half(), 0, judged=True)
                for p in smap.partitions]
    ref = Reference(model, SGD)
    ref.step(sum(g.half().float() for g in grads) / 2)
    got = {pid: t.float() for h in handles[:len(smap.partitions)] for pid, t in h.wait().items()}
    torch.testing.assert_close(assemble(smap, got), ref.flat(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("two_phase", [False, True])
def test_a_word_or_a_pending_push_out_of_place_is_refused_in_one_line(make_cluster, two_phase):
    _, cluster, clients = start(make_cluster, mode="sync", num_workers=1, optimizer=SGD,
                                two_phase=two_phase)
    part = cluster.shard_map.partitions[0]
    with pytest.raises(ServerError, match="must be judged"):
        clients[0].push(part.id, torch.zeros(part.stop - part.start), 0, pending=True).wait()
    clients[0].word(0, 0, "")  # one-way: a server not under loss scaling refuses it
    _until(lambda: cluster.servers[0].stats["errors"] == 1 + (not two_phase),
           "the Word refused (or, under loss scaling, taken)")
    for ps in cluster.servers:
        assert all(st.clock == 0 and not st.awaiting for st in ps.parts.values())

@pytest.mark.parametrize("mode, hold, says", [
    ("sync", True, "the push asks to be held"),
    ("async", False, "this server runs async"),
])
def test_a_judged_push_out_of_place_is_refused_in_one_line(make_cluster, mode, hold, says):
    _, cluster, clients = start(make_cluster, mode=mode, num_workers=1, optimizer=ADAM,
                                two_phase=True)
    part = cluster.shard_map.partitions[0]
    with pytest.raises(ServerError, match=says):
        clients[0].push(part.id, torch.zeros(part.stop - part.start), 0, scale=8.0,
                        judged=True, hold=hold).wait()
    for ps in cluster.servers:
        assert all(st.clock == 0 for st in ps.parts.values())


@pytest.mark.parametrize("held_first", [True, False], ids=["held-first", "plain-first"])
def test_a_clock_one_worker_holds_and_another_does_not_is_the_mean_clipped(make_cluster,
                                                                            held_first):
    """A restarted worker's first step is held (it cannot know whether the script clips),
    the others' are not where the script does not clip: their clock is still the mean of
    both gradients, clipped by its norm, whichever push came first (each push used to
    choose its own division, so one worker's gradient counted twice)."""
    model, cluster, clients = start(make_cluster, mode="sync", num_workers=2, optimizer=ADAM,
                                    agree=True)
    smap = cluster.shard_map
    ref = Reference(model, ADAM)
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(smap.total_elems, generator=gen) * 3 for _ in clients]
    mean = (grads[0] + grads[1]) / 2
    clip = 0.5 * float(mean.norm())  # clips: the norm is the mean's, not the sum's

    def plain():
        return [clients[0].push(p.id, grads[0][p.start:p.stop], 0) for p in smap.partitions]

    def held():
        hs = [clients[1].push(p.id, grads[1][p.start:p.stop], 0, hold=True, norm_type=2.0)
              for p in smap.partitions]
        return hs, clients[1].pull(clock=1, agree=len(smap.partitions), clip=clip)

    if held_first:
        verdicts, pulls = held()
        time.sleep(0.2)  # the servers took the held pushes first
        answers = plain()
    else:
        answers = plain()
        time.sleep(0.2)
        verdicts, pulls = held()
    norms = [h.wait() for h in verdicts]
    _, _, total = decide({v.partitions[0]: (v.finite, v.norm) for v in norms}, clip, 2.0)
    assert total == pytest.approx(float(mean.norm()), rel=1e-5)
    ref.step(mean * min(1.0, clip / (total + 1e-6)))
    got = [assemble(smap, {pid: t for h in hs for pid, t in h.wait().items()})
           for hs in (answers, pulls)]
    for values in got:
        torch.testing.assert_close(values, ref.flat(), rtol=1e-6, atol=1e-7)
    assert not any(h.skipped for h in answers)


def test_a_skipped_clock_a_held_and_a_judged_push_share_says_so_to_both(make_cluster):
    """fp16: a replacement's held first step beside a survivor's judged one, and the held
    push overflowed: skipped on every server, and the survivor's replies say so (and
    who overflowed), so both workers' loss scales halve together."""
    _, cluster, clients = start(make_cluster, mode="sync", num_workers=2, optimizer=ADAM,
                                agree=True, two_phase=True)
    smap = cluster.shard_map
    before = pull_all(clients[0])
    g = torch.ones(smap.total_elems)
    judged = [clients[0].push(p.id, g[p.start:p.stop], 0, scale=2.0, judged=True)
              for p in smap.partitions]
    held = [clients[1].push(p.id, g[p.start:p.stop], 0, scale=2.0, hold=True,
                            nonfinite="2.bias") for p in smap.partitions]
    pulls = clients[1].pull(clock=1, agree=len(smap.partitions))
    assert not any(h.wait().finite for h in held)
    for hs in (judged, pulls):
        values = assemble(smap, {pid: t for h in hs for pid, t in h.wait().items()})
        torch.testing.assert_close(values, before, rtol=0, atol=0)
    assert all(h.skipped for h in judged)
    assert {(o.worker, o.param) for o in clients[0].take_overflows()} == {(1, "2.bias")}
    for ps in cluster.servers:
        assert ps.stats["skipped"] == len(ps.parts)
