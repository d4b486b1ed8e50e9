"""The Ray engine of `xmodal index --engine ray`: decode and encode on a Ray cluster.

Each ``run`` is one Ray Data pipeline over the run's jobs, ending in ``iter_batches`` in
the driver, which routes and commits every result through the same code as the local
engine (``pipeline.Indexer``):

- on GPUs, ``from_items(jobs) -> map_batches(decode tasks on CPUs) ->
  map_batches(EncoderActor pool)``: the CPUs decode while the GPUs encode;
- on CPUs, ``from_items(jobs) -> map_batches(DecodeEncodeActor pool)``, one actor per CPU
  decoding its own batch and then encoding it, so only paths and outputs travel. Handing
  decoded pixels (600 kB an image at 224 px) through the object store to separate
  encoder actors cost more than decoding itself on CPUs that must do both anyway.

Decoding is ``decode.process_file`` (the local workers' function: same pixels, same
failure reasons); the actors load the model once each, from its identity (built-in name,
or name + checkpoint / tag / ``local-dir:``), check its sha256 against the driver's, and
run ``engine.encode_pass`` on one torch thread per CPU they hold (or on their GPU).
Results keep the input order, so a run over the same folder gives the same catalog ids as
a local one.

Every node must see the files at the paths the driver scanned (a shared or identical
filesystem) and have xmodal installed; nothing but paths and pixels travels.
"""

from __future__ import annotations

import contextlib
import pickle
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import XmodalError
from xmodal.crossmodal.registry import BUILTIN_MODELS, LOCAL_DIR
from xmodal.crossmodal.threads import ensure_threads_configured

from .decode import Decoded, Job, PixelFormat, Preprocess, draft_size, process_file
from .engine import Outputs, encode_pass
from .options import IndexOptions
from .ray_cluster import RayEngineError, connect, quiet_ray_data

# On GPUs, decode tasks of 1/4 CPU feed the actors (one CPU each); on CPUs, one actor per
# CPU decodes and encodes (module docstring).
ACTOR_CPUS = 1.0
DECODE_TASK_CPUS = 0.25
DECODE_BATCH = 16  # files per decode task call: small, so the actors are fed early


@dataclass(frozen=True)
class ModelSpec:
    """What an actor needs to load the driver's model itself (never a pickled model)."""

    name: str | None  # a built-in model's name, or an open_clip config name
    pretrained: str | None  # a tag, a checkpoint file or local-dir:FOLDER; None for built-ins
    sha256: str  # of the weights the driver loaded: an actor loading others refuses

    @classmethod
    def of(cls, encoder: Encoder) -> ModelSpec:
        """The spec of a loaded encoder; random weights cannot be reloaded elsewhere."""
        ident = encoder.identity
        if ident.sha256 is None:
            raise RayEngineError(
                f"model {ident.name} has random weights, which Ray workers cannot load; "
                "give --pretrained weights, or use --engine local"
            )
        for builtin, folder in BUILTIN_MODELS.items():  # each node has its own copy
            if ident.pretrained == f"{LOCAL_DIR}{folder}":
                return cls(builtin, None, ident.sha256)
        return cls(ident.name, ident.pretrained, ident.sha256)

    def load(self, device: str) -> Encoder:
        """Load the model on this node; a RayEngineError if its weights differ."""
        from xmodal.crossmodal.loading import load_model

        if self.pretrained and self.pretrained.startswith(LOCAL_DIR):
            loaded = load_model(self.pretrained)
        else:
            loaded = load_model(self.name, self.pretrained)
        if loaded.identity.sha256 != self.sha256:
            raise RayEngineError(
                f"the model's weights on this Ray node (sha256 {loaded.identity.sha256}) are "
                f"not the driver's (sha256 {self.sha256}); install the same weights on every node"
            )
        return Encoder(loaded, device=device)


class _TimeUp(Exception):
    pass


