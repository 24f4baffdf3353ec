"""Tally's HTTP API, as the integration uses it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional
from urllib.parse import quote

import httpx

from .config import Settings

log = logging.getLogger("tally_litellm")


class Unreachable(Exception):
    """Tally did not answer, or answered that it cannot now (5xx)."""


class Refused(Exception):
    """Tally answered 4xx: the request itself is wrong (or the token)."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"Tally answered {status}: {body}")
        self.status = status
        self.body = body


class Tally:
    def __init__(self, settings: Settings):
        self.s = settings
        self._client: Optional[httpx.AsyncClient] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def _headers(self) -> dict:
        return {"authorization": f"Bearer {self.s.token}"}

    def _http(self) -> httpx.AsyncClient:
        # One client per event loop (the proxy runs one per worker).
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = httpx.AsyncClient(
                base_url=self.s.url,
                headers=self._headers(),
                timeout=self.s.timeout_s,
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            )
            self._loop = loop
        return self._client

    async def _send(self, method: str, path: str, body: Any = None) -> Any:
        try:
            r = await self._http().request(method, path, json=body)
        except httpx.HTTPError as e:
            raise Unreachable(f"{method} {path}: {e!r}") from e
        return _answer(method, path, r)

    async def authorize(self, body: dict) -> dict:
        return await self._send("POST", "/v1/authorize", body)

    async def release(self, org_id: str, request_id: str) -> dict:
        path = f"/v1/orgs/{quote(org_id, safe='')}/holds/{quote(request_id, safe='')}"
        return await self._send("DELETE", path)

    async def post_usage(self, events: list) -> dict:
        return await self._send("POST", "/v1/usage", {"events": events})

    def post_usage_sync(self, events: list, timeout_s: float) -> dict:
        """For the flush at exit, when no event loop may be left."""
        try:
            with httpx.Client(
                base_url=self.s.url, headers=self._headers(), timeout=timeout_s
            ) as c:
                r = c.post("/v1/usage", json={"events": events})
        except httpx.HTTPError as e:
            raise Unreachable(f"POST /v1/usage: {e!r}") from e
        return _answer("POST", "/v1/usage", r)


def _answer(method: str, path: str, r: httpx.Response) -> Any:
    if r.status_code >= 500:
        raise Unreachable(f"{method} {path}: {r.status_code} {r.text[:300]}")
    try:
        body = r.json()
    except ValueError:
        body = r.text
    if r.status_code >= 400:
        raise Refused(r.status_code, body)
    return body
