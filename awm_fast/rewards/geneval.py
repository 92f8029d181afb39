"""GenEval reward through an HTTP client speaking the public GenEval reward server's protocol (flow_grpo).

Request: POST to the server URL, body = pickle.dumps({"images": [JPEG bytes, ...], "meta_datas": [dict, ...],
"only_strict": bool}), at most `batch_size` (64) images per request. Each metadata dict is GenEval's
{"tag", "include": [{"class", "count", "color"?, "position"?}], "prompt"} (the prompt is added when missing).
Response: pickle of {"scores": [...], "rewards": [...], "strict_rewards": [...], "group_rewards": {tag: [...]},
"group_strict_rewards": {tag: [...]}}.

    reward = scores (partial credit: the fraction of the prompt's requirements the detector finds satisfied)
    geneval_accuracy = rewards, geneval_strict = strict_rewards (1 only when every requirement holds)

Transient failures (connection refused/reset, timeouts, HTTP 5xx) raise a RuntimeError naming the server; in
training the trainer's `reward.retries` retries the call (the one retry layer, train/faults.py), so `retries`
defaults to 0 here (outside the trainer, retries=N retries each request with backoff * 2^attempt s waits, <= 30 s). The response is
unpickled, so only point this at a server you run yourself. Default URL: $AWM_FAST_GENEVAL_URL or
http://127.0.0.1:18085 (the official server's port).
"""
from __future__ import annotations

import io
import os
import pickle
import socket
import time
import urllib.error
import urllib.request

import torch
from PIL import Image

from awm_fast.rewards.base import check_batch, to_uint8_arrays

DEFAULT_URL = "http://127.0.0.1:18085"
SUB_SCORES = {"rewards": "geneval_accuracy", "strict_rewards": "geneval_strict"}


def encode_jpeg(images, quality: int = 75) -> list[bytes]:
    out = []
    for a in to_uint8_arrays(images):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


class GenEvalReward:
    name = "geneval"

    def __init__(self, url: str | None = None, batch_size: int = 64, timeout: float = 120.0, retries: int = 0,
                 backoff: float = 1.0, only_strict: bool = True, jpeg_quality: int = 75) -> None:
        if batch_size < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(f"reward 'geneval': need batch_size >= 1, retries >= 0, timeout > 0, backoff >= 0 "
                             f"(got {batch_size}, {retries}, {timeout}, {backoff})")
        self.url = url or os.environ.get("AWM_FAST_GENEVAL_URL", DEFAULT_URL)
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"reward 'geneval': url={self.url!r} must start with http:// or https://")
        self.batch_size, self.timeout, self.retries, self.backoff = batch_size, float(timeout), retries, float(backoff)
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"reward 'geneval': jpeg_quality={jpeg_quality} must be in [1, 100]")
        # official: only_strict=True while training, False in evaluation (rewards.base.evaluation_mode);
        # JPEG at PIL's default quality 75
        self.only_strict, self.jpeg_quality, self.evaluating = bool(only_strict), jpeg_quality, False

    def _post(self, body: bytes) -> dict:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return pickle.loads(resp.read())
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    raise RuntimeError(f"reward 'geneval': server {self.url} answered HTTP {exc.code}") from None
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except (pickle.UnpicklingError, EOFError) as exc:
                raise RuntimeError(f"reward 'geneval': server {self.url} sent a response that is not a pickle "
                                   f"({type(exc).__name__})") from None
        raise RuntimeError(f"reward 'geneval': no answer from the GenEval server at {self.url} after "
                           f"{self.retries + 1} attempts (last: {last}); start the server or set url=/AWM_FAST_GENEVAL_URL")

    def __call__(self, images, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        n = check_batch(self.name, images, prompts, metadata)
        metas = []
        for p, m in zip(prompts, metadata):
            if not isinstance(m, dict) or "include" not in m or "tag" not in m:
                raise ValueError(f"reward 'geneval': prompt {p!r} has no GenEval metadata (needs 'tag' and 'include'); "
                                 "load prompts with awm_fast.rewards.prompts.load_prompt_set")
            metas.append({**m, "prompt": m.get("prompt", p)})
        jpegs = encode_jpeg(images, self.jpeg_quality)
        columns: dict[str, list] = {"scores": [], **{k: [] for k in SUB_SCORES}}
        for b in range(0, n, self.batch_size):
            body = pickle.dumps({"images": jpegs[b:b + self.batch_size], "meta_datas": metas[b:b + self.batch_size],
                                 "only_strict": self.only_strict and not self.evaluating})
            data = self._post(body)
            size = len(jpegs[b:b + self.batch_size])
            if not isinstance(data, dict) or len(data.get("scores", ())) != size:
                raise RuntimeError(f"reward 'geneval': server {self.url} returned no 'scores' list of {size} values")
            for key, col in columns.items():
                if col is not None and len(data.get(key) or ()) == size:
                    col.extend(float(v) for v in data[key])
                else:
                    columns[key] = None
        out = {"reward": torch.tensor(columns["scores"], dtype=torch.float32)}
        out.update({SUB_SCORES[k]: torch.tensor(v, dtype=torch.float32) for k, v in columns.items()
                    if k in SUB_SCORES and v is not None})
        return out
