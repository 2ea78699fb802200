"""Tier 1: the wire schema (tessera.transport.wire) and tensor frames (frames.py).

Anything a peer sends must either decode into one known struct or raise
:class:`WireError`; never another exception, never an unpickle.
"""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.config.schema import OptimizerConfig
from tessera.ps.optim import spec_from_config
from tessera.transport import wire
from tessera.transport.frames import frame_to_tensor, itemsize, tensor_to_frame, torch_dtype
from tessera.transport.wire import MAX_HEADER_BYTES, WIRE_DTYPES, WireError, decode, encode

LAYOUT = [wire.ParamSpec(name="fc.weight", shape=[3, 4], numel=12),
          wire.ParamSpec(name="fc.bias", shape=[3], numel=3)]
PARTS = [wire.PartitionInfo(0, 0, 8, 0), wire.PartitionInfo(1, 8, 15, 1)]

EVERY_MESSAGE = [
    wire.Register(req=1, role="worker", rank=0, host="127.0.0.1", pid=42, address="",
                  layout=LAYOUT, optimizer=spec_from_config(OptimizerConfig(name="adam", lr=1e-3, betas=(0.8, 0.9)))),
    wire.Register(req=2, role="server", rank=1, host="127.0.0.1", pid=43,
                  address="tcp://127.0.0.1:5000"),
    wire.ClusterView(req=3, processes=[wire.ProcessInfo(role="server", rank=0, host="127.0.0.1",
                                                        pid=1, address="tcp://127.0.0.1:1")],
                     partitions=PARTS, layout=LAYOUT,
                     optimizer=spec_from_config(OptimizerConfig(name="sgd", momentum=0.9, nesterov=True))),
    wire.Heartbeat(req=4, role="worker", rank=3),
    wire.HeartbeatAck(req=5, state="failed", reason="server 1 died"),
    wire.Finished(req=6, role="server", rank=0, stats={"pushes": 3, "apply_s": 0.25,
                                                       "note": "x", "none": None}),
    wire.Ack(req=7),
    wire.Error(req=8, message="server 0: nope"),
    wire.InitParams(req=9, partitions=[0, 1], dtype="float32"),
    wire.Pull(req=10, worker=1, partitions=[1], clock=4, dtype="bfloat16"),
    wire.Pull(req=13, worker=0, partitions=[0, 1], clock=2, commit=False),
    wire.Pull(req=14, worker=1, partitions=[2], clock=5, agree=17, clip=0.5, norm_type=2.0),
    wire.Word(req=8, worker=1, clock=6, overflow="2.bias"),
    wire.Judged(req=0, sender=1, clock=4, partitions=[3, 4], finite=[True, False],
                norms=[0.25, 0.0]),
    wire.Push(req=11, worker=0, seq=12, clock=3, partitions=[0], dtype="float16"),
    wire.Push(req=14, worker=1, seq=2, clock=0, partitions=[1], dtype="float16", scale=1024.0,
              nonfinite="fc.weight"),
    wire.Push(req=15, worker=1, seq=3, clock=2, partitions=[1], dtype="float16", scale=64.0,
              judged=True, pending=True, nonfinite="2.bias"),
    wire.Params(req=12, partitions=[0, 1], clock=5),
    wire.Params(req=15, partitions=[1], clock=6, skipped=True),
    wire.Verdict(req=16, partitions=[0], clock=3, finite=False,
                 overflows=[wire.Overflow(worker=1, param="fc.bias")]),
    wire.TimeSync(req=17, t0_ns=1_700_000_000_000_000_000),
    wire.TimeSyncAck(req=18, t1_ns=1_700_000_000_000_000_123),
    wire.PullRows(req=19, worker=1, table="user", clock=3, dtype="bfloat16"),
    wire.Rows(req=20, table="user", clock=3),
    wire.PushRows(req=21, worker=0, seq=9, clock=3, table="item", scale=2.0),
    wire.DumpRows(req=31, table="item"),
    wire.OptimState(req=33, partitions=[0, 1]),
    wire.OptimState(req=34, partitions=[2], load=True, names=[["step", "exp_avg"]],
                    scalar=[[True, False]]),
    wire.SnapshotTables(req=32, clock=40),
    wire.CheckpointSaved(req=33, rank=0, clock=40, file="worker-0.safetensors", nbytes=64,
                         role="worker"),
    wire.Departed(req=22, role="worker", rank=1, reason="killed by SIGKILL"),
    wire.CheckpointNow(req=23),
    wire.CheckpointSaved(req=24, rank=1, clock=20, file="server-1.safetensors", nbytes=4096),
    wire.Replicated(req=27, rank=2, backup=0, partitions=[1, 2]),
    wire.Scale(req=28, servers=3),
    wire.Moved(req=29, rank=1, target=0, partitions=[1, 3, -2]),
    wire.Join(req=25, worker=1, incarnation=2, clock=40, partitions=[0, 1], dtype="bfloat16"),
    wire.Replicate(req=26, kind="grad", partitions=[1], clock=7, pushes=2),
    wire.Replicate(req=27, kind="grad", partitions=[0], clock=3, pushes=1, worker=1, seq=5),
    wire.HeartbeatAck(req=28, state="running", checkpoint=True, departed={1: 0},
                      dead_servers=[0]),
    wire.ClusterView(req=29, processes=[], partitions=PARTS, layout=LAYOUT,
                     optimizer=spec_from_config(OptimizerConfig()), clock=20, incarnation=1,
                     restore=wire.Restore(path="memory://ck/clock-00000020", clock=20,
                                          partitions=PARTS, files=["server-0.safetensors"],
                                          epoch=1, offset=64)),
    wire.StoreOp(req=30, call="compare_set", keys=["default_pg/0//cpu//0/1"], value=b"\x00\xff",
                 expected=b"old"),
    wire.StoreOp(req=32, call="wait", keys=["a", "b"], wait_s=60.0),
    wire.StoreReply(req=33, value=b"\x01addr", number=2, found=False),
]


