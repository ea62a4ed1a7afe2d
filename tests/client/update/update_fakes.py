"""An in-memory OTA server (same HTTP interface as ``server/ota``) with fault injection,
a release pipeline built on ``delta_packager`` (real bundles, real TUF signatures) and
device state builders. Loopback only.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Timestamp

from client.update import DeviceConfig, DeviceState
from delta_packager import (
    AdapterConfig,
    PackagePolicy,
    PackagerState,
    Provenance,
    fingerprint_checkpoint,
    fingerprint_gguf,
    package_version,
)
from delta_packager.trust import init_keys, load_signer, load_targets, release

CONFIG = AdapterConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


# ----------------------------------------------------------------- device base model


def make_gguf_base(path: Path, *, seed: int = 0) -> str:
    """A GGUF-looking base file (magic, then bytes); returns its fingerprint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = np.random.default_rng(seed).integers(0, 255, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + body)
    return fingerprint_gguf(path)


def make_base(directory: Path, *, quant_type: str = "nf4", seed: int = 0) -> str:
    """A minimal pre-quantized-looking base dir; returns its fingerprint."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {"model.embed.weight": rng.integers(0, 255, (16, 8), dtype=np.uint8)}
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    config = {"model_type": "llama", "quantization_config": {"bnb_4bit_quant_type": quant_type}}
    (directory / "config.json").write_text(json.dumps(config))
    return fingerprint_checkpoint(directory)


# ----------------------------------------------------------------- fake server


@dataclass
class Faults:
    """Knobs the handler reads on every request (tests mutate them)."""

    cut_at: list[int] = field(default_factory=list)  # next downloads die after N bytes
    ignore_range: bool = False
    bad_content_range: int = 0  # this many 206 answers get a wrong Content-Range
    answer_416: int = 0
    fail_every_second: bool = False
    down: int = 0  # this many requests answer 503
    retry_after: tuple[int, str] | None = None  # (count, header value) -> 429
    extra_bytes: int = 0  # stream this many bytes past the body
    etag_override: list[str] = field(default_factory=list)  # ETags of the next answers
    payload_override: list[bytes] = field(default_factory=list)  # bodies of the next answers
    fail_suffix: str | None = None  # paths ending with this answer 503
    hold_at: list[int] = field(default_factory=list)  # next downloads stop after byte N...
    release_hold: threading.Event = field(default_factory=threading.Event)  # ...until set


class FakeOta:
    """Serves /tuf/ metadata and targets and /v1/devices/ from dictionaries."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.offer: dict[str, Any] | None = None
        self.faults = Faults()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.events: dict[str, dict[str, Any]] = {}
        self.token = "device-token-0123456789"
        self.device_id = "0" * 32
        self._count = 0
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"ota": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def target_gets(self) -> list[tuple[str, str, dict[str, str]]]:
        return [r for r in self.requests if r[1].startswith("/tuf/targets/")]

    def tick(self) -> int:
        with self._lock:
            self._count += 1
            return self._count


