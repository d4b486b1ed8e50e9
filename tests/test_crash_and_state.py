"""Crash safety (SIGKILL mid-run, then resume) and a stateful model of folder changes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_fixtures import committed_images, index_command
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from image_fixtures import scene
from xmodal.crossmodal.encoder import Encoder
from xmodal.indexer.bundle import Bundle
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.indexer.verify import verify_bundle


def test_sigkill_mid_run_then_resume(tiny_checkpoint: Path, tmp_path: Path) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    photos.mkdir()
    total = 400
    for i in range(total):
        scene(i, 48).save(photos / f"{i:04d}.png")
    cmd = index_command(
        tiny_checkpoint,
        str(photos),
        "--bundle",
        str(bundle),
        "--batch-size",
        "8",
        "--json",
        workers=1,
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while committed_images(bundle) < 40 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = committed_images(bundle)
    assert 0 < done_before < total
    # Killed mid-run: whatever the manifest names is consistent with the catalog.
    report = verify_bundle(bundle)
    assert report.ok, report.problems
    # Resume: only the files not yet committed are encoded.
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    import json

    counts = json.loads(resumed.stdout)["counts"]
    assert counts["indexed"] == total - done_before  # nothing encoded twice
    assert counts["unchanged"] == done_before
    final = verify_bundle(bundle)
    assert final.ok, final.problems
    assert final.facts["images_ids"] == total


@pytest.fixture(scope="module")
def tiny_encoder(tiny_checkpoint: Path) -> Encoder:
    return Encoder.load("xmodal-tiny", str(tiny_checkpoint))


class FolderMachine(RuleBasedStateMachine):
    """Random add / modify / delete / rename / reindex; FAISS ids always == catalog ids."""

    encoder: Encoder
    base: Path

    @initialize()
    def setup(self) -> None:
        self.counter = 0
        run = self.base / f"run{id(self)}-{time.monotonic_ns()}"
        self.photos, self.bundle = run / "photos", run / "bundle"
        self.photos.mkdir(parents=True)
        self.files: dict[str, int] = {}  # name -> content seed
        self.indexed_once = False

    def _write(self, name: str, seed: int) -> None:
        scene(seed, 16).save(self.photos / name)
        self.files[name] = seed

    @rule(seed=st.integers(0, 30))
    def add(self, seed: int) -> None:
        self.counter += 1
        self._write(f"f{self.counter}.png", seed)

    @rule(data=st.data(), seed=st.integers(31, 60))
    def modify(self, data: st.DataObject, seed: int) -> None:
        if self.files:
            self._write(data.draw(st.sampled_from(sorted(self.files))), seed)

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        if self.files:
            name = data.draw(st.sampled_from(sorted(self.files)))
            (self.photos / name).unlink()
            del self.files[name]

    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        if self.files:
            name = data.draw(st.sampled_from(sorted(self.files)))
            self.counter += 1
            new = f"r{self.counter}.png"
            (self.photos / name).rename(self.photos / new)
            self.files[new] = self.files.pop(name)

    @rule()
    def reindex(self) -> None:
        if not self.files and not self.indexed_once:
            return
        run_index(
            self.encoder,
            IndexOptions(
                bundle=self.bundle,
                roots=[self.photos],
                workers=0,
                progress=False,
                allow_empty_roots=True,
            ),
        )
        self.indexed_once = True
        report = verify_bundle(self.bundle)
        assert report.ok, report.problems
        b = Bundle(self.bundle)
        try:
            ids = b.indexes["images"]
            n = ids.ntotal if ids is not None else 0
            assert n == len(self.files)
            hits = b.images(list(range(1, 10_000)))
            assert sorted(os.path.basename(h.path) for h in hits.values()) == sorted(self.files)
        finally:
            b.close()

    @invariant()
    def files_on_disk_match_the_model(self) -> None:
        if hasattr(self, "photos"):
            assert sorted(p.name for p in self.photos.iterdir()) == sorted(self.files)


def test_stateful_folder_changes(tiny_encoder: Encoder, tmp_path: Path) -> None:
    FolderMachine.encoder = tiny_encoder
    FolderMachine.base = tmp_path
    run = FolderMachine.TestCase()
    run.settings = settings(
        max_examples=15,
        stateful_step_count=12,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    run.runTest()