def test_store_op_names_only_torch_store_calls():
    frame = encode(wire.StoreOp(req=1, call="set", keys=["k"])).replace(b"set", b"pwn")
    with pytest.raises(WireError, match="malformed header"):
        decode(frame)


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frame = encode(msg)
    assert isinstance(frame, bytes)
    back = decode(frame)
    assert type(back) is type(msg)
    assert back == msg
    assert decode(memoryview(frame)) == msg


def test_fields_at_their_defaults_stay_out_of_the_header():
    """A server under many clients pays for every header byte it decodes: a push whose
    optional fields are at their defaults names only its five required ones (49 bytes,
    where all nineteen fields took 199), and decodes back to every default."""
    push = wire.Push(req=7, worker=3, seq=7, clock=7, partitions=[3])
    frame = encode(push)
    assert len(frame) < 64
    for name in ("dtype", "scale", "nonfinite", "hold", "hparams", "weight", "unused"):
        assert name.encode() not in frame
    assert decode(frame) == push
    assert decode(frame).scale == 1.0 and decode(frame).dtype == "float32"
    # a field away from its default travels
    scaled = wire.Push(req=7, worker=3, seq=7, clock=7, partitions=[3], scale=512.0)
    assert b"scale" in encode(scaled) and decode(encode(scaled)).scale == 512.0


def test_every_message_type_is_covered():
    covered = {type(m) for m in EVERY_MESSAGE}
    assert covered == set(wire.Message.__args__)


def test_every_message_of_each_plane_is_in_the_union_and_reexported():
    """wire.py assembles the planes' modules: a message added to one must decode too."""
    from tessera.transport import control_plane, data_plane, header
    tagged = set()
    for module in (header, control_plane, data_plane):
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, msgspec.Struct) \
                    and obj.__module__ == module.__name__:
                assert getattr(wire, name) is obj, f"wire.{name} is not {module.__name__}.{name}"
                if obj.__struct_config__.tag is not None:
                    tagged.add(obj)
    assert tagged == set(wire.Message.__args__)


def raw(**fields) -> bytes:
    return msgspec.msgpack.encode(fields)


@pytest.mark.parametrize("frame, fragment", [
    (b"", "malformed"),
    (b"\xc1", "malformed"),  # a msgpack byte that is never valid
    (msgspec.msgpack.encode(5), "malformed"),
    (msgspec.msgpack.encode([1, 2]), "malformed"),
    (raw(op="Pull", req="1", worker=0, partitions=[0]), "req"),
    (raw(op="Pull", req=1, worker=0, partitions="0"), "partitions"),
    (raw(op="Push", req=1, worker=0, seq=1, partitions=[0]), "clock"),
    (raw(op="Pull", req=1, worker=0, partitions=[0], extra=1), "extra"),
    (raw(op="Shutdown", req=1), "op"),
    (raw(req=1), "op"),
    (raw(op="Pull", req=1, worker=0, partitions=[0], dtype="int8"), "int8"),
    (raw(op="Push", req=1, worker=0, seq=1, clock=0, partitions=[0], dtype="float64"), "float64"),
    (raw(op="Params", req=1, partitions=[0], clock=0, dtype=""), "dtype"),
    (raw(op="ClusterView", req=1, processes=[], partitions=[], layout=[],
         optimizer={"lr": -1.0}), "lr"),
    (raw(op="ClusterView", req=1, processes=[], partitions=[[0, 1, 2]], layout=[],
         optimizer={}), "partitions"),
])
def test_decode_refuses(frame, fragment):
    with pytest.raises(WireError, match=fragment):
        decode(frame)


