"""Settings of the OTA service, parsed once at the edge (environment or CLI).

Secrets (role keys, enrollment secret) have no defaults: the service refuses to start
without them unless ``dev_mode`` is set explicitly, in which case fixed, loudly logged
development values are used. Nothing deeper than this module reads the environment.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol import PrivacyPolicy

logger = logging.getLogger(__name__)

ENV_PREFIX = "FEDOTA_OTA_"
_SECRET_FIELDS = ("admin_key", "operator_key", "publisher_key", "enrollment_secret")
_MIN_SECRET_CHARS = 16


class OtaSettings(BaseSettings):
    """Configuration of one OTA server process.

    Every field can be given as an environment variable ``FEDOTA_OTA_<FIELD>``.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    database_url: str = Field(
        description="SQLAlchemy URL (sqlite:///... or postgresql+psycopg://...)"
    )
    storage_dir: Path = Field(description="Directory for content-addressed blobs.")
    trusted_root: Path = Field(description="The trusted TUF root.json (offline-signed).")
    snapshot_key: Path = Field(description="PKCS#8 PEM of the online snapshot key.")
    timestamp_key: Path = Field(description="PKCS#8 PEM of the online timestamp key.")

    dev_mode: bool = False
    admin_key: SecretStr | None = None
    operator_key: SecretStr | None = None
    publisher_key: SecretStr | None = None
    enrollment_secret: SecretStr | None = None

    timestamp_expiry_s: int = Field(default=86_400, ge=60)
    snapshot_expiry_s: int = Field(default=7 * 86_400, ge=120)
    refresh_interval_s: float = Field(default=60.0, gt=0)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    max_blob_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    max_concurrent_downloads: int = Field(default=64, ge=1)
    max_concurrent_requests: int = Field(default=512, ge=1)
    retry_after_s: int = Field(default=2, ge=1)
    simulation_seed: int | None = Field(
        default=None,
        description="Derive device ids and rollout salts from this seed instead of the "
        "system's randomness, so that a simulation is reproducible (`fedota simulate` sets "
        "it). Never in production: ids and stage membership become predictable.",
    )
    db_pool_size: int = Field(default=10, ge=1)
    max_auth_failures: int = Field(
        default=10,
        ge=1,
        description="Failed credentials (wrong enrollment secret; unknown device token) a "
        "client address, or an address claiming one device id, may send within "
        "auth_failure_window_s before it is answered 429 + Retry-After. Counted per worker.",
    )
    auth_failure_window_s: float = Field(default=60.0, gt=0, le=86_400)
    check_threads: int = Field(
        default=4,
        ge=1,
        description="Update checks run on this many threads per worker, each with a pooled "
        "connection of its own. A few suffice (a check waits on the database for well under "
        "a millisecond); more only contend for the interpreter lock.",
    )

    stale_after_s: float = Field(
        default=7 * 86_400,
        gt=0,
        description="Fleet inventory: a device not seen (no update check, no event) for "
        "this long is listed as stale.",
    )
    seen_flush_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often each worker writes the last-seen times it collected from "
        "update checks (one batched UPDATE; the check itself never writes them).",
    )

    max_record_epsilon: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Release gate: refuse to publish or roll out a release whose signed "
        "provenance spent a larger record-level (per text) ε, or records none.",
    )
    max_user_epsilon: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Release gate: the same for the user-level (per device) ε.",
    )
    max_delta: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Release gate: the largest δ of any ε the policy bounds.",
    )

    def privacy_policy(self) -> PrivacyPolicy:
        """The operator's privacy release gate (ADR 0014)."""
        return PrivacyPolicy(self.max_record_epsilon, self.max_user_epsilon, self.max_delta)

    @model_validator(mode="after")
    def _require_secrets(self) -> OtaSettings:
        missing = [name for name in _SECRET_FIELDS if getattr(self, name) is None]
        if missing and not self.dev_mode:
            names = ", ".join(ENV_PREFIX + n.upper() for n in missing)
            raise ValueError(
                f"missing secrets: {names}; set them (at least {_MIN_SECRET_CHARS} characters "
                "each), or pass --dev for throwaway development values"
            )
        for name in _SECRET_FIELDS:
            value = getattr(self, name)
            if value is None:
                logger.warning("dev mode: using a fixed development value for %s", name)
                object.__setattr__(self, name, SecretStr(f"dev-{name.replace('_', '-')}-0000"))
            elif len(value.get_secret_value()) < _MIN_SECRET_CHARS:
                raise ValueError(
                    f"{ENV_PREFIX}{name.upper()} is shorter than {_MIN_SECRET_CHARS} characters"
                )
        if self.simulation_seed is not None:
            logger.warning(
                "simulation seed %d: device ids and rollout salts are derived from it "
                "(reproducible simulations only; unset %sSIMULATION_SEED in production)",
                self.simulation_seed,
                ENV_PREFIX,
            )
        return self

    def secret(self, name: str) -> str:
        """The plain value of secret ``name`` (validated non-empty above)."""
        value = getattr(self, name)
        assert isinstance(value, SecretStr)
        return value.get_secret_value()
