"""A fleet worth looking at for the console tests: real signed bundles with provenance,
devices in every state, and rollouts in flight (one paused by its failure threshold)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from tuf.api.metadata import Metadata, TargetFile, Targets

from delta_packager import (
    AdapterConfig,
    PackagerState,
    Provenance,
    build_bundle,
    package_version,
    parse_bundle,
)
from delta_packager.verify import target_custom
from tests.server.ota.ota_helpers import (
    FP_A,
    ROLE_KEYS,
    TufKeys,
    auth,
    create_rollout,
    enroll,
)

CONFIG = AdapterConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


def adapter(seed: int) -> dict[str, np.ndarray]:
    """A small two-layer LoRA adapter (rank 4, hidden 32)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            out[f"{name}.lora_A.weight"] = rng.uniform(-0.2, 0.2, (4, 32)).astype(np.float32)
            out[f"{name}.lora_B.weight"] = (0.01 * rng.standard_normal((32, 4))).astype(np.float32)
    return out


def provenance(version: int) -> Provenance:
    """Training provenance as a record-level DP run would sign it."""
    return Provenance(
        round=version * 3,
        num_clients=6,
        aggregation="ffa",
        clip_norm=1.0,
        noise_multiplier=0.93,
        epsilon=7.5 + version / 10,
        delta=1e-5,
        eval_metrics={"golden_loss": 2.5 - version / 10, "accuracy": 0.4 + version / 100},
        record_epsilon=7.5 + version / 10,
        record_delta=1e-5,
    )


@dataclass
class Releaser:
    """Packages and publishes successive adapter versions, as the release pipeline does."""

    keys: TufKeys
    state: PackagerState | None = None
    release: int = 0

    def publish(self, client: Any, version: int) -> None:
        """Package ``version`` and publish a release of its full bundle (and the delta
        from the previous version, if any)."""
        result = package_version(
            adapter(version),
            previous=self.state,
            base_fingerprint=FP_A,
            adapter_config=CONFIG,
            provenance=provenance(version),
        )
        self.state = result.state
        datas = [result.bundle_bytes]
        if result.bundle.manifest.kind == "delta":
            datas.append(build_bundle(result.state, from_version=None))
        self.release += 1
        expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=30)
        targets = Targets(version=self.release, expires=expires)
        for data in datas:
            path, target = _target(client, data)
            targets.targets[path] = target
        md = Metadata(targets)
        md.sign(self.keys.targets)
        response = client.post(
            "/v1/releases",
            content=md.to_bytes(),
            headers={**auth("publisher"), "Content-Type": "application/json"},
        )
        assert response.status_code == 201, response.text


def _target(client: Any, data: bytes) -> tuple[str, TargetFile]:
    """Upload one bundle; its signed TUF target."""
    bundle = parse_bundle(data)
    manifest = bundle.manifest
    name = "full" if manifest.from_version is None else f"delta-from-{manifest.from_version}"
    path = f"adapters/{manifest.to_version}/{name}.fedota"
    sha = hashlib.sha256(data).hexdigest()
    upload = client.put(f"/v1/blobs/{sha}", content=data, headers=auth("publisher"))
    assert upload.status_code == 201, upload.text
    custom = target_custom(bundle)
    # TUF's canonical JSON takes no floats: the ε/δ the console shows come from the
    # manifest signed inside the bundle, not from this (optional) copy
    custom["fedota"].pop("privacy", None)
    target = TargetFile(
        length=len(data), hashes={"sha256": sha}, path=path, unrecognized_fields={"custom": custom}
    )
    return path, target


def report_outcomes(client: Any, devices: list[Any], *, version: int, failed: int) -> None:
    """The first ``failed`` devices report ``failed`` for ``version``, the rest success;
    successes above v1 carry the golden-prompt losses the health check measured."""
    for n, device in enumerate(devices):
        kind = "failed" if n < failed else "installed"
        body: dict[str, Any] = {
            "event_id": f"{kind}-{version}-{device.id}",
            "seq": version,
            "type": kind,
            "version": version,
            "installed_version": (version if kind == "installed" else version - 1) or None,
        }
        if kind == "failed":
            body["detail"] = "health check: golden loss 3.10 > 2.60 allowed"
        if kind == "installed" and version > 1:
            body |= {"golden_loss": 2.0 + n / 100, "previous_golden_loss": 2.2}
        response = client.post(
            f"/v1/devices/{device.id}/events", json=body, headers=auth(device.token)
        )
        assert response.status_code == 200, response.text


def seed_fleet(client: Any, keys: TufKeys, *, devices: int = 40) -> dict[str, Any]:
    """v1 fully rolled out; v2 rolled out in stages, paused by its failure threshold;
    one device revoked. Returns the rollouts and devices."""
    releaser = Releaser(keys)
    releaser.publish(client, 1)
    fleet = [enroll(client) for _ in range(devices)]
    first = create_rollout(client, 1, [100], min_reports=1000)
    report_outcomes(client, fleet, version=1, failed=0)
    releaser.publish(client, 2)
    second = create_rollout(client, 2, [100], max_failure_rate=0.2, min_reports=10)
    report_outcomes(client, fleet[:12], version=2, failed=4)  # 4/10 > 0.2: auto-pause
    revoke = client.post(f"/v1/devices/{fleet[-1].id}/revoke", headers=auth("admin"))
    assert revoke.status_code == 204, revoke.text
    return {"rollouts": (first, second), "devices": fleet, "releaser": releaser}


def csrf_of(html: str) -> str:
    """The CSRF token a console page's forms carry."""
    match = CSRF_RE.search(html)
    assert match, "no CSRF field on the page"
    return match.group(1)


OPERATOR_KEY = ROLE_KEYS["operator"]
