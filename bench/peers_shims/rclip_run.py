"""rclip (PyPI rclip 3.3.0) indexing and query paths in process, for bench/peers.py.

rclip runs its model through onnxruntime from files it downloads once into its data
folder (``RCLIP_DATADIR``). bench/peers.py puts there the ONNX export of the shared
ViT-B-32 checkpoint under the names rclip looks for, so nothing downloads. rclip's own
model is ViT-B-32-256 (256 px input); with the shared 224 px weights its preprocessing
resizes to 224 (one module constant): the only change to rclip.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time

from common import emit, parse_args, pin, timed_queries

SHARED_INPUT_PX = 224  # ViT-B-32's input, as the shared checkpoint was trained


def main() -> None:
    args = parse_args()
    pin(args.threads)
    os.environ["RCLIP_DATADIR"] = str(args.work / "rclip-data")
    import rclip.utils.preprocess as rclip_preprocess
    from rclip import main as rclip_main

    rclip_preprocess.IMAGE_SIZE = SHARED_INPUT_PX
    folder = str(args.folder.resolve())
    batch = 8  # rclip's default --indexing-batch-size
    if args.phase == "index":
        t0 = time.perf_counter()
        rc, _model, db = rclip_main.init_rclip(folder, batch)
        seconds = time.perf_counter() - t0
        rc.close()
        db.close()
        with sqlite3.connect(args.work / "rclip-data" / "db.sqlite3") as con:
            (n,) = con.execute("SELECT COUNT(*) FROM images WHERE deleted IS NULL").fetchone()
        emit(indexed=n, seconds=seconds)
        return
    rc, _model, _db = rclip_main.init_rclip(folder, batch, no_indexing=True)
    queries = json.loads(args.queries.read_text())

    def run(q: str) -> list[str]:
        return [r.filepath for r in rc.search(q, folder, top_k=args.k)]

    emit(**timed_queries(queries, run))


if __name__ == "__main__":
    main()
