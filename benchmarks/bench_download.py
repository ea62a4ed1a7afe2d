"""Bytes re-downloaded after interruptions at random offsets (issue 6 benchmark).

A loopback HTTP server (stdlib, Range/If-Range with a strong ETag, like ``fedota
serve``'s ``/tuf/targets/``) serves a random blob; each of the first ``--cuts``
responses is cut at a random offset (the connection is closed mid-body). The agent's
``client.update.download.download`` resumes after every cut. Reported per size:

* ``received_bytes`` — every byte the client read off the wire;
* ``refetched_bytes`` = received − size — bytes downloaded more than once;
* ``refetch_per_cut_bytes`` — re-fetched bytes per interruption;
* the target: at most one chunk re-fetched per interruption, where a chunk is one
  network read (httpx reads at most 64 KiB at a time).

Usage::

    python benchmarks/bench_download.py                 # sizes 1, 16, 64 MiB; 20 cuts each
    python benchmarks/bench_download.py --quick         # 1 MiB, 5 cuts (CI)
    python benchmarks/bench_download.py --out runs/bench_download.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from client.update import Retrier, RetryPolicy
from client.update.download import download

CHUNK_BYTES = 64 * 1024  # httpx's largest single network read


class _Clock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        del seconds  # resuming immediately keeps the benchmark about bytes, not waits


def _server(blob: bytes, cuts: list[int]) -> tuple[ThreadingHTTPServer, dict[str, int]]:
    etag = f'"{hashlib.sha256(blob).hexdigest()}"'
    sent = {"bytes": 0, "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            sent["requests"] += 1
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng and self.headers.get("If-Range") == etag:
                start, status = int(rng.split("=")[1].split("-")[0]), 206
            self.send_response(status)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(blob) - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
            self.end_headers()
            cut = cuts.pop(0) if cuts else None
            end = len(blob) if cut is None or cut <= start else cut
            view = memoryview(blob)
            for i in range(start, end, CHUNK_BYTES):
                piece = view[i : min(end, i + CHUNK_BYTES)]
                self.wfile.write(piece)
                sent["bytes"] += len(piece)
            self.wfile.flush()
            if cut is not None and cut > start:
                self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, sent


def run_one(size: int, n_cuts: int, seed: int) -> dict[str, Any]:
    """Download ``size`` random bytes through ``n_cuts`` random interruptions."""
    rng = random.Random(seed)
    blob = os.urandom(size)
    cuts = sorted(rng.randrange(1, size) for _ in range(n_cuts))
    httpd, sent = _server(blob, list(cuts))
    try:
        with tempfile.TemporaryDirectory() as tmp, httpx.Client(timeout=30) as http:
            dest = Path(tmp) / "blob"
            retrier = Retrier(RetryPolicy(max_attempts=n_cuts + 2, budget_s=600), clock=_Clock())
            started = time.perf_counter()
            stats = download(
                http,
                retrier,
                url=f"http://127.0.0.1:{httpd.server_address[1]}/b",
                dest=dest,
                length=size,
            )
            elapsed = time.perf_counter() - started
            ok = hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(blob).digest()
    finally:
        httpd.shutdown()
        httpd.server_close()
    refetched = stats.received_bytes - size
    interruptions = max(1, stats.requests - 1)
    return {
        "size_bytes": size,
        "interruptions": stats.requests - 1,
        "requests": stats.requests,
        "server_sent_bytes": sent["bytes"],
        "received_bytes": stats.received_bytes,
        "refetched_bytes": refetched,
        "refetch_per_cut_bytes": refetched / interruptions,
        "chunk_bytes": CHUNK_BYTES,
        "target_met": ok and refetched <= CHUNK_BYTES * (stats.requests - 1),
        "hash_ok": ok,
        "seconds": round(elapsed, 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and optionally write) a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cuts", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sizes = [2**20] if args.quick else [2**20, 16 * 2**20, 64 * 2**20]
    cuts = 5 if args.quick else args.cuts
    rows = [run_one(size, cuts, args.seed + i) for i, size in enumerate(sizes)]
    report = {"benchmark": "download_resume", "cuts_per_size": cuts, "rows": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if all(r["target_met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
