"""What every Tessera header shares: the tag convention, the size cap, the wire
dtypes, and the two replies both planes use (:class:`Ack`, :class:`Error`).

The messages themselves live by concern in :mod:`tessera.transport.control_plane`
(coordinator: membership, liveness, checkpoints) and
:mod:`tessera.transport.data_plane` (parameter servers: pushes, pulls, rows);
:mod:`tessera.transport.wire` assembles them into one tagged union.
"""

from __future__ import annotations

import msgspec

#: Largest header we accept. Headers hold ids and, once per job, the model's
#: parameter names and shapes (~50 bytes a tensor); a bigger one is hostile or broken.
MAX_HEADER_BYTES = 1 << 20

#: Dtypes that may appear on the wire, by their wire name.
WIRE_DTYPES = ("float32", "bfloat16", "float16")

#: Options of every message struct: decoded by its ``op`` tag (the class name), fields
#: by keyword only, unknown fields refused, a field at its default left out of the header
#: (the receiver fills it in: a push's header is 49 bytes, not 199, and is encoded and
#: decoded in a third less time, on both sides of every message).
MESSAGE = dict(tag_field="op", tag=True, kw_only=True, forbid_unknown_fields=True,
               omit_defaults=True)


class Ack(msgspec.Struct, **MESSAGE):
    req: int


class Error(msgspec.Struct, **MESSAGE):
    req: int
    message: str
