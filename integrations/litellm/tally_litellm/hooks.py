"""The proxy's hooks: `auth` (LiteLLM's custom_auth) and `handler` (a
CustomLogger): authenticate with Tally API keys, reserve each call's
estimated cost, report what it cost, release what a failed call held."""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import secrets
import threading
import time
from typing import Any, Optional

import litellm
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import ProxyException, UserAPIKeyAuth

from .client import Refused, Tally, Unreachable
from .config import Settings

log = logging.getLogger("tally_litellm")

SETTINGS = Settings.from_env()
TALLY = Tally(SETTINGS)

# Imported after the settings: a missing TALLY_URL stops the proxy at start.
from .usage import UsageSender  # noqa: E402

SENDER = UsageSender(TALLY, SETTINGS)

# Tally's refusal reasons, as HTTP statuses.
UNAUTHORIZED = {"unknown_key", "key_revoked", "key_expired"}
OVER_BUDGET = {
    "user_monthly_limit",
    "key_monthly_limit",
    "group_monthly_limit",
    "org_monthly_limit",
    "too_many_holds",
}
# A key that is valid but refused for the call it would make: auth lets it
# through, the call is refused before it runs.
VALID_KEY = OVER_BUDGET | {"user_required", "feature_not_enabled"}

CALL_TYPES = {"completion", "acompletion", "text_completion", "atext_completion"}


def status_of(reason: str) -> int:
    if reason in UNAUTHORIZED:
        return 401
    if reason in OVER_BUDGET:
        return 429
    return 403


def refuse(message: str, reason: str, status: int) -> ProxyException:
    kind = {401: "auth_error", 429: "budget_exceeded", 503: "service_unavailable"}
    return ProxyException(
        message=f"tally: {message}",
        type=kind.get(status, "permission_error"),
        param=reason,
        code=status,
    )


class _Lru:
    """A bounded map, oldest entry out first."""

    def __init__(self, size: int):
        self.size = size
        self._d: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, k: Any) -> Any:
        with self._lock:
            v = self._d.get(k)
            if v is not None:
                self._d.move_to_end(k)
            return v

    def put(self, k: Any, v: Any) -> None:
        with self._lock:
            self._d[k] = v
            self._d.move_to_end(k)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


# The key's reference (what LiteLLM logs instead of the secret) → secret,
# for the hold the call's hook places. Never logged.
_SECRETS = _Lru(100_000)
# sha256(secret) → (checked at, the auth result): a key checked less than
# TALLY_AUTH_CACHE_MS ago is not checked again for auth (each call's
# reserve still asks Tally about the key).
_CHECKED = _Lru(100_000)


def _key_auth(d: dict) -> UserAPIKeyAuth:
    ref = f"tally:{d['org_id']}:{d['api_key_id']}"
    return UserAPIKeyAuth(
        api_key=ref,
        user_id=d.get("user_id"),
        team_id=d["org_id"],
        key_alias=d["api_key_id"],
        metadata={
            "tally_org_id": d["org_id"],
            "tally_key_id": d["api_key_id"],
            "tally_user_id": d.get("user_id"),
        },
    )


async def auth(request: Any, api_key: Optional[str]) -> UserAPIKeyAuth:
    """LiteLLM's custom_auth: the bearer key is a Tally API key."""
    if not api_key:
        raise refuse(
            "no API key: send Authorization: Bearer <your Tally API key>",
            "unknown_key",
            401,
        )
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    now = time.monotonic()
    cached = _CHECKED.get(digest)
    if cached is not None and now - cached[0] < SETTINGS.auth_cache_s:
        _SECRETS.put(cached[1].api_key, api_key)
        return cached[1]
    try:
        d = await TALLY.authorize({"api_key": api_key})
    except Unreachable as e:
        if SETTINGS.fail_open and cached is not None:
            log.warning("Tally unreachable; admitting a key it knew: %s", e)
            return cached[1]
        raise refuse(f"Tally cannot be reached, calls are refused: {e}", "unavailable", 503) from e
    except Refused as e:
        log.error("Tally refused authorize (is TALLY_GATEWAY_TOKEN valid?): %s", e)
        raise refuse("the gateway's Tally token is not accepted", "gateway_token", 503) from e
    reason = d.get("reason", "")
    if not d.get("allowed") and reason not in VALID_KEY:
        raise refuse(d.get("message", reason), reason, status_of(reason))
    result = _key_auth(d)
    _SECRETS.put(result.api_key, api_key)
    _CHECKED.put(digest, (now, result))
    return result


def micros(dollars: float) -> int:
    """Dollars as integer micro-USD, half up: converted once, here."""
    return int(math.floor(dollars * 1_000_000 + 0.5))


def _deployments(model: str) -> list:
    try:
        from litellm.proxy.proxy_server import llm_router
    except ImportError:
        return []
    if llm_router is None:
        return []
    try:
        return llm_router.get_model_list(model_name=model) or []
    except Exception:  # noqa: BLE001 - a router without the model
        return []


