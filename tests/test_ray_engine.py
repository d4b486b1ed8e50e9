"""The Ray engine (`xmodal index --engine ray`) against the local engine, on a real local
Ray cluster of 2 CPUs bound to 127.0.0.1 with no dashboard: same ids, statuses, failure
reasons and vectors (allclose) on a folder with bad files, the same after changes, and a
driver killed with SIGKILL mid-run resumes without re-encoding what it committed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_fixtures import committed_images, index_command
from click.testing import CliRunner
from image_fixtures import jpeg_bytes, scene
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.indexer.verify import verify_bundle

from xmodal.cli import main

pytest.importorskip("ray.data", reason="Ray is not installed: pip install 'xmodal[ray]'")

CPUS = 2


@pytest.fixture(scope="module")
def ray_head() -> str:
    """A local Ray cluster for this module, as `--engine ray` starts one; its address."""
    from xmodal.indexer.ray_cluster import RayEngineError, start_local_ray

    try:
        ray = start_local_ray(CPUS)
    except RayEngineError as exc:
        pytest.skip(f"Ray cannot start on this machine: {exc}")
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address  # nothing listens outside
    yield address
    ray.shutdown()


def _photo_folder(root: Path, n: int) -> None:
    """n small pictures (JPEG and PNG) and the bad files a user's folder holds."""
    root.mkdir()
    for i in range(n):
        img = scene(i, 64)
        if i % 3:
            img.save(root / f"{i:03d}.jpg", quality=90)
        else:
            img.save(root / f"{i:03d}.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "not-an-image.jpg").write_bytes(b"shopping list\n" * 20)
    (root / "truncated.jpg").write_bytes(jpeg_bytes(scene(999, 96))[:400])
    (root / "notes.txt").write_bytes(b"excluded by its extension")


def _rows(bundle: Path) -> dict[str, tuple]:
    """relpath -> (id, status, reason, content hash, width, height, vector or None)."""
    con = sqlite3.connect(f"file:{bundle / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "select relpath, id, status, reason, content_hash, width, height, vector from images"
        ).fetchall()
        tokens = {i for (i,) in con.execute("select image_id from image_tokens")}
    finally:
        con.close()
    out = {}
    for rel, i, status, reason, digest, w, h, vec in rows:
        v = np.frombuffer(vec, np.float32) if vec is not None else None
        out[os.fsdecode(rel)] = (i, status, reason, digest, w, h, i in tokens, v)
    return out


def _same(local: Path, ray: Path) -> None:
    a, b = _rows(local), _rows(ray)
    assert a.keys() == b.keys()
    for rel in a:
        *facts_a, va = a[rel]
        *facts_b, vb = b[rel]
        assert facts_a == facts_b, rel  # id, status, reason, hash, size, tokens cached
        assert (va is None) == (vb is None), rel
        if va is not None:
            np.testing.assert_allclose(va, vb, atol=1e-5, err_msg=rel)


def _index(encoder, bundle: Path, root: Path, engine: str) -> dict:
    opts = IndexOptions(
        bundle=bundle,
        roots=[root],
        workers=0,  # the local engine in order: the same order the Ray engine keeps
        batch_size=8,
        progress=False,
        cache_tokens=True,  # the shapes model's reranker reads them
        engine=engine,
    )
    report = run_index(encoder, opts)
    return {k: v for k, v in report.counts.items() if v}, sorted(report.failures)


def test_ray_engine_matches_the_local_engine_then_after_changes(
    ray_head: str, default_encoder, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    _photo_folder(photos, 40)
    local, ray = tmp_path / "local", tmp_path / "ray"
    first_local = _index(default_encoder, local, photos, "local")
    first_ray = _index(default_encoder, ray, photos, "ray")
    assert first_ray == first_local
    counts, failures = first_ray
    assert counts["indexed"] == 40 and counts["failed"] == 3 and counts["excluded"] == 1
    assert {Path(p).name for p, _ in failures} == {"empty.jpg", "not-an-image.jpg", "truncated.jpg"}
    _same(local, ray)

    # Modify (same size, other bytes: hashed first, then decoded), replace with another
    # size, delete, add, and touch (same bytes): both engines record the same.
    same_size = photos / "001.jpg"
    data = bytearray(same_size.read_bytes())
    data[-3] ^= 0xFF  # inside the entropy-coded data, before EOI
    same_size.write_bytes(bytes(data))
    scene(500, 64).save(photos / "002.jpg", quality=70)
    (photos / "004.jpg").unlink()
    for i in (600, 601):
        scene(i, 64).save(photos / f"new-{i}.png")
    os.utime(photos / "005.jpg", ns=(1, 10**18))
    again_local = _index(default_encoder, local, photos, "local")
    again_ray = _index(default_encoder, ray, photos, "ray")
    assert again_ray == again_local
    assert again_ray[0]["removed"] == 1 and again_ray[0]["indexed"] >= 3
    _same(local, ray)
    assert verify_bundle(ray).ok


def test_driver_killed_mid_run_resumes_without_reencoding(
    ray_head: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    photos.mkdir()
    total = 120
    for i in range(total):
        scene(i, 48).save(photos / f"{i:04d}.png")
    cmd = index_command(
        tiny_checkpoint,
        str(photos),
        "--bundle",
        str(bundle),
        "--batch-size",
        "4",
        "--engine",
        "ray",
        "--ray-address",
        ray_head,
        "--json",
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while committed_images(bundle) < 8 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {err[-2000:]}"
    done_before = committed_images(bundle)
    assert 0 < done_before < total
    assert verify_bundle(bundle).ok
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    counts = json.loads(resumed.stdout)["counts"]
    assert counts["indexed"] == total - done_before  # nothing committed is encoded again
    assert counts["unchanged"] == done_before
    final = verify_bundle(bundle)
    assert final.ok, final.problems
    assert final.facts["images_ids"] == total


def test_unreachable_cluster_and_missing_ray_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    _photo_folder(photos, 1)
    args = ["index", str(photos), "--bundle", str(tmp_path / "b"), "--engine", "ray"]
    runner = CliRunner()
    down = runner.invoke(main, [*args, "--ray-address", "127.0.0.1:1"])
    assert down.exit_code == 1
    assert (
        down.output.strip().splitlines() == [down.output.strip()]
        and "Ray cluster at 127.0.0.1:1 is not reachable" in down.output
    )
    bad = runner.invoke(main, [*args, "--ray-address", "nowhere"])
    assert bad.exit_code == 1 and "not auto, local, HOST:PORT" in bad.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    missing = runner.invoke(main, args)
    assert missing.exit_code == 1
    assert "pip install 'xmodal[ray]'" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_actors_get_the_models_identity_and_refuse_other_weights(
    default_encoder, tiny_checkpoint: Path
) -> None:
    from xmodal.crossmodal.encoder import Encoder
    from xmodal.indexer.ray_cluster import RayEngineError
    from xmodal.indexer.ray_engine import ModelSpec

    spec = ModelSpec.of(default_encoder)  # a built-in: each node loads its own copy
    assert (spec.name, spec.pretrained) == ("xmodal-shapes", None)
    assert spec.sha256 == default_encoder.identity.sha256
    tiny = ModelSpec.of(Encoder.load("xmodal-tiny", str(tiny_checkpoint)))
    assert tiny.load("cpu").identity.matches(
        Encoder.load("xmodal-tiny", str(tiny_checkpoint)).identity
    )
    with pytest.raises(RayEngineError, match="not the driver's"):
        ModelSpec(tiny.name, tiny.pretrained, "0" * 64).load("cpu")
    with pytest.raises(RayEngineError, match="random weights"):
        ModelSpec.of(Encoder.load("xmodal-tiny", None))


def test_cpu_layout_decodes_in_the_actors_and_refuses_decode_workers(
    ray_head: str, default_encoder, tmp_path: Path
) -> None:
    from xmodal.indexer.ray_cluster import RayEngineError
    from xmodal.indexer.ray_engine import RayEngine

    def engine(**kw: object) -> RayEngine:
        opts = IndexOptions(bundle=tmp_path / "b", roots=[tmp_path], engine="ray", **kw)
        return RayEngine(default_encoder, opts, with_tokens=False)

    lay = engine().layout()
    # One actor per CPU, each decoding its own batches: no decode tasks beside them.
    assert (lay["actors"], lay["actor_cpus"], lay["decoders"], lay["fused"]) == (CPUS, 1.0, 0, 1)
    hashing = engine().layout(encode=False)  # rename / touch checks: no model, no actors
    assert hashing["actors"] == 0 and hashing["decoders"] >= CPUS
    with pytest.raises(RayEngineError, match="--decode-workers is for GPU encoders"):
        engine(decode_workers=4).layout()
    with pytest.raises(RayEngineError, match="the Ray cluster has 2"):
        engine(encode_workers=3).layout()