class _Handler(BaseHTTPRequestHandler):
    ota: FakeOta
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _common_faults(self) -> bool:
        ota, f = self.ota, self.ota.faults
        n = ota.tick()
        if f.fail_suffix and self.path.endswith(f.fail_suffix):
            self._send(503, b"unavailable")
            return True
        if f.down > 0:
            f.down -= 1
            self._send(503, b"down", {"Retry-After": "1"})
            return True
        if f.retry_after and f.retry_after[0] > 0:
            f.retry_after = (f.retry_after[0] - 1, f.retry_after[1])
            self._send(429, b"slow down", {"Retry-After": f.retry_after[1]})
            return True
        if f.fail_every_second and n % 2 == 0:
            self._send(503, b"flaky")
            return True
        return False

    def do_GET(self) -> None:
        ota = self.ota
        ota.requests.append(("GET", self.path, dict(self.headers)))
        if self._common_faults():
            return
        if self.path.startswith("/tuf/targets/"):
            return self._target()
        body = ota.files.get(self.path)
        if body is None:
            return self._json(404, {"error": "NotFound", "detail": self.path})
        self._send(200, body, {"Content-Type": "application/json"})

    def _target(self) -> None:
        ota, f = self.ota, self.ota.faults
        body = ota.files.get(self.path)
        if body is None:
            return self._json(404, {"error": "NotFound", "detail": self.path})
        if f.payload_override:
            body = f.payload_override.pop(0)
        etag = (
            f.etag_override.pop(0) if f.etag_override else f'"{hashlib.sha256(body).hexdigest()}"'
        )
        start, status = 0, 200
        rng = self.headers.get("Range")
        if f.answer_416 > 0 and rng:
            f.answer_416 -= 1
            return self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
        if rng and not f.ignore_range and self.headers.get("If-Range", etag) == etag:
            start, status = int(rng.split("=")[1].split("-")[0]), 206
        chunk = body[start:]
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        if status == 206:
            first = start + 1 if f.bad_content_range > 0 else start
            if f.bad_content_range > 0:
                f.bad_content_range -= 1
            headers["Content-Range"] = f"bytes {first}-{len(body) - 1}/{len(body)}"
        cut = f.cut_at.pop(0) if f.cut_at else None
        hold = f.hold_at.pop(0) if f.hold_at else None
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(chunk) + f.extra_bytes))
        self.end_headers()
        if cut is not None:
            self.wfile.write(chunk[: max(0, cut - start)])
            self.wfile.flush()
            self.close_connection = True
            return
        if hold is not None:  # the client has these bytes; the rest waits (a stalled link)
            self.wfile.write(chunk[: max(0, hold - start)])
            self.wfile.flush()
            f.release_hold.wait(timeout=60)
            self.close_connection = True
            return
        self.wfile.write(chunk + b"\0" * f.extra_bytes)

    def do_POST(self) -> None:
        ota = self.ota
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        ota.requests.append(("POST", self.path, dict(self.headers)))
        if self._common_faults():
            return
        if self.path == "/v1/devices":
            return self._json(201, {"device_id": ota.device_id, "token": ota.token})
        if self.headers.get("Authorization") != f"Bearer {ota.token}":
            return self._json(401, {"error": "AuthenticationError", "detail": "bad token"})
        if self.path.endswith("/check"):
            return self._json(200, {"update": ota.offer})
        if self.path.endswith("/events"):
            stored = body["event_id"] not in ota.events
            ota.events.setdefault(body["event_id"], body)
            return self._json(200, {"stored": stored})
        self._json(404, {"error": "NotFound", "detail": self.path})


# ----------------------------------------------------------------- release pipeline


@dataclass
class Released:
    version: int
    path: str  # TUF target path
    data: bytes
    tensors: dict[str, np.ndarray]  # what a device holds after applying it from scratch