@contextlib.contextmanager
def _time_bound(seconds: float) -> Iterator[None]:
    """Raise _TimeUp in this (main) thread after ``seconds``; Python-level decoding loops
    see it between chunks. Off the main thread there is no bound (signals need it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def up(signum: int, frame: Any) -> None:
        raise _TimeUp

    before = signal.signal(signal.SIGALRM, up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def _decode(blob: bytes, preprocess: Preprocess, draft: Any, timeout_s: float) -> Decoded:
    """A pickled Job -> its Decoded (pixels, or the failure), bounded in time."""
    job: Job = pickle.loads(blob)
    try:
        with _time_bound(timeout_s):
            return process_file(job, preprocess, draft)
    except _TimeUp:  # the local pool's words for the same case
        return Decoded(job.key, error=f"decoding took longer than {timeout_s:g} s; skipped")


def decode_batch(
    batch: dict[str, np.ndarray], preprocess: Preprocess, draft: Any, timeout_s: float
) -> dict[str, list[bytes]]:
    """A Ray decode task: pickled Jobs -> pickled Decoded (pixels, or the failure)."""
    out = [_decode(b, preprocess, draft, timeout_s) for b in batch["job"]]
    return {"decoded": [pickle.dumps(d, protocol=pickle.HIGHEST_PROTOCOL) for d in out]}


class EncoderActor:
    """One model per actor, loaded once; encodes the decoded images of each batch and
    sends back their outputs in place of their pixels."""

    def __init__(self, spec: ModelSpec, with_tokens: bool, threads: int, gpus: float) -> None:
        from xmodal.crossmodal.threads import configure_threads

        configure_threads(threads)  # one torch thread per CPU this actor holds
        self.on_gpu = gpus > 0
        self.encoder = spec.load("cuda" if self.on_gpu else "cpu")
        self.pixel_format = PixelFormat.from_preprocess(self.encoder.preprocess)
        self.with_tokens = with_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
        """Pickled Decoded in, pickled Decoded (``encoded`` set, no pixels) out."""
        return self._encode([pickle.loads(b) for b in batch["decoded"]])

    def _encode(self, decoded: list[Decoded]) -> dict[str, list[bytes]]:
        todo = [d for d in decoded if d.pixels is not None]
        # On CPUs the local engine's passes (the same speed per image); a GPU takes it whole.
        step = max(1, len(todo)) if self.on_gpu else self.encoder.pass_size
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            vectors, tokens, visual = encode_pass(
                self.encoder, self.pixel_format, part, self.with_tokens
            )
            for i, d in enumerate(part):
                d.encoded = (
                    vectors[i],
                    None if tokens is None else tokens[i],
                    None if visual is None else visual[i],
                )
                d.pixels = None
        return {"encoded": [pickle.dumps(d, protocol=pickle.HIGHEST_PROTOCOL) for d in decoded]}


class DecodeEncodeActor(EncoderActor):
    """An encoder actor that decodes its own batch first (the CPU layout): pickled Jobs
    in, pickled Decoded (``encoded`` set, no pixels) out."""

    def __init__(
        self,
        spec: ModelSpec,
        with_tokens: bool,
        threads: int,
        preprocess: Preprocess,
        draft: Any,
        timeout_s: float,
    ) -> None:
        super().__init__(spec, with_tokens, threads, gpus=0.0)
        self.decode_args = (preprocess, draft, timeout_s)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
        return self._encode([_decode(b, *self.decode_args) for b in batch["job"]])


@dataclass
class _Gathered:
    """A batch the actors encoded already: ``result`` only stacks its outputs."""

    decoded: list[Decoded]

    def result(self) -> Outputs:
        parts = [d.encoded for d in self.decoded]
        if any(p is None for p in parts):
            raise RayEngineError("a decoded image came back from Ray without its vector")
        vectors = np.stack([p[0] for p in parts])
        tokens = None if parts[0][1] is None else np.stack([p[1] for p in parts])
        visual = None if parts[0][2] is None else np.stack([p[2] for p in parts])
        return vectors, tokens, visual


class RayEngine:
    """Decoding and encoding on Ray (see the module docstring); connects at the first work."""

    def __init__(self, encoder: Encoder, opts: IndexOptions, with_tokens: bool) -> None:
        self.encoder = encoder
        self.opts = opts
        self.with_tokens = with_tokens
        self.spec = ModelSpec.of(encoder)  # refuse random weights before any work
        fmt = PixelFormat.from_preprocess(encoder.preprocess)
        self.preprocess: Preprocess = fmt or encoder.preprocess
        self.replaced = 0  # Ray retries failed tasks itself
        self.ray: Any = None
        self._connected = False

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._connected:
            self.ray.shutdown()
            self._connected = False

    def _start(self) -> None:
        if self.ray is None:
            cpus = ensure_threads_configured()
            self.ray, self._connected = connect(self.opts.ray_address, cpus)

    def layout(self, encode: bool = True) -> dict[str, float]:
        """How many actors and decode tasks, and what each holds, on this cluster
        (``fused``: on CPUs the actors decode too, and there are no decode tasks)."""
        self._start()
        res = self.ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
        per_gpu = self.opts.gpus_per_worker
        if not encode:  # only hashing: decode tasks on every CPU, no actors
            decoders = self.opts.decode_workers or max(1, int(cpus // DECODE_TASK_CPUS))
            return {"actors": 0, "actor_cpus": 0.0, "gpus": 0.0, "decoders": decoders, "fused": 0}
        if per_gpu > 0 and gpus < per_gpu:
            raise RayEngineError(
                f"--gpus-per-worker {per_gpu:g}, but the Ray cluster has {gpus:g} GPUs"
            )
        actors = self.opts.encode_workers or (
            int(gpus // per_gpu) if per_gpu > 0 else max(1, int(cpus))
        )
        fused = per_gpu == 0
        if fused and self.opts.decode_workers:
            raise RayEngineError(
                "--decode-workers is for GPU encoders (--gpus-per-worker); on CPUs each "
                "encoder actor decodes its own batches: set --encode-workers instead"
            )
        decode_cpus = 0.0 if fused else DECODE_TASK_CPUS
        # Ray would wait forever for actors (or a decode task) that cannot be placed.
        if actors * ACTOR_CPUS + decode_cpus > cpus or actors * per_gpu > gpus:
            raise RayEngineError(
                f"{actors} encoder actors{'' if fused else ' and a decode task'} need "
                f"{actors * ACTOR_CPUS + decode_cpus:g} CPUs and {actors * per_gpu:g} "
                f"GPUs; the Ray cluster has {cpus:g} and {gpus:g} (see --encode-workers)"
            )
        free = cpus - actors * ACTOR_CPUS
        decoders = 0 if fused else self.opts.decode_workers or max(1, int(free // decode_cpus))
        return {
            "actors": actors,
            "actor_cpus": ACTOR_CPUS,
            "gpus": per_gpu,
            "decoders": decoders,
            "fused": int(fused),
        }

    def run(self, jobs: Sequence[Job]) -> Iterator[Decoded]:
        """Every job's result, in the jobs' order, each batch as the actors finish it."""
        if not jobs:
            return
        # Only hashing (rename / touch detection): nothing to encode, no actors to start.
        encode = not all(j.hash_only for j in jobs)
        lay = self.layout(encode)
        ray = self.ray
        quiet_ray_data(ray)
        items = [{"job": pickle.dumps(j, protocol=pickle.HIGHEST_PROTOCOL)} for j in jobs]
        decode_args = {
            "preprocess": self.preprocess,
            "draft": draft_size(self.encoder.image_size),
            "timeout_s": self.opts.timeout_s,
        }
        if lay["fused"]:
            # One block per actor batch, so every actor has work from the start.
            blocks = -(-len(items) // self.opts.batch_size)
            ds = ray.data.from_items(items, override_num_blocks=blocks)
            ds = self._encoders(ds, lay, DecodeEncodeActor, decode_args)
        else:
            # One block per decode call: the tasks then run in parallel and stream to the
            # actors (from_items alone makes a few large blocks of a small list).
            blocks = -(-len(items) // DECODE_BATCH)
            ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                decode_batch,
                fn_kwargs=decode_args,
                batch_size=DECODE_BATCH,
                num_cpus=DECODE_TASK_CPUS,
                compute=ray.data.TaskPoolStrategy(size=int(lay["decoders"])),
            )
            if encode:
                ds = self._encoders(ds, lay, EncoderActor, {"gpus": lay["gpus"]})
        out = "encoded" if encode else "decoded"
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for blob in batch[out]:
                    yield pickle.loads(blob)
        except ray.exceptions.RayError as exc:
            raise RayEngineError(f"the Ray pipeline failed: {_cause(exc)}") from None

    def _encoders(self, ds: Any, lay: dict[str, float], actor: type, extra: dict[str, Any]) -> Any:
        """The actor pool stage: decoded images (or, fused, jobs) in, their outputs out."""
        return ds.map_batches(
            actor,
            fn_constructor_kwargs={
                "spec": self.spec,
                "with_tokens": self.with_tokens,
                "threads": max(1, round(lay["actor_cpus"])),
                **extra,
            },
            batch_size=self.opts.batch_size,
            num_cpus=lay["actor_cpus"],
            num_gpus=lay["gpus"] or None,
            # One batch queued per actor at a time: Ray's default (4) hands a small run's
            # few blocks to one actor while the others idle.
            compute=self.ray.data.ActorPoolStrategy(
                size=int(lay["actors"]), max_tasks_in_flight_per_actor=1
            ),
        )

    def submit(self, decoded: Sequence[Decoded]) -> _Gathered:
        """The batch's outputs, computed by the actors already."""
        return _Gathered(list(decoded))


def _cause(exc: BaseException) -> str:
    """Our own error inside a Ray error (e.g. an actor refusing other weights), else
    the Ray error's last line."""
    seen: BaseException | None = exc
    while seen is not None:
        cause = getattr(seen, "cause", None) or seen.__cause__
        if isinstance(cause, XmodalError):
            return str(cause)
        seen = cause if isinstance(cause, BaseException) else None
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]
