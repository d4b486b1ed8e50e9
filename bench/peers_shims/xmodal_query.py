"""xmodal's query path in process: SearchEngine.text_to_images on a bundle that
`xmodal index` built (run by bench/peers.py with xmodal's own venv)."""

from __future__ import annotations

import json

from common import emit, parse_args, pin, timed_queries


def main() -> None:
    args = parse_args()
    pin(args.threads)
    from xmodal.crossmodal.threads import configure_threads
    from xmodal.search.engine import SearchEngine

    configure_threads(args.threads)
    engine = SearchEngine(args.work / "bundle", rerank=False)  # ViT-B-32 has no reranker
    queries = json.loads(args.queries.read_text())

    def run(q: str) -> list[str]:
        return [r.path for r in engine.text_to_images(q, k=args.k)]

    emit(**timed_queries(queries, run))


if __name__ == "__main__":
    main()
