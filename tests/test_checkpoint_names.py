"""A checkpoint file name from a manifest or a server's report is joined into a path: only a
server file's plain name (``server-<rank>.safetensors``) is accepted, so a tampered manifest
cannot make a resume read (or a report make a manifest name) anything outside the checkpoint."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch

from tessera.cluster.checkpoint_rounds import CheckpointRounds
from tessera.config import load_config
from tessera.ps.checkpoint import (CheckpointError, CheckpointStore, check_manifest,
                                   check_shard_name, find_resume, read_flat)
from tessera.transport import wire
from tests.harness import ROOT, run_cli

DIGITS = str(ROOT / "examples" / "digits.toml")


@pytest.mark.parametrize("name", ["server-0.safetensors", "server-12.safetensors"])
def test_plain_names_pass(name):
    assert check_shard_name(name, "here") == name


@pytest.mark.parametrize("name", [
    "../server-0.safetensors", "../../etc/passwd", "/etc/passwd", "/tmp/server-0.safetensors",
    "clock-00000010/server-0.safetensors", "server-0.safetensors/..", "server-0.safetensors\n",
    "server-0.safetensors/../../x", "..", "", "server-x.safetensors", "server-0.pt",
    "s3://bucket/server-0.safetensors", "server-0.safetensors\x00", 7, None])
def test_other_names_are_refused_in_one_line(name):
    with pytest.raises(CheckpointError) as info:
        check_shard_name(name, "manifest.json")
    text = str(info.value)
    assert "\n" not in text and "manifest.json" in text and "plain name" in text, text


def _checkpoint(root, clock=10, files=None) -> tuple[CheckpointStore, dict]:
    """A small real checkpoint: 1 server file and its manifest, as the coordinator writes it."""
    store = CheckpointStore(str(root))
    name, nbytes = store.write_shard(clock, 0, {"p0/values": torch.arange(6.0)}, {})
    manifest = {"format": 1, "clock": clock, "servers": 1, "files": files or {"0": name},
                "bytes": nbytes, "partitions": [{"id": 0, "start": 0, "stop": 6, "server": 0}],
                "layout": [], "tables": [], "data": {"epoch": 0, "offset": 0}}
    store.write_manifest(clock, manifest)
    return store, manifest


def test_a_tampered_manifest_is_refused_before_any_file_is_opened(tmp_path):
    ck = tmp_path / "ck"
    _checkpoint(ck)
    assert read_flat(str(ck))[1].tolist() == [0, 1, 2, 3, 4, 5]  # the real one reads
    # Tamper: the manifest now names a file outside the checkpoint (it exists and is a
    # valid server file, so only the name check stands in the way).
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(ck / "clock-00000010" / "server-0.safetensors", outside / "server-0.safetensors")
    path = ck / "clock-00000010" / "manifest.json"
    for evil in ("../../elsewhere/server-0.safetensors", str(outside / "server-0.safetensors")):
        manifest = json.loads(path.read_text())
        manifest["files"]["0"] = evil
        path.write_text(json.dumps(manifest))
        for read in (lambda: read_flat(str(ck)), lambda: find_resume(str(ck))):
            with pytest.raises(CheckpointError, match="plain name"):
                read()
        # The command line: one line, exit 2, nothing started.
        code, out = run_cli(["run", DIGITS, "--out", tmp_path / "run", "--quiet",
                             "--resume", ck], timeout_s=60)
        lines = out.strip().splitlines()
        assert code == 2 and len(lines) == 1, out
        assert lines[0].startswith("tessera: --resume") and repr(evil) in lines[0], out
        assert not (tmp_path / "run").exists()
    code, out = run_cli(["export", ck, "--out", tmp_path / "m.safetensors"], timeout_s=60)
    assert code == 2 and len(out.strip().splitlines()) == 1 and "plain name" in out, out


def test_other_manifest_fields_joined_into_paths_are_checked(tmp_path):
    for bad in ({"clock": "../x"}, {"clock": -1}, {"servers": "2"}, {"files": ["a"]}):
        manifest = {"clock": 10, "servers": 1, "files": {"0": "server-0.safetensors"}, **bad}
        with pytest.raises(CheckpointError):
            check_manifest(manifest, "m")
    store, _ = _checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="plain name"):  # every reader goes through it
        store.open_shard(10, "../clock-00000010/server-0.safetensors")


def test_a_servers_report_with_a_path_never_reaches_a_manifest(tmp_path, capsys):
    cfg = load_config(DIGITS, {"--servers": 1, "--out": str(tmp_path / "run")})
    rounds = CheckpointRounds(cfg, tmp_path / "run")
    written = []
    rounds.report(wire.CheckpointSaved(req=1, rank=0, clock=5, file="../../x.safetensors",
                                       nbytes=1))
    rounds.complete({0}, lambda clock, files: {"clock": clock, "files": files},
                    lambda: written.append(True))
    assert not rounds.reports and not written and rounds.store.clocks() == ([], [])
    assert "refusing" in capsys.readouterr().out


def test_a_report_of_a_file_the_coordinator_does_not_see_fails_the_round(tmp_path):
    """Servers on another node wrote to a location that is not shared: no manifest is
    written naming files that are not there."""
    cfg = load_config(DIGITS, {"--servers": 2, "--out": str(tmp_path / "run")})
    rounds = CheckpointRounds(cfg, tmp_path / "run")
    rounds.store.write_shard(5, 0, {"p0/values": torch.zeros(2)}, {})  # server 0: here
    for rank in (0, 1):  # server 1 wrote "its" file elsewhere
        rounds.report(wire.CheckpointSaved(req=1, rank=rank, clock=5,
                                           file=f"server-{rank}.safetensors", nbytes=8))
    # The writer thread lists the location (never the coordinator's loop); the failure
    # comes back at the next call.
    rounds.complete({0, 1}, lambda clock, files: {}, lambda: None)
    with pytest.raises(CheckpointError, match="server 1's server-1.safetensors") as info:
        rounds.flush(10.0, lambda: None)
    assert "--checkpoint-dir" in str(info.value) and "server 0" not in str(info.value)
    assert rounds.store.clocks() == ([], [5])  # no manifest


def test_a_round_completed_after_a_newer_one_is_dropped_not_a_failure(tmp_path):
    """Servers write checkpoints in background threads, so a server's write of clock 26 can
    finish after its write of 27: the round of 27 completes first, and pruning removes the
    incomplete 26 (older than the newest complete). Its late reports are dropped: the
    job goes on (it once failed "reported written but not in ..." with --checkpoint-every
    1 in the clean-clone CI)."""
    cfg = load_config(DIGITS, {"--servers": 2, "--out": str(tmp_path / "run")})
    rounds = CheckpointRounds(cfg, tmp_path / "run")
    done = []

    def write(clock: int, rank: int) -> None:
        name, nbytes = rounds.store.write_shard(clock, rank, {"p0/values": torch.zeros(2)}, {})
        rounds.report(wire.CheckpointSaved(req=1, rank=rank, clock=clock, file=name,
                                           nbytes=nbytes))

    def manifest(clock, files):
        return {"clock": clock, "files": {str(r): n for r, (n, _) in files.items()}}

    write(26, 0)
    write(27, 0)
    write(27, 1)  # server 1's 27 before its 26
    rounds.complete({0, 1}, manifest, lambda: done.append(True))
    rounds.flush(10.0, lambda: done.append(True))
    assert rounds.completed == [27] and done
    assert rounds.store.clocks() == ([27], [])  # 26 pruned: older than the newest complete
    write(26, 1)  # the late write (its directory made again), then its report
    rounds.complete({0, 1}, manifest, lambda: done.append(True))
    rounds.flush(10.0, lambda: done.append(True))
    assert rounds.completed == [27] and not rounds.reports
    assert rounds.store.latest()["clock"] == 27

    # Handed over before the newer round's manifest (written first: one writer thread,
    # in order) pruned its files: its listing misses them, and it is dropped the same way.
    # The writer is held at 29's listing until 28 is handed over too: otherwise, on a busy
    # host, 29 may be written and collected first, and 28 is dropped by the path above.
    held = threading.Event()
    listing = rounds.missing_files

    def missing_files(clock, *files):
        if clock == 29:
            held.wait(30)
        return listing(clock, *files)
    rounds.missing_files = missing_files
    write(28, 0)
    write(29, 0)
    write(29, 1)
    rounds.complete({0, 1}, manifest, lambda: done.append(True))  # 29 handed over
    write(28, 1)
    rounds.complete({0, 1}, manifest, lambda: done.append(True))  # 28 too, 29 not collected
    assert rounds._inflight == {28, 29}
    held.set()
    rounds.flush(10.0, lambda: done.append(True))
    assert rounds.completed == [27, 29] and not rounds.reports
    assert rounds.store.latest()["clock"] == 29