def estimate_micros(data: dict) -> int:
    """The most the call can cost: its prompt's tokens, and the request's
    max_tokens (else the model's output limit), at the dearest of the
    model group's deployments, by litellm's own prices."""
    model = data.get("model") or ""
    names = [
        (d.get("litellm_params") or {}).get("model") for d in _deployments(model)
    ] or [model]
    best: Optional[int] = None
    for name in filter(None, names):
        try:
            info = litellm.get_model_info(name)
            if data.get("messages") is not None:
                prompt = litellm.token_counter(model=name, messages=data["messages"])
            else:
                prompt = litellm.token_counter(model=name, text=str(data.get("prompt", "")))
            out = (
                data.get("max_tokens")
                or data.get("max_completion_tokens")
                or info.get("max_output_tokens")
                or SETTINGS.default_output_tokens
            )
            p, c = litellm.cost_per_token(
                model=name, prompt_tokens=int(prompt), completion_tokens=int(out)
            )
        except Exception as e:  # noqa: BLE001 - an unpriced model
            log.debug("no price for %s: %s", name, e)
            continue
        m = int(math.ceil((p + c) * 1_000_000))
        best = m if best is None else max(best, m)
    return SETTINGS.default_reserve_micros if best is None else best


def _now_rfc3339() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class TallyHandler(CustomLogger):
    """Holds before each call, usage after it, release on failure."""

    # Defined on this class itself: LiteLLM runs a callback's pre-call hook
    # only when the class defines it (not when inherited).
    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        if call_type not in CALL_TYPES:
            return data
        md = getattr(user_api_key_dict, "metadata", None) or {}
        org, key_id = md.get("tally_org_id"), md.get("tally_key_id")
        secret = _SECRETS.get(user_api_key_dict.api_key)
        if not org or secret is None:
            # Not a Tally key (the master key): not metered here.
            return data
        if SENDER.full():
            raise refuse(
                f"{SENDER.backlog()} usage events wait for Tally; calls are refused until it answers",
                "usage_backlog",
                503,
            )
        model = data.get("model") or ""
        request_id = f"{data.get('litellm_call_id') or secrets.token_hex(8)}.{secrets.token_hex(6)}"
        body = {
            "api_key": secret,
            "request_id": request_id,
            "reserve_micros": estimate_micros(data),
            "hold_ttl_ms": SETTINGS.hold_ttl_ms,
        }
        if SETTINGS.model_feature_prefix:
            body["feature"] = SETTINGS.model_feature_prefix + model
        if md.get("tally_user_id") is None and data.get("user"):
            # A key of groups only: the caller names its user.
            body["user_id"] = str(data["user"])
        try:
            d = await TALLY.authorize(body)
        except Unreachable as e:
            if not SETTINGS.fail_open:
                raise refuse(f"Tally cannot be reached, calls are refused: {e}", "unavailable", 503) from e
            log.warning("Tally unreachable; the call goes on without a hold: %s", e)
            d = {"allowed": True, "org_id": org, "user_id": md.get("tally_user_id"), "api_key_id": key_id}
        except Refused as e:
            raise refuse(f"Tally refused the reserve: {e.body}", "invalid", 400) from e
        if not d.get("allowed"):
            reason = d.get("reason", "")
            raise refuse(d.get("message", reason), reason, status_of(reason))
        meta = data.setdefault("metadata", {})
        meta["tally_request_id"] = request_id
        meta["tally_org_id"] = d.get("org_id") or org
        meta["tally_user_id"] = d.get("user_id")
        meta["tally_key_id"] = d.get("api_key_id") or key_id
        return data

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        params = kwargs.get("litellm_params") or {}
        md = params.get("metadata") or {}
        request_id = md.get("tally_request_id")
        if not request_id:
            return
        slo = kwargs.get("standard_logging_object") or {}
        cost = kwargs.get("response_cost")
        if cost is None:
            cost = slo.get("response_cost") or 0.0
        event = {
            "request_id": request_id,
            "org_id": md["tally_org_id"],
            "api_key_id": md.get("tally_key_id"),
            "model": slo.get("model_group") or kwargs.get("model") or "",
            "provider": kwargs.get("custom_llm_provider") or slo.get("custom_llm_provider") or "",
            "input_tokens": int(slo.get("prompt_tokens") or 0),
            "output_tokens": int(slo.get("completion_tokens") or 0),
            "cost_micros": micros(float(cost)),
            "occurred_at": _now_rfc3339(),
        }
        if md.get("tally_user_id"):
            event["user_id"] = md["tally_user_id"]
        SENDER.add(event)

    async def async_post_call_failure_hook(
        self, request_data, original_exception, user_api_key_dict, traceback_str=None
    ):
        # The call's final failure (retries included): free its hold now.
        md = (request_data or {}).get("metadata") or {}
        request_id, org = md.get("tally_request_id"), md.get("tally_org_id")
        if not request_id or not org:
            return
        for attempt in range(3):
            try:
                await TALLY.release(org, request_id)
                return
            except Unreachable as e:
                log.warning("releasing hold %s failed (attempt %d): %s", request_id, attempt + 1, e)
            except Refused as e:
                log.error("Tally refused to release hold %s: %s", request_id, e)
                return
        log.error("hold %s stays until its TTL", request_id)


handler = TallyHandler()
