"""Rewards over HTTP: the wire format shared with `awm-fast serve-reward` (commands/serve_reward.py) and the
trainer's client, `reward.name=http` with reward.options {url, timeout_s, retries, backoff_s, batch_size}.

Request: POST <url>/score, Content-Type application/x-awm-reward, body
    b"AWM1" | uint32 big-endian n | n bytes of UTF-8 JSON {"prompts": [...], "metadata": [...], "evaluating": bool}
           | the image batch as NumPy .npy bytes: uint8 (N, C, H, W), C = 1 or 3, round(clamp(x, 0, 1) * 255)
(no pickle: the server reads the array with allow_pickle=False). Response: JSON {"scores": {"reward": [N
floats], <sub-score>: [N floats], ...}} or, on an error, {"error": "one line"} with HTTP 400 (bad input: the
client raises ValueError, not retried) or 500. GET <url>/health answers {"status": "ok", "reward": name}.

The client splits a call into requests of at most batch_size images (0: one request), retries connection
errors, timeouts and HTTP 5xx `retries` times (waiting backoff_s, doubling, at most 30 s), then raises
RewardServerError naming the server: never a silent 0. Images travel as 8-bit, as every image reward sees them.
"""
from __future__ import annotations

import io
import json
import math
import socket
import struct
import time
import urllib.error
import urllib.request

import numpy as np
import torch

from awm_fast.rewards.base import check_batch, to_uint8_arrays

MAGIC = b"AWM1"
CONTENT_TYPE = "application/x-awm-reward"


class RewardServerError(RuntimeError):
    """The reward server is unreachable or answers something that is not a score list."""


def to_uint8_batch(images) -> np.ndarray:
    """(N, C, H, W) uint8 from a float tensor in [0, 1] (channels kept) or a list of PIL images (RGB)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
        return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.stack(to_uint8_arrays(images)).transpose(0, 3, 1, 2).copy()


def encode_request(batch: np.ndarray, prompts: list[str], metadata: list[dict], evaluating: bool = False) -> bytes:
    head = json.dumps({"prompts": list(prompts), "metadata": list(metadata), "evaluating": bool(evaluating)}).encode()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(batch, dtype=np.uint8), allow_pickle=False)
    return MAGIC + struct.pack(">I", len(head)) + head + buf.getvalue()


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str], list[dict], bool]:
    """(images float (N, C, H, W) in [0, 1], prompts, metadata, evaluating); ValueError for a malformed body."""
    if len(body) < 8 or body[:4] != MAGIC:
        raise ValueError(f"body does not start with {MAGIC!r} (see awm_fast/rewards/http.py for the format)")
    (n,) = struct.unpack(">I", body[4:8])
    if 8 + n > len(body):
        raise ValueError(f"JSON header of {n} bytes runs past the {len(body)}-byte body")
    try:
        head = json.loads(body[8:8 + n].decode())
        batch = np.load(io.BytesIO(body[8 + n:]), allow_pickle=False)
    except (ValueError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise ValueError(f"malformed request ({type(exc).__name__}: {str(exc)[:200]})") from None
    prompts, metadata = head.get("prompts"), head.get("metadata")
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {batch.dtype} {batch.shape}")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != len(batch):
        raise ValueError(f"'prompts' must be a list of {len(batch)} strings")
    if not isinstance(metadata, list) or len(metadata) != len(batch) or not all(isinstance(m, dict) for m in metadata):
        raise ValueError(f"'metadata' must be a list of {len(batch)} objects")
    return torch.from_numpy(batch).float() / 255, prompts, metadata, bool(head.get("evaluating", False))


def decode_scores(data: bytes, n: int, url: str) -> dict[str, torch.Tensor]:
    """The response's score columns; RewardServerError for anything but N finite numbers per column."""
    try:
        parsed = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError):
        raise RewardServerError(f"reward 'http': server {url} sent a response that is not JSON "
                                f"({data[:60]!r}); is it an awm-fast serve-reward server?") from None
    scores = parsed.get("scores") if isinstance(parsed, dict) else None
    if not isinstance(scores, dict) or "reward" not in scores:
        raise RewardServerError(f"reward 'http': server {url} answered without a 'scores' object with 'reward' "
                                f"({str(parsed)[:120]})")
    out = {}
    for key, values in scores.items():
        if not isinstance(values, list) or len(values) != n or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise RewardServerError(f"reward 'http': server {url} sent scores[{key!r}] that are not {n} finite numbers")
        out[key] = torch.tensor(values, dtype=torch.float32)
    return out


class HttpReward:
    """Client of `awm-fast serve-reward`; see the module docstring."""

    name = "http"

    def __init__(self, url: str = "", timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 1.0,
                 batch_size: int = 0) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"reward 'http': reward.options.url={url!r} must be the server's http:// address "
                             "(printed by `awm-fast serve-reward`)")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or batch_size < 0:
            raise ValueError(f"reward 'http': need timeout_s > 0, retries >= 0, backoff_s >= 0, batch_size >= 0 "
                             f"(got {timeout_s}, {retries}, {backoff_s}, {batch_size})")
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s, self.batch_size = float(timeout_s), retries, backoff_s, batch_size
        self.evaluating = False

    def _request(self, path: str, body: bytes | None = None) -> bytes:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            req = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET",
                                         headers={"Content-Type": CONTENT_TYPE} if body is not None else {})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return resp.read()
            except urllib.error.HTTPError as exc:
                detail = _error_line(exc)
                if exc.code < 500:
                    raise ValueError(f"reward 'http': server {self.url} rejected the request (HTTP {exc.code}: "
                                     f"{detail})") from None
                last = f"HTTP {exc.code}: {detail}"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http_errors()) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
        raise RewardServerError(f"reward 'http': no answer from the reward server at {self.url} after "
                                f"{self.retries + 1} attempts (timeout {self.timeout_s:g} s; last: {last[:200]}); "
                                "start it with `awm-fast serve-reward NAME` or fix reward.options.url")

    def health(self) -> dict:
        try:
            return json.loads(self._request("/health").decode())
        except (ValueError, UnicodeDecodeError):
            raise RewardServerError(f"reward 'http': {self.url}/health did not answer JSON") from None

    def __call__(self, images, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        n = check_batch(self.name, images, prompts, metadata)
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        batch = to_uint8_batch(images)
        step = self.batch_size or n
        columns: dict[str, list[torch.Tensor]] = {}
        for b in range(0, n, step):
            size = len(prompts[b:b + step])
            body = encode_request(batch[b:b + step], prompts[b:b + step], metadata[b:b + step], self.evaluating)
            part = decode_scores(self._request("/score", body), size, self.url)
            if columns and set(part) != set(columns):
                raise RewardServerError(f"reward 'http': server {self.url} changed its score keys between requests "
                                        f"({sorted(columns)} then {sorted(part)})")
            for key, value in part.items():
                columns.setdefault(key, []).append(value)
        return {k: torch.cat(v) for k, v in columns.items()}


def http_errors() -> type:
    import http.client

    return http.client.HTTPException


def _error_line(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read()
        data = json.loads(body.decode())
        return str(data.get("error", data))[:300]
    except Exception:  # noqa: BLE001 - any unreadable error body: the status line says enough
        return str(exc.reason)[:300]
