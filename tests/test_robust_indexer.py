"""Indexer robustness (issue 16): unreadable folders and files, one writer per bundle,
index types without remove_ids, decode workers whose parent dies, files replaced
between scan and decode, and kills at every step of the publication."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cli_fixtures import index_command
from image_fixtures import scene
from sqlalchemy import select
from sqlalchemy.orm import Session
from xmodal.crossmodal.encoder import Encoder
from xmodal.indexer.bundle import Bundle, read_manifest
from xmodal.indexer.catalog import INDEXED, ImageRow
from xmodal.indexer.pipeline import Indexer, IndexOptions, IndexRunError, run_index
from xmodal.indexer.verify import verify_bundle

CAPSH = shutil.which("capsh") or ("/usr/sbin/capsh" if Path("/usr/sbin/capsh").exists() else None)
DROP = "--drop=cap_dac_override,cap_dac_read_search"
CLI_TIMEOUT_S = 300  # bound on one CLI subprocess (prevents a hang, not a speed check)
WRITER_IMAGES = 24  # enough work that the first writer is still running when paused
FAULT_CALLS = ("replace", "rename", "fsync", "unlink", "remove")  # what publication may die in


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path) -> Encoder:
    return Encoder.load("xmodal-tiny", str(tiny_checkpoint))


def _opts(bundle: Path, *roots: Path, **kw) -> IndexOptions:
    return IndexOptions(bundle=bundle, roots=list(roots), workers=0, progress=False, **kw)


def _rows(bundle: Path) -> dict[str, tuple[str, bool, int, int]]:
    """relpath -> (status, has vector, size, mtime_ns)."""
    b = Bundle(bundle)
    with Session(b.engine) as s:
        rows = s.execute(
            select(
                ImageRow.relpath,
                ImageRow.status,
                ImageRow.vector.is_not(None),
                ImageRow.size,
                ImageRow.mtime_ns,
            )
        ).all()
    b.close()
    return {os.fsdecode(r[0]): (r[1], bool(r[2]), r[3], r[4]) for r in rows}


def _cli(tiny_checkpoint: Path, *args: str) -> list[str]:
    return index_command(tiny_checkpoint, *args)


# ------------------------------------------------------------------ permissions


def _unprivileged(cmd: list[str], probe: Path) -> list[str]:
    """``cmd`` run without the right to ignore mode bits (skips where that cannot be had)."""
    if os.geteuid() != 0:
        return cmd  # mode bits already apply
    if CAPSH is None:
        pytest.skip("running as root and capsh (libcap2-bin) is not installed")
    probe.write_bytes(b"secret")
    probe.chmod(0)
    try:
        check = subprocess.run(
            [CAPSH, DROP, "--", "-c", f"cat {shlex.quote(str(probe))}"],
            capture_output=True,
            timeout=30,
        )
    finally:
        probe.unlink()
    if check.returncode == 0:
        pytest.skip("capsh could not drop root's right to read any file here")
    return [CAPSH, DROP, "--", "-c", shlex.join(cmd)]


@contextlib.contextmanager
def _modes(*changes: tuple[Path, int]) -> Iterator[None]:
    """Set modes for the block, then give the old ones back (pytest must clean up)."""
    old = [(p, stat.S_IMODE(p.stat().st_mode)) for p, _ in changes]
    for p, mode in changes:
        p.chmod(mode)
    try:
        yield
    finally:
        for p, mode in reversed(old):
            p.chmod(mode)


def _photo_tree(root: Path) -> None:
    root.mkdir()
    for i, rel in enumerate(
        ["a.png", "b.png", "g.png", "sub/c.png", "sub/d.png", "sub644/e.png", "sub644/f.png"]
    ):
        (root / rel).parent.mkdir(exist_ok=True)
        scene(i, 24).save(root / rel)


def test_unreadable_folders_and_files_keep_their_rows(
    tiny: Encoder, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    _photo_tree(photos)
    first = run_index(tiny, _opts(bundle, photos))
    assert first.counts["indexed"] == 7
    before = _rows(bundle)
    # g.png changes its mtime (so the scan must open it) and cannot be read any more.
    os.utime(photos / "g.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    cmd = _unprivileged(
        _cli(tiny_checkpoint, str(photos), "--bundle", str(bundle), "--json"), tmp_path / "probe"
    )
    with _modes(
        (photos / "sub", 0o300),  # cannot be listed
        (photos / "sub644", 0o644),  # can be listed, not entered
        (photos / "g.png", 0o000),  # cannot be read
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = report["counts"]
    assert counts.get("removed", 0) == 0, counts
    assert counts["failed"] == 4, report  # sub, sub644/e.png, sub644/f.png, g.png
    assert counts["kept_unreadable"] == 2, counts  # sub/c.png, sub/d.png
    reasons = {os.path.relpath(f["path"], photos): f["reason"] for f in report["failures"]}
    assert "cannot list folder" in reasons["sub"] and "2 files under it are kept" in reasons["sub"]
    assert "cannot stat" in reasons[os.path.join("sub644", "e.png")]
    assert "cannot read" in reasons["g.png"] and "kept" in reasons["g.png"]
    # Nothing indexed was lost: same rows, statuses, vectors, sizes and mtimes.
    after = _rows(bundle)
    assert {k: v for k, v in after.items() if k != "sub"} == before
    assert after["sub"][0] == "failed"
    assert read_manifest(bundle).counts["images_indexed"] == 7
    check = verify_bundle(bundle)
    assert check.ok, check.problems
    # Readable again: nothing is encoded anew (g.png is hashed, found the same bytes).
    again = run_index(tiny, _opts(bundle, photos))
    assert (again.counts["indexed"], again.counts["unchanged"]) == (0, 7), again.counts
    assert verify_bundle(bundle).ok


def test_root_listable_but_not_enterable_fails_the_run_and_keeps_everything(
    tiny: Encoder, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    _photo_tree(photos)
    run_index(tiny, _opts(bundle, photos))
    before, generation = _rows(bundle), read_manifest(bundle).generation
    cmd = _unprivileged(
        _cli(tiny_checkpoint, str(photos), "--bundle", str(bundle)), tmp_path / "probe"
    )
    for mode in (0o644, 0o300):  # listed but not entered; entered but not listed
        with _modes((photos, mode)):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr, proc.stderr
        # Ours, or click's own refusal of an unreadable path argument: one line either way.
        assert f"cannot read folder {photos}" in proc.stderr or (
            mode == 0o300 and f"Path '{photos}' is not readable" in proc.stderr
        ), proc.stderr
        manifest = read_manifest(bundle)
        assert (manifest.generation, manifest.counts["images_indexed"]) == (generation, 7)
        assert _rows(bundle) == before
        check = verify_bundle(bundle)
        assert check.ok, check.problems
    again = run_index(tiny, _opts(bundle, photos))
    assert (again.counts["indexed"], again.counts["unchanged"]) == (0, 7), again.counts


# ------------------------------------------------------------------ one writer


def _wait_for_reader(fifo: Path, proc: subprocess.Popen, timeout_s: float = 120) -> int:
    """Open ``fifo`` for writing once ``proc`` reads it (proves it got that far)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody reads it yet
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"the first run ended before reading its captions: {err}")
            time.sleep(0.05)
            continue
        os.set_blocking(fd, True)
        return fd
    proc.kill()
    pytest.fail("the first run never opened its caption file")


