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

# What a Tally key may reach: the routes whose calls are reserved and
# reported here, and the model list. Everything else that could spend
# (responses, embeddings, images, audio, pass-through, …) is refused with a
# Tally key, so nothing is served unmetered.
ROUTES = {
    "/chat/completions",
    "/v1/chat/completions",
    "/completions",
    "/v1/completions",
    "/models",
    "/v1/models",
}


def _route_allowed(request: Any) -> bool:
    path = getattr(getattr(request, "url", None), "path", None)
    if path is None:
        return False
    if path.startswith("/openai/deployments/") and path.endswith("/chat/completions"):
        return True
    return path.rstrip("/") in ROUTES


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

    def drop(self, k: Any) -> None:
        with self._lock:
            self._d.pop(k, None)


# The secret's reference (what LiteLLM logs instead of the secret: the
# key's id and a prefix of the secret's digest, so two secrets of one key
# during a rotation's grace period never share it) → secret, for the hold
# the call's hook places. Never logged.
_SECRETS = _Lru(100_000)
# sha256(secret) → (checked at, the auth result): a key checked less than
# TALLY_AUTH_CACHE_MS ago is not checked again for auth (each call's
# reserve still asks Tally about the key); under TALLY_FAIL_OPEN, one
# checked less than TALLY_FAIL_OPEN_MAX_AGE_MS ago is admitted while Tally
# cannot be reached. A refusal removes the entry.
_CHECKED = _Lru(100_000)


class _Calls:
    """The calls this process reserved, by request id: what their usage
    event needs. Usage and releases are made from here only, never from
    the request's metadata (which the client writes). Entries leave with
    the call's success or failure, or when older than the hold's TTL."""

    def __init__(self) -> None:
        self._d: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, request_id: str, call: dict) -> None:
        now = time.monotonic()
        ttl = SETTINGS.hold_ttl_ms / 1000
        with self._lock:
            self._d[request_id] = (now, call)
            while self._d:
                first = next(iter(self._d.values()))
                if now - first[0] <= ttl:
                    break
                self._d.popitem(last=False)

    def pop(self, request_id: Any) -> Optional[dict]:
        if not isinstance(request_id, str):
            return None
        with self._lock:
            entry = self._d.pop(request_id, None)
        return None if entry is None else entry[1]


_CALLS = _Calls()


