"""Rewards over HTTP: the wire format shared with `awm-fast serve-reward` (rewards/http_server.py) and the
trainer's client, `reward.name=http` with reward.options {url, timeout_s, batch_size, token}.

Request: POST <url>/score, Content-Type application/x-awm-reward, Content-Length required, body
    b"AWM1" | uint32 big-endian n | n bytes of UTF-8 JSON {"prompts": [...], "metadata": [...], "evaluating": bool}
           | the image batch as NumPy .npy bytes: uint8 (N, C, H, W), C = 1 or 3, round(clamp(x, 0, 1) * 255)
(no pickle: the server parses the .npy header itself and checks the declared shape before it allocates anything).
With a shared token, every request carries `Authorization: Bearer TOKEN`. Response: JSON {"scores": {"reward":
[N floats], <sub-score>: [N floats], ...}} or, on an error, {"error": "one line"} with HTTP 400 (bad request: the
client raises ValueError), 401 (token), 503 (server busy) or 500 (the reward failed). GET <url>/health answers
{"status": "ok", "reward": name, "max_images": N, "max_request_bytes": B, "max_side": S}.

The client splits a call into requests of at most batch_size images (0: the server's max_images) and gives the
whole call `timeout_s` seconds (each request's socket timeout is what is left of it; a 503 "busy" is waited out
within that time, as is a connection the server resets while the body is sent). It does NOT retry failures: the
trainer's `reward.retries` (train/faults.py) is the one retry layer, so a dead or hung server costs at most
(reward.retries + 1) x timeout_s plus the retry waits. Any failure raises RewardServerError naming the server:
never a silent 0. Images travel as 8-bit, as every image reward sees them.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import socket
import struct
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch

from awm_fast.rewards.base import check_batch, to_uint8_arrays

MAGIC = b"AWM1"
CONTENT_TYPE = "application/x-awm-reward"
TOKEN_ENV = "AWM_FAST_REWARD_TOKEN"  # the shared token, client and server side (beats writing it into config.yaml)
MAX_JSON_DEPTH = 16  # {"metadata": [{"include": [{...}]}]} is 5 deep; deeper is refused before any reward sees it
MAX_NPY_HEADER = 4096


class RewardServerError(RuntimeError):
    """The reward server is unreachable, too slow or answers something that is not a score list."""


class _Busy(Exception):
    """HTTP 503: the server serves its --max-concurrent clients; try again within the call's time."""


@dataclass(frozen=True)
class RequestLimits:
    """What a server accepts in one /score request (checked from the headers, before the images are allocated)."""

    max_images: int = 32
    max_side: int = 512  # largest image height / width
    image_size: tuple[int, int] | None = None  # exactly (H, W) when the reward needs it (digits: 8 x 8)
    max_json_bytes: int = 2**20

    def max_request_bytes(self) -> int:
        """Bytes of the largest valid body: max_images x 3 x max_side^2 pixels + the JSON header + framing."""
        h, w = self.image_size or (self.max_side, self.max_side)
        return self.max_images * 3 * h * w + self.max_json_bytes + MAX_NPY_HEADER + 8


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


def json_depth(value) -> int:
    """Nesting depth of parsed JSON (a scalar: 0), without recursion."""
    depth, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            depth = max(depth, d)
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return depth


def _read_npy_header(view: memoryview, limits: RequestLimits) -> tuple[tuple[int, ...], bool, int]:
    """(shape, fortran_order, offset of the data) of the .npy bytes in `view`, checked against `limits`."""
    from numpy.lib import format as npy

    fp = io.BytesIO(view[:MAX_NPY_HEADER])
    try:
        major, _ = npy.read_magic(fp)
        reader = npy.read_array_header_1_0 if major == 1 else npy.read_array_header_2_0
        shape, fortran, dtype = reader(fp, max_header_size=MAX_NPY_HEADER)
    except (ValueError, EOFError, OSError, SyntaxError) as exc:
        raise ValueError(f"images: not a .npy array header ({type(exc).__name__}: {str(exc)[:120]})") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {dtype} {shape}")
    n, _, h, w = shape
    if not 1 <= n <= limits.max_images:
        raise ValueError(f"images: {n} per request, this server takes 1 to {limits.max_images} (split the batch; "
                         "the client does with batch_size=0)")
    if limits.image_size is not None and (h, w) != tuple(limits.image_size):
        raise ValueError(f"images are {h}x{w}, this reward scores {limits.image_size[0]}x{limits.image_size[1]}")
    if not (1 <= h <= limits.max_side and 1 <= w <= limits.max_side):
        raise ValueError(f"images are {h}x{w}, this server takes sides of 1 to {limits.max_side} px (--max-side)")
    return shape, fortran, fp.tell()