def test_oversized_header():
    msg = wire.Error(req=1, message="x" * MAX_HEADER_BYTES)
    frame = encode(msg)
    with pytest.raises(WireError, match="exceeds"):
        decode(frame)
    # The limit is on size alone, checked before any decoding.
    with pytest.raises(WireError, match=str(MAX_HEADER_BYTES)):
        decode(b"\x00" * (MAX_HEADER_BYTES + 1))


def test_every_wire_dtype_is_accepted():
    for dtype in WIRE_DTYPES:
        msg = wire.Pull(req=1, worker=0, partitions=[0], dtype=dtype)
        assert decode(encode(msg)).dtype == dtype
        assert torch_dtype(dtype).itemsize == itemsize(dtype)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_wire_error(data):
    try:
        msg = decode(data)
    except WireError:
        return
    assert type(msg) in wire.Message.__args__


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children,
                                                                      max_size=3),
    max_leaves=4)
_ops = st.sampled_from([cls.__name__ for cls in wire.Message.__args__] + ["Bogus", ""])
_fields = st.sampled_from(["req", "worker", "seq", "clock", "partitions", "dtype", "role", "rank",
                           "host", "pid", "layout", "optimizer", "processes", "message", "state",
                           "stats", "other"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=_ops, fields=st.dictionaries(_fields, _values, max_size=5))
def test_random_headers_raise_only_wire_error(op, fields):
    """Headers that look almost right: a real op, plausible field names, random values."""
    data = msgspec.msgpack.encode({"op": op, **fields})
    try:
        msg = decode(data)
    except WireError:
        return
    assert type(msg).__name__ == op
    assert getattr(msg, "dtype", "float32") in WIRE_DTYPES


# ------------------------------------------------------------------ frames


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
@pytest.mark.parametrize("numel", [0, 1, 37])
def test_frame_round_trip(dtype, numel):
    torch.manual_seed(numel)
    t = torch.randn(numel).to(torch_dtype(dtype))
    frame = tensor_to_frame(t)
    assert frame.nbytes == numel * itemsize(dtype)
    # Writable buffer (no copy) and read-only bytes (as ZeroMQ hands them out).
    for buf in (bytearray(frame), bytes(frame)):
        back = frame_to_tensor(buf, dtype, numel)
        assert back.dtype == torch_dtype(dtype)
        torch.testing.assert_close(back, t, rtol=0, atol=0)


def test_frame_of_non_contiguous_tensor():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    view = base.t()
    assert not view.is_contiguous()
    back = frame_to_tensor(bytes(tensor_to_frame(view)), "float32", 24)
    torch.testing.assert_close(back, view.reshape(-1), rtol=0, atol=0)


def test_frame_is_zero_copy():
    t = torch.zeros(4)
    frame = tensor_to_frame(t)
    t[2] = 5.0
    assert np.frombuffer(frame, dtype=np.float32)[2] == 5.0


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_frame_length_mismatch(dtype):
    frame = tensor_to_frame(torch.ones(5, dtype=torch_dtype(dtype)))
    with pytest.raises(ValueError, match="expected"):
        frame_to_tensor(frame, dtype, 6)
    with pytest.raises(ValueError, match="expected"):
        frame_to_tensor(bytes(frame)[:-1], dtype, 5)
    with pytest.raises(ValueError):
        frame_to_tensor(b"", dtype, 1)


def test_send_parts_copies_small_frames_and_refuses_non_buffers_whole():
    """endpoint.send_parts: what send_multipart(copy=False) sends, frame for frame; a
    small frame is copied as it is sent (its buffer may change right after), a large one
    and a zmq.Frame go without a copy, and a part that is no buffer leaves nothing sent."""
    import numpy as np
    import zmq

    from tessera.transport.endpoint import send_parts

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://send-parts")
        b.connect("inproc://send-parts")
        small = np.arange(16, dtype=np.float32)
        large = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: above zmq.COPY_THRESHOLD
        send_parts(a, (b"head",), [memoryview(small).cast("B"), zmq.Frame(b"frame"),
                                   memoryview(large).cast("B"), small])
        small[:] = -1  # sent already: copied when sent
        got = b.recv_multipart()
        assert got[0] == b"head" and got[2] == b"frame"
        assert np.array_equal(np.frombuffer(got[1], np.float32), np.arange(16, dtype=np.float32))
        assert np.array_equal(np.frombuffer(got[3], np.float32), large)
        assert np.array_equal(np.frombuffer(got[4], np.float32), np.arange(16, dtype=np.float32))
        with pytest.raises(TypeError):
            send_parts(a, (b"head",), [b"payload", "not a buffer"])
        send_parts(a, (b"next",))
        assert b.recv_multipart() == [b"next"]  # nothing of the refused message went
        send_parts(a, (b"id", b"header"), [b"x"])
        assert b.recv_multipart() == [b"id", b"header", b"x"]
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
