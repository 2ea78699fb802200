"""Which tables ``--replication 2`` can keep on two servers (no torch: the coordinator
checks this when worker 0 registers, inside its heartbeat loop)."""

from __future__ import annotations

from tessera.transport import wire


def replication_problem(tables: list[wire.TableSpec]) -> str:
    """Why ``--replication 2`` cannot keep these tables' copies identical ('' if it can):
    the backup replays the updates, not the lookups, and admission counts, eviction
    and the row budget depend on the lookups."""
    for t in tables:
        if t.admit_after > 1 or t.evict_after or t.max_rows or t.memory_bytes:
            return (f"--replication 2 keeps a table's backup identical by replaying its "
                    f"updates, but table {t.name!r} admits, evicts or caps rows by its "
                    f"lookups (admit_after={t.admit_after}, evict_after={t.evict_after}, "
                    f"max_rows={t.max_rows}, memory_bytes={t.memory_bytes}); use --replication 1 for it, or drop those limits")
    return ""
