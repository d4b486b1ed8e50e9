"""The search page as a person meets it, in headless Chromium against `xmodal serve`.

1. Start `xmodal serve` on --bundle (127.0.0.1, a free port).
2. Page weight: the HTML, CSS and JavaScript of one --k result page (thumbnails apart).
3. Enter -> first thumbnail: type each query, press Enter, wait until the first result's
   thumbnail has decoded; reranked and with reranking off in the same run, each mode in a
   fresh browser context (a cold browser cache; the server's thumbnail cache is warm
   after the first query that shows an image).

Prints one JSON object. Needs Debian's chromium and playwright (the dev extras).
Usage: .venv/bin/python bench/page_latency.py --bundle data/demo/bundle
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

QUERIES = [
    "a small red circle",
    "a large green star",
    "two shapes in a row",
    "a blue heart on a black background",
    "a small yellow cross",
    "a pink square above a cyan triangle",
    "a large purple crescent",
    "a checkered background",
]
START_TIMEOUT_S = 120
FIRST_THUMBNAIL = (
    "() => { const i = document.querySelector('.grid img');"
    " return i && i.complete && i.naturalWidth > 0; }"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"xmodal serve exited with {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"xmodal serve did not listen within {START_TIMEOUT_S} s")


def main() -> None:
    """Run the measurements and print them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--k", type=int, default=24)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    port = _free_port()
    cli = Path(sys.executable).with_name("xmodal")
    command = [str(cli), "serve", "--bundle", str(args.bundle)]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out: dict = {"machine": f"{platform.machine()}, {platform.node()}", "k": args.k}
    try:
        _wait_for(port, server)
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            sizes: dict[str, tuple[str, int]] = {}

            def record(response) -> None:
                kind = response.request.resource_type
                if kind in ("document", "stylesheet", "script"):
                    sizes[response.url] = (kind, len(response.body()))

            page.on("response", record)
            page.goto(f"{base}/?q={QUERIES[0].replace(' ', '+')}&k={args.k}")
            page.wait_for_function(FIRST_THUMBNAIL, polling="raf")
            by_kind: dict[str, int] = {}
            for kind, n in sizes.values():
                by_kind[kind] = by_kind.get(kind, 0) + n
            out["page_bytes"] = {**by_kind, "total": sum(by_kind.values())}
            page.close()
            for mode in ("reranked", "dual"):
                page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
                times = []
                for q in QUERIES:
                    page.goto(base + "/")
                    if mode == "dual" and page.locator("#rerank").count():
                        page.uncheck("#rerank")
                    page.fill("#q", q)
                    started = time.perf_counter()
                    page.keyboard.press("Enter")
                    page.wait_for_function(FIRST_THUMBNAIL, polling="raf", timeout=30_000)
                    times.append(time.perf_counter() - started)
                out[f"enter_to_thumbnail_s_{mode}"] = {
                    "median": round(statistics.median(times), 3),
                    "each": [round(t, 3) for t in times],
                }
            browser.close()
        dual = out["enter_to_thumbnail_s_dual"]["median"]
        out["reranked_vs_dual"] = round(out["enter_to_thumbnail_s_reranked"]["median"] / dual, 2)
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
