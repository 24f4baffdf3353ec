"""Settings, from the environment (read once, at import)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _bool(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {v!r}")


def _int(name: str, default: int, lo: int, hi: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None
    if not lo <= n <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {n}")
    return n


@dataclass(frozen=True)
class Settings:
    url: str
    token: str
    fail_open: bool
    fail_open_max_age_s: float
    timeout_s: float
    hold_ttl_ms: int
    model_feature_prefix: str
    default_output_tokens: int
    default_reserve_micros: int
    auth_cache_s: float
    batch_max: int
    flush_interval_s: float
    buffer_max: int
    shutdown_flush_s: float

    @staticmethod
    def from_env() -> "Settings":
        url = os.environ.get("TALLY_URL", "").rstrip("/")
        token = os.environ.get("TALLY_GATEWAY_TOKEN", "")
        if not url:
            raise ValueError("TALLY_URL is not set (e.g. http://tally:8080)")
        if not token:
            raise ValueError(
                "TALLY_GATEWAY_TOKEN is not set: a gateway token from "
                "POST /v1/gateway-tokens (or an org's gateway token)"
            )
        return Settings(
            url=url,
            token=token,
            fail_open=_bool("TALLY_FAIL_OPEN", False),
            fail_open_max_age_s=_int("TALLY_FAIL_OPEN_MAX_AGE_MS", 300_000, 0, 86_400_000) / 1000,
            timeout_s=_int("TALLY_TIMEOUT_MS", 2_000, 50, 60_000) / 1000,
            hold_ttl_ms=_int("TALLY_HOLD_TTL_MS", 600_000, 1_000, 3_600_000),
            model_feature_prefix=os.environ.get("TALLY_MODEL_FEATURE_PREFIX", "model:"),
            default_output_tokens=_int("TALLY_DEFAULT_OUTPUT_TOKENS", 4_096, 1, 10_000_000),
            default_reserve_micros=_int(
                "TALLY_DEFAULT_RESERVE_MICROS", 100_000, 0, 1_000_000_000_000
            ),
            auth_cache_s=_int("TALLY_AUTH_CACHE_MS", 5_000, 0, 3_600_000) / 1000,
            batch_max=_int("TALLY_USAGE_BATCH_MAX", 500, 1, 10_000),
            flush_interval_s=_int("TALLY_USAGE_FLUSH_MS", 200, 10, 60_000) / 1000,
            buffer_max=_int("TALLY_USAGE_BUFFER_MAX", 100_000, 1, 10_000_000),
            shutdown_flush_s=_int("TALLY_SHUTDOWN_FLUSH_MS", 5_000, 0, 600_000) / 1000,
        )