def _key_auth(d: dict, digest: str) -> UserAPIKeyAuth:
    ref = f"tally:{d['org_id']}:{d['api_key_id']}:{digest[:16]}"
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
    if not _route_allowed(request):
        path = getattr(getattr(request, "url", None), "path", "?")
        raise refuse(
            f"{path} is not metered by Tally: a Tally key may call chat and text completions only",
            "route_not_metered",
            403,
        )
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
        if (
            SETTINGS.fail_open
            and cached is not None
            and now - cached[0] < SETTINGS.fail_open_max_age_s
        ):
            log.warning("Tally unreachable; admitting a key it accepted recently: %s", e)
            _SECRETS.put(cached[1].api_key, api_key)
            return cached[1]
        raise refuse(f"Tally cannot be reached, calls are refused: {e}", "unavailable", 503) from e
    except Refused as e:
        log.error("Tally refused authorize (is TALLY_GATEWAY_TOKEN valid?): %s", e)
        raise refuse("the gateway's Tally token is not accepted", "gateway_token", 503) from e
    reason = d.get("reason", "")
    if not d.get("allowed") and reason not in VALID_KEY:
        _CHECKED.drop(digest)
        raise refuse(d.get("message", reason), reason, status_of(reason))
    result = _key_auth(d, digest)
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
    params = [d.get("litellm_params") or {} for d in _deployments(model)] or [{"model": model}]
    # n choices cost n completions (the prompt once).
    choices = max(1, int(data.get("n") or 1))
    best: Optional[int] = None
    for lp in params:
        name = lp.get("model")
        if not name:
            continue
        try:
            if data.get("messages") is not None:
                prompt = litellm.token_counter(model=name, messages=data["messages"])
            else:
                prompt = litellm.token_counter(model=name, text=str(data.get("prompt", "")))
            try:
                info = litellm.get_model_info(name)
            except Exception:  # noqa: BLE001 - priced by the deployment only
                info = {}
            out = (
                data.get("max_tokens")
                or data.get("max_completion_tokens")
                or info.get("max_output_tokens")
                or SETTINGS.default_output_tokens
            )
            # A deployment's own prices win, as they do for its cost.
            cin = lp.get("input_cost_per_token", info.get("input_cost_per_token"))
            cout = lp.get("output_cost_per_token", info.get("output_cost_per_token"))
            if cin is None or cout is None:
                raise ValueError("no per-token price")
            dollars = float(cin) * int(prompt) + float(cout) * int(out) * choices
        except Exception as e:  # noqa: BLE001 - an unpriced model
            log.debug("no price for %s: %s", name, e)
            continue
        m = int(math.ceil(dollars * 1_000_000))
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
        meta = data.get("metadata")
        if isinstance(meta, dict):
            # The request's metadata is the client's: nothing of Tally's
            # is read from it.
            for k in [k for k in meta if str(k).startswith("tally_")]:
                meta.pop(k, None)
        md = getattr(user_api_key_dict, "metadata", None) or {}
        org, key_id = md.get("tally_org_id"), md.get("tally_key_id")
        if not org:
            # Not a Tally key (the master key): not metered here.
            return data
        if call_type not in CALL_TYPES:
            raise refuse(f"{call_type} calls are not metered by Tally", "route_not_metered", 403)
        secret = _SECRETS.get(user_api_key_dict.api_key)
        if secret is None:
            raise refuse("the key must be presented again", "unknown_key", 401)
        if SENDER.full():
            raise refuse(
                f"{SENDER.backlog()} usage events wait for Tally; calls are refused until it answers",
                "usage_backlog",
                503,
            )
        # A client's fallbacks would reach models its key's features were
        # not checked for, at prices not reserved.
        data.pop("fallbacks", None)
        model = data.get("model") or ""
        request_id = f"{data.get('litellm_call_id') or secrets.token_hex(8)}.{secrets.token_hex(6)}"
        reserve = estimate_micros(data)
        body = {
            "api_key": secret,
            "request_id": request_id,
            "reserve_micros": reserve,
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
            d = {
                "allowed": True,
                "org_id": org,
                "user_id": md.get("tally_user_id") or body.get("user_id"),
                "api_key_id": key_id,
            }
        except Refused as e:
            raise refuse(f"Tally refused the reserve: {e.body}", "invalid", 400) from e
        if not d.get("allowed"):
            reason = d.get("reason", "")
            raise refuse(d.get("message", reason), reason, status_of(reason))
        _CALLS.put(
            request_id,
            {
                "org_id": d.get("org_id") or org,
                "user_id": d.get("user_id"),
                "api_key_id": d.get("api_key_id") or key_id,
                "reserve_micros": reserve,
            },
        )
        data.setdefault("metadata", {})["tally_request_id"] = request_id
        return data

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        params = kwargs.get("litellm_params") or {}
        request_id = (params.get("metadata") or {}).get("tally_request_id")
        call = _CALLS.pop(request_id)
        if call is None:
            # Not a call this process reserved (or reported already).
            return
        slo = kwargs.get("standard_logging_object") or {}
        cost = kwargs.get("response_cost")
        if cost is None:
            cost = slo.get("response_cost")
        # No cost known (a model litellm has no price for): what was
        # reserved, never nothing.
        cost_micros = call["reserve_micros"] if cost is None else micros(float(cost))
        event = {
            "request_id": request_id,
            "org_id": call["org_id"],
            "api_key_id": call["api_key_id"],
            "model": slo.get("model_group") or kwargs.get("model") or "",
            "provider": kwargs.get("custom_llm_provider") or slo.get("custom_llm_provider") or "",
            "input_tokens": int(slo.get("prompt_tokens") or 0),
            "output_tokens": int(slo.get("completion_tokens") or 0),
            "cost_micros": cost_micros,
            "occurred_at": _now_rfc3339(),
        }
        if call["user_id"]:
            event["user_id"] = call["user_id"]
        SENDER.add(event)

    async def async_post_call_failure_hook(
        self, request_data, original_exception, user_api_key_dict, traceback_str=None
    ):
        # The call's final failure (retries included): free its hold now.
        md = (request_data or {}).get("metadata") or {}
        request_id = md.get("tally_request_id")
        call = _CALLS.pop(request_id)
        if call is None:
            return
        org = call["org_id"]
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
