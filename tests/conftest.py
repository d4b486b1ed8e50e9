"""Shared fixtures: real open_clip models (a tiny config saved to local checkpoints, and
the built-in default), a small demo corpus. Nothing here reaches a network."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid

# Before anything imports huggingface_hub or transformers: offline, with a private cache,
# so a test can lay out a hub cache without touching the user's. Removed at exit: a test
# lays a ViT-B-32 checkpoint (289 MB) out in it, which piled up in /tmp run after run.
_HF_HOME = tempfile.mkdtemp(prefix="xmodal-test-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from xmodal.crossmodal.threads import configure_threads  # noqa: E402

configure_threads(int(os.environ.get("XMODAL_THREADS", "0")) or None)

TINY = "xmodal-tiny"


@pytest.fixture(scope="session")
def hf_hub_cache() -> Path:
    """The private Hugging Face hub cache this test session uses."""
    return Path(os.environ["HF_HUB_CACHE"])


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-but-seeded weights of the tiny config, saved as a plain checkpoint file."""
    import open_clip
    from safetensors.torch import save_file
    from xmodal.crossmodal.registry import register_shipped

    register_shipped(TINY)
    torch.manual_seed(1234)
    model = open_clip.create_model(TINY)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_local_dir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """The same weights in open_clip's local-dir layout, as `xmodal train` writes it."""
    from xmodal.crossmodal.loading import load_model
    from xmodal.training.train import save_model

    loaded = load_model(TINY, str(tiny_checkpoint))
    folder = tmp_path_factory.mktemp("tiny-dir")
    save_model(loaded.model, folder, TINY, loaded.model_cfg, {}, ())
    return folder


@pytest.fixture(scope="session")
def default_encoder():
    """The built-in shapes model (committed under data/models/xmodal-shapes), the demo
    corpus's: most tests run on demo scenes."""
    from xmodal.crossmodal.encoder import Encoder

    return Encoder.load("xmodal-shapes")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo corpus: 96 train, 24 val, 24 test, 12 test-shifted images, flat style
    (fixed templates and 128 px PNGs, which these tests were written on; test_corpus
    covers the varied default)."""
    from xmodal.training.corpus import CorpusSpec, write_corpus

    out = tmp_path_factory.mktemp("corpus")
    spec = CorpusSpec(
        seed=7, train_size=96, val_size=24, test_size=24, test_shifted_size=12, style="flat"
    )
    write_corpus(out, spec, progress=False)
    return out


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory, default_encoder):
    """The shapes model over a 60-image demo test split with its captions."""
    from xmodal.indexer.pipeline import IndexOptions, run_index
    from xmodal.training.corpus import CorpusSpec, write_corpus

    root = tmp_path_factory.mktemp("demo")
    # Only the test split is indexed: no test-shifted images to render.
    spec = CorpusSpec(
        seed=11, train_size=1, val_size=1, test_size=60, test_shifted_size=0, style="flat"
    )
    write_corpus(root, spec, progress=False)
    bundle = root / "bundle"
    run_index(
        default_encoder,
        IndexOptions(
            bundle=bundle,
            roots=[root / "images" / "test"],
            captions=[root / "test.jsonl"],
            workers=0,
            progress=False,
        ),
    )
    return root, bundle


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test (dropped after), on the server that
    XMODAL_TEST_PG_URL names (.ci/run starts one); skips, saying why, without one."""
    from sqlalchemy import create_engine, text
    from xmodal.indexer.catalog import public_url

    admin = os.environ.get("XMODAL_TEST_PG_URL")
    if not admin:
        pytest.skip("no PostgreSQL server: set XMODAL_TEST_PG_URL (.ci/run starts one)")
    try:
        eng = create_engine(admin, isolation_level="AUTOCOMMIT")
        with eng.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        pytest.skip(f"PostgreSQL at {public_url(admin)} is not reachable: {exc}")
    name = f"xmodal_test_{uuid.uuid4().hex[:10]}"
    with eng.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield eng.url.set(database=name).render_as_string(hide_password=False)
    with eng.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    eng.dispose()