def decode_request(body, limits: RequestLimits | None = None) -> tuple[torch.Tensor, list[str], list[dict], bool]:
    """(images float (N, C, H, W) in [0, 1], prompts, metadata, evaluating); ValueError (one line, the reason) for
    any malformed body. Shapes, sizes and nesting are checked before anything is allocated."""
    limits = limits or RequestLimits(max_images=2**31, max_side=2**31)
    view = memoryview(body)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise ValueError(f"body does not start with {MAGIC!r} (see awm_fast/rewards/http.py for the format)")
    (n,) = struct.unpack(">I", view[4:8])
    if n > limits.max_json_bytes or 8 + n > len(view):
        raise ValueError(f"JSON header of {n} bytes is larger than {limits.max_json_bytes} or runs past the "
                         f"{len(view)}-byte body")
    try:
        head = json.loads(bytes(view[8:8 + n]).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed JSON header ({type(exc).__name__}: {str(exc)[:200]})") from None
    except RecursionError:
        raise ValueError(f"JSON header nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(head, dict):
        raise ValueError(f"JSON header must be an object, got {type(head).__name__}")
    if json_depth(head) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON header nested deeper than {MAX_JSON_DEPTH} levels")
    shape, fortran, offset = _read_npy_header(view[8 + n:], limits)
    count, data = math.prod(shape), view[8 + n + offset:]
    if len(data) != count:
        raise ValueError(f"images: the .npy header declares {shape} = {count} bytes, the body carries {len(data)}")
    batch = np.frombuffer(data, dtype=np.uint8, count=count)
    batch = batch.reshape(shape[::-1]).transpose(3, 2, 1, 0) if fortran else batch.reshape(shape)
    prompts, metadata = head.get("prompts"), head.get("metadata")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != len(batch):
        raise ValueError(f"'prompts' must be a list of {len(batch)} strings")
    if not isinstance(metadata, list) or len(metadata) != len(batch) or not all(isinstance(m, dict) for m in metadata):
        raise ValueError(f"'metadata' must be a list of {len(batch)} objects")
    images = torch.from_numpy(batch.astype(np.float32)).div_(255)  # the one float copy
    return images, prompts, metadata, bool(head.get("evaluating", False))


def decode_scores(data: bytes, n: int, url: str) -> dict[str, torch.Tensor]:
    """The response's score columns; RewardServerError for anything but N finite numbers per column."""
    try:
        parsed = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError, RecursionError):
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
    """Client of `awm-fast serve-reward`; see the module docstring. `token` (default: $AWM_FAST_REWARD_TOKEN) is
    sent as `Authorization: Bearer TOKEN` when set."""

    name = "http"

    def __init__(self, url: str = "", timeout_s: float = 120.0, batch_size: int = 0, token: str | None = None) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"reward 'http': reward.options.url={url!r} must be the server's http:// address "
                             "(printed by `awm-fast serve-reward`)")
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0) \
                or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"reward 'http': need a finite timeout_s > 0 and an integer batch_size >= 0 "
                             f"(got {timeout_s}, {batch_size})")
        self.url = url.rstrip("/")
        self.timeout_s, self.batch_size = float(timeout_s), batch_size
        self.token = os.environ.get(TOKEN_ENV, "") if token is None else str(token)
        self.server_max_images: int | None = None  # from /health
        self.evaluating = False

    def _request(self, path: str, body: bytes | None = None, deadline: float | None = None) -> bytes:
        """One request; a 503 (the server is busy with other clients) is waited out until `deadline` (flow control,
        not a retry: the time is the call's). RewardServerError for no / a 5xx answer, ValueError for a 4xx one."""
        deadline = time.monotonic() + self.timeout_s if deadline is None else deadline
        wait = 0.05
        while True:
            try:
                return self._request_once(path, body, deadline)
            except _Busy as busy:
                if time.monotonic() + wait >= deadline:
                    raise RewardServerError(f"reward 'http': server {self.url} stayed busy (HTTP 503: {busy}) for "
                                            f"timeout_s={self.timeout_s:g} s") from None
                time.sleep(wait * (0.5 + random.random()))
                wait = min(2 * wait, 1.0)

    def _request_once(self, path: str, body: bytes | None, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RewardServerError(f"reward 'http': the call to {self.url} ran past timeout_s={self.timeout_s:g} s")
        headers = {"Content-Type": CONTENT_TYPE} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET",
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=left) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = _error_line(exc)
            if exc.code == 503:
                raise _Busy(detail) from None
            if exc.code < 500:
                hint = f"; set the server's token in ${TOKEN_ENV} or reward.options.token" if exc.code == 401 else ""
                raise ValueError(f"reward 'http': server {self.url} rejected the request (HTTP {exc.code}: "
                                 f"{detail}){hint}") from None
            raise RewardServerError(f"reward 'http': server {self.url} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http_errors()) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (ConnectionResetError, BrokenPipeError)):  # a busy server closes on a long body
                raise _Busy(f"{type(reason).__name__}") from None
            last = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
            raise RewardServerError(f"reward 'http': no answer from the reward server at {self.url} ({last[:200]}; "
                                    f"timeout {self.timeout_s:g} s); start it with `awm-fast serve-reward NAME` or "
                                    "fix reward.options.url") from None

    def health(self, timeout_s: float | None = None) -> dict:
        """GET /health (within timeout_s, default the client's); remembers the server's max_images."""
        data = self._request("/health", deadline=time.monotonic() + (timeout_s or self.timeout_s))
        try:
            parsed = json.loads(data.decode())
        except (ValueError, UnicodeDecodeError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict) or parsed.get("status") != "ok":
            raise RewardServerError(f"reward 'http': {self.url}/health did not answer an awm-fast serve-reward "
                                    f"status ({data[:60]!r})")
        if isinstance(parsed.get("max_images"), int) and parsed["max_images"] > 0:
            self.server_max_images = parsed["max_images"]
        return parsed

    def __call__(self, images, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        deadline = time.monotonic() + self.timeout_s
        n = check_batch(self.name, images, prompts, metadata)
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        batch = to_uint8_batch(images)
        if not self.batch_size and self.server_max_images is None:
            self.health(max(deadline - time.monotonic(), 1e-3))
        step = min(x for x in (self.batch_size, self.server_max_images, n) if x)
        columns: dict[str, list[torch.Tensor]] = {}
        for b in range(0, n, step):
            size = len(prompts[b:b + step])
            body = encode_request(batch[b:b + step], prompts[b:b + step], metadata[b:b + step], self.evaluating)
            part = decode_scores(self._request("/score", body, deadline), size, self.url)
            if columns and set(part) != set(columns):
                raise RewardServerError(f"reward 'http': server {self.url} changed its score keys between requests "
                                        f"({sorted(columns)} then {sorted(part)})")
            for key, value in part.items():
                columns.setdefault(key, []).append(value)
        return {k: torch.cat(v) for k, v in columns.items()}


def check_servers(name: str, options: dict, timeout_s: float = 5.0) -> None:
    """Start-up check of the reward servers a reward config needs, in seconds and before any model loads:
    `http` parts get GET /health (a 503 "busy" counts as alive), `geneval` parts a TCP connection to the server.
    RewardServerError (one line) when one does not answer; ValueError for a bad url / token."""
    parts = [p.strip() for p in name.split("+")]
    for part in parts:
        opts = dict(options if len(parts) == 1 else (options.get(part) or {}))
        if part == "http":
            client = HttpReward(**{k: v for k, v in opts.items() if k in ("url", "token")})
            try:
                client.health(timeout_s)
            except RewardServerError as exc:
                if "HTTP 503" not in str(exc):
                    raise RewardServerError(f"{exc} (start-up check of GET /health within {timeout_s:g} s)") from None
        elif part == "geneval":
            from urllib.parse import urlsplit

            from awm_fast.rewards.geneval import DEFAULT_URL

            url = opts.get("url") or os.environ.get("AWM_FAST_GENEVAL_URL", DEFAULT_URL)
            where = urlsplit(url)
            try:
                with socket.create_connection((where.hostname, where.port or (443 if where.scheme == "https" else 80)),
                                              timeout=timeout_s):
                    pass
            except (OSError, ValueError) as exc:
                raise RewardServerError(f"reward 'geneval': no GenEval server at {url} ({type(exc).__name__}: "
                                        f"{exc}; start-up check within {timeout_s:g} s); start the server or set "
                                        "reward.options.url / $AWM_FAST_GENEVAL_URL") from None


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