def test_second_writer_is_refused_with_the_holders_pid(
    tiny: Encoder, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    photos.mkdir()
    for i in range(WRITER_IMAGES):
        scene(i, 24).save(photos / f"{i:03d}.png")
    cmd = _cli(tiny_checkpoint, str(photos), "--bundle", str(bundle), "--batch-size", "4")
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The manifest of a new bundle is written once its run has started (and, with the
        # fix, holds the lock); the run is then paused so the second surely meets it.
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while not (bundle / "manifest.json").exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never created its bundle"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first run finished before the second could start"
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert second.returncode != 0, second.stdout
    assert "Traceback" not in second.stderr, second.stderr
    assert f"is being indexed by pid {first.pid}" in second.stderr, second.stderr
    assert first.returncode == 0, err
    check = verify_bundle(bundle)
    assert check.ok, check.problems
    # The lock went with the first run: the next writer gets in.
    third = run_index(tiny, _opts(bundle, photos))
    assert third.counts["unchanged"] == WRITER_IMAGES
    assert verify_bundle(bundle).ok


def test_postgresql_catalog_has_one_writer(tiny: Encoder, pg_url: str, tmp_path: Path) -> None:
    from xmodal.indexer.lock import BundleLock

    photos = tmp_path / "photos"
    photos.mkdir()
    scene(0, 24).save(photos / "0.png")
    # Another bundle folder on the same catalog (another machine, say) is writing.
    other = tmp_path / "other"
    other.mkdir()
    held = pytest.raises(IndexRunError, match=f"is being indexed by pid {os.getpid()}")
    with BundleLock(other, pg_url), held:
        run_index(tiny, _opts(tmp_path / "bundle", photos, db_url=pg_url))
    report = run_index(tiny, _opts(tmp_path / "bundle", photos, db_url=pg_url))
    assert report.counts["indexed"] == 1


# ------------------------------------------------------------------ index types


def test_hnsw_rebuilds_on_deletion_and_is_kept_without_the_flag(
    tiny: Encoder, tmp_path: Path
) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    photos.mkdir()
    for i in range(8):
        scene(i, 24).save(photos / f"{i}.png")
    run_index(tiny, _opts(bundle, photos, index_factory="HNSW32"))
    (photos / "0.png").unlink()
    scene(50, 24).save(photos / "1.png")  # modified in place: its vector is replaced
    report = run_index(tiny, _opts(bundle, photos, index_factory="HNSW32"))
    assert (report.counts["removed"], report.counts["indexed"]) == (1, 1)
    assert report.counts["images_index_rebuilt"] == 1
    check = verify_bundle(bundle)
    assert check.ok, check.problems
    # No flag: the bundle keeps the factory it was built with, deletions still work.
    (photos / "2.png").unlink()
    report = run_index(tiny, _opts(bundle, photos))
    assert report.counts["removed"] == 1
    manifest = read_manifest(bundle)
    assert manifest.indexes["images"].factory == "HNSW32"
    assert manifest.indexes["images"].count == 6
    b = Bundle(bundle)
    with Session(b.engine) as s:
        row_id = s.execute(select(ImageRow.id).where(ImageRow.display == "1.png")).scalar_one()
    scores, ids = b.search("images", b.vectors("images", [row_id]), 1)
    b.close()
    assert ids[0, 0] == row_id and scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    assert verify_bundle(bundle).ok


# ------------------------------------------------------------------ decode workers

_WORKER_DRIVER = """
import sys, threading
from xmodal.indexer.decode import DecodePool, Job
pool = DecodePool(1, None, timeout_s=600)
with pool:
    t = threading.Thread(target=lambda: list(pool.run([Job(0, sys.argv[1].encode())])))
    t.start()
    t.join()
"""


def test_decode_workers_exit_quietly_when_their_parent_is_killed(tmp_path: Path) -> None:
    fifo = tmp_path / "slow.png"
    os.mkfifo(fifo)  # the worker blocks reading it until we write
    parent = subprocess.Popen(
        [sys.executable, "-c", _WORKER_DRIVER, str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        fd = _wait_for_reader(fifo, parent)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        # The orphaned worker now reads, decodes (fails) and answers a dead parent.
        os.write(fd, b"not an image at all")
        os.close(fd)
        # stderr closes once every process holding it (the worker too) has exited.
        _, err = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# ------------------------------------------------------------------ scan vs decode


def test_file_replaced_after_the_scan_is_stored_as_read(
    tiny: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xmodal.indexer.pipeline as pipeline

    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    photos.mkdir()
    for i in range(3):
        scene(i, 24).save(photos / f"{i}.png")
    target = photos / "1.png"
    real_walk = pipeline.walk

    def walk_then_replace(*args, **kwargs):
        # The scan is over (every entry handed out); before decoding, the file is
        # replaced by other bytes of another size and mtime, as a sync tool would.
        yield from real_walk(*args, **kwargs)
        tmp = photos / ".1.png.partial"
        scene(77, 40).save(tmp, format="PNG")
        os.utime(tmp, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 5 * 10**9))
        os.replace(tmp, target)

    monkeypatch.setattr(pipeline, "walk", walk_then_replace)
    run_index(tiny, _opts(bundle, photos))
    monkeypatch.setattr(pipeline, "walk", real_walk)
    st = target.stat()
    status, has_vector, size, mtime_ns = _rows(bundle)["1.png"]
    assert (status, has_vector) == (INDEXED, True)
    assert (size, mtime_ns) == (st.st_size, st.st_mtime_ns)  # the bytes encoded
    # The vector is the new content's: an index of a fresh copy agrees.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy2(target, fresh / "1.png")
    run_index(tiny, _opts(tmp_path / "fresh-bundle", fresh))
    b1, b2 = Bundle(bundle), Bundle(tmp_path / "fresh-bundle")
    with Session(b1.engine) as s:
        v1 = s.execute(select(ImageRow.vector).where(ImageRow.display == "1.png")).scalar_one()
    with Session(b2.engine) as s:
        v2 = s.execute(select(ImageRow.vector).where(ImageRow.display == "1.png")).scalar_one()
    b1.close()
    b2.close()
    assert np.allclose(np.frombuffer(v1, np.float32), np.frombuffer(v2, np.float32), atol=1e-5)
    again = run_index(tiny, _opts(bundle, photos))
    assert (again.counts["unchanged"], again.counts["indexed"]) == (3, 0)


# ------------------------------------------------------------------ publication faults


def _crash_in_publish(bundle: str, photos: str, checkpoint: str, n: int, count_file: str) -> None:
    """Run the index; die (os._exit(9)) at the n-th rename/fsync/unlink of publication.

    Runs in a child process. ``n = 0`` only counts those calls (into ``count_file``).
    """
    import xmodal.indexer.pipeline as pipeline
    from xmodal.crossmodal.encoder import Encoder
    from xmodal.crossmodal.threads import configure_threads

    configure_threads(1)
    encoder = Encoder.load("xmodal-tiny", checkpoint)
    real = {name: getattr(os, name) for name in FAULT_CALLS}
    calls = 0

    def faulty(name: str):
        def call(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == n:
                os._exit(9)
            return real[name](*args, **kwargs)

        return call

    real_publish = pipeline.publish

    def publish(*args, **kwargs):
        for name in FAULT_CALLS:
            setattr(os, name, faulty(name))
        try:
            return real_publish(*args, **kwargs)
        finally:
            for name, fn in real.items():
                setattr(os, name, fn)

    pipeline.publish = publish
    run_index(encoder, _opts(Path(bundle), Path(photos)))
    Path(count_file).write_text(str(calls))


def test_kill_at_every_step_of_publication_then_resume(
    tiny: Encoder, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    photos, bundle, template = tmp_path / "photos", tmp_path / "bundle", tmp_path / "template"
    photos.mkdir()
    for i in range(5):
        scene(i, 24).save(photos / f"{i}.png")
    indexer = Indexer(tiny, _opts(bundle, photos))
    indexer.run()
    indexer.engine.dispose()  # checkpoints the WAL: the copy below is the whole catalog
    shutil.copytree(bundle, template)
    # The run that will be killed: 2 new files, 1 deleted, 1 modified in place.
    (photos / "0.png").unlink()
    scene(60, 24).save(photos / "1.png")
    for i in (5, 6):
        scene(i, 24).save(photos / f"{i}.png")
    expected = {f"{i}.png" for i in range(1, 7)}
    # Children fork from a server that has imported everything: no 3 s start-up each.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "open_clip", "xmodal.indexer.pipeline", __name__])

    def crash_at(n: int) -> tuple[int | None, int | None]:
        shutil.rmtree(bundle)
        shutil.copytree(template, bundle)
        count_file = tmp_path / "calls.txt"
        count_file.unlink(missing_ok=True)
        args = (str(bundle), str(photos), str(tiny_checkpoint), n, str(count_file))
        child = ctx.Process(target=_crash_in_publish, args=args)
        child.start()
        child.join(CLI_TIMEOUT_S)
        if child.is_alive():
            child.kill()
            pytest.fail(f"the run to be killed at call {n} hung")
        calls = int(count_file.read_text()) if count_file.exists() else None
        return child.exitcode, calls

    exitcode, total = crash_at(0)
    assert exitcode == 0 and total, (exitcode, total)
    assert total >= 9  # images + captions + manifest: fsync, rename, fsync of the folder
    for n in range(1, total + 1):
        exitcode, _ = crash_at(n)
        assert exitcode == 9, f"call {n}: the run was not killed there ({exitcode})"
        check = verify_bundle(bundle)
        assert check.ok, (n, check.problems)
        resumed = run_index(tiny, _opts(bundle, photos))
        # Everything the killed run committed is reused, nothing is encoded twice.
        assert resumed.counts["indexed"] == 0, (n, resumed.counts)
        assert resumed.counts["unchanged"] == len(expected), (n, resumed.counts)
        final = verify_bundle(bundle)
        assert final.ok, (n, final.problems)
        assert final.facts["images_ids"] == len(expected), (n, final.facts)
        assert {k for k, v in _rows(bundle).items() if v[0] == INDEXED} == expected