class Pipeline:
    """Packages versions with ``delta_packager`` and publishes them to a ``FakeOta``."""

    def __init__(
        self,
        tmp: Path,
        ota: FakeOta,
        base_fingerprint: str,
        *,
        compatible_bases: tuple[str, ...] = (),
    ) -> None:
        self.keys = tmp / "keys"
        init_keys(self.keys)
        self.dir = tmp / "bundles"
        self.dir.mkdir()
        self.ota = ota
        self.fp = base_fingerprint
        self.compatible_bases = compatible_bases  # further bases every release names
        self.state: PackagerState | None = None
        self.rng = np.random.default_rng(7)
        self.adapter = {
            f"layers.{i}.self_attn.{m}.lora_{ab}.weight": self.rng.normal(
                size=(4, 64) if ab == "A" else (64, 4)
            ).astype(np.float32)
            for i in range(4)
            for m in ("q_proj", "v_proj")
            for ab in ("A", "B")
        }
        self.released: dict[int, Released] = {}
        self.snapshot_version = 0

    def next_version(
        self,
        *,
        loss: float = 1.0,
        policy: PackagePolicy | None = None,
        provenance: Provenance | None = None,
    ) -> Released:
        if self.state is not None:
            self.adapter = {
                k: v + 0.1 * self.rng.normal(size=v.shape).astype(np.float32)
                for k, v in self.adapter.items()
            }
        result = package_version(
            self.adapter,
            previous=self.state,
            base_fingerprint=self.fp,
            adapter_config=CONFIG,
            provenance=replace(provenance or Provenance(), eval_metrics={"loss": loss}),
            policy=policy,
            compatible_bases=self.compatible_bases,
        )
        self.state = result.state
        v = result.state.latest_version
        name = f"adapter-v{v}.fedota"
        (self.dir / name).write_bytes(result.bundle_bytes)
        rel = Released(
            v, f"adapters/{v}/{name}", result.bundle_bytes, dict(result.state.current.tensors)
        )
        self.released[v] = rel
        return rel

    def publish(self, *rels: Released, expires_in: timedelta = timedelta(days=1)) -> None:
        """Sign targets (offline keys) and snapshot/timestamp (online keys), serve them."""
        if rels:
            release([self.dir / posix_name(r.path) for r in rels], self.keys)
        self.serve_metadata(expires_in=expires_in)

    def add_raw_target(self, path: str, data: bytes, fedota: dict[str, Any]) -> None:
        """Sign an arbitrary payload as a target (to test the device's own checks)."""
        targets = load_targets(self.keys)
        tf = TargetFile.from_data(path, data, ["sha256"])
        tf.unrecognized_fields["custom"] = {"fedota": fedota}
        targets.signed.targets[path] = tf
        targets.signed.version += 1
        targets.signatures.clear()
        targets.sign(load_signer(self.keys / "private/targets.pem"))
        (self.keys / "metadata/targets.json").write_bytes(targets.to_bytes())
        directory, name = path.rsplit("/", 1)
        self.ota.files[f"/tuf/targets/{directory}/{tf.hashes['sha256']}.{name}"] = data
        self.serve_metadata()

    def serve_metadata(
        self, *, expires_in: timedelta = timedelta(days=1), targets_bytes: bytes | None = None
    ) -> None:
        files = self.ota.files
        for root in self.keys.glob("*.root.json"):
            files[f"/tuf/{root.name}"] = root.read_bytes()
        targets = load_targets(self.keys)
        n = targets.signed.version
        raw = targets_bytes or (self.keys / "metadata/targets.json").read_bytes()
        files[f"/tuf/{n}.targets.json"] = raw
        for rel in self.released.values():
            files[self.target_url_path(rel)] = rel.data
        self.snapshot_version += 1
        sv = self.snapshot_version
        expires = datetime.now(UTC).replace(microsecond=0) + expires_in
        snapshot = Metadata(
            Snapshot(version=sv, expires=expires, meta={"targets.json": MetaFile(n)})
        )
        snapshot.sign(load_signer(self.keys / "private/snapshot.pem"))
        files[f"/tuf/{sv}.snapshot.json"] = snapshot.to_bytes()
        timestamp = Metadata(Timestamp(version=sv, expires=expires, snapshot_meta=MetaFile(sv)))
        timestamp.sign(load_signer(self.keys / "private/timestamp.pem"))
        files["/tuf/timestamp.json"] = timestamp.to_bytes()

    def target_url_path(self, rel: Released) -> str:
        directory, name = rel.path.rsplit("/", 1)
        return f"/tuf/targets/{directory}/{hashlib.sha256(rel.data).hexdigest()}.{name}"

    def offer(self, rel: Released | None, *, path: str | None = None) -> None:
        self.ota.offer = (
            None if rel is None else {"path": path or rel.path, "to_version": rel.version}
        )


def posix_name(target_path: str) -> str:
    return target_path.rsplit("/", 1)[1]


def forged_signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def enroll_device(root: Path, ota: FakeOta, keys: Path, base_dir: Path, fp: str) -> DeviceState:
    """Provision a device state directory as ``fedota device enroll`` does."""
    state = DeviceState(root)
    state.tuf_dir.mkdir(parents=True)
    (state.tuf_dir / "root.json").write_bytes((keys / "1.root.json").read_bytes())
    state.write_config(
        DeviceConfig(ota.url, ota.device_id, ota.token, str(base_dir), fp, 512 * 2**20)
    )
    return state


def bomb_bundle(declared: int) -> bytes:
    """A zstd frame whose content size claims ``declared`` bytes."""
    import zstandard

    return zstandard.ZstdCompressor().compress(b"\0" * declared)


def huge_header_bundle() -> bytes:
    import zstandard

    payload = struct.pack("<Q", 2**60) + b"{}"
    return zstandard.ZstdCompressor().compress(payload)


Hook = Callable[[str], None]
