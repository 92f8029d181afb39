"""A vision-language model as the judge, over an OpenAI-compatible chat API (a local vLLM / SGLang server or any
endpoint with POST <url>/chat/completions).

    reward_i = s_i / max_score,   s_i = the number the judge answers for (image x_i, prompt p_i), 0 <= s_i <= max_score

One request per image: {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}, {"type": "text", "text": template.format(prompt=p_i)}]}],
"max_tokens": max_tokens, "temperature": temperature}; the answer is choices[0].message.content, with any
<think>...</think> block dropped, and s_i is the first match of `answer_pattern` (a regex with one group; default
the first number). An answer with no number, or one outside [0, max_score], raises JudgeAnswerError quoting it.

Options (reward.options) and their environment defaults: url ($AWM_FAST_JUDGE_URL; the base, e.g.
http://127.0.0.1:8000/v1, or the full .../chat/completions address), model ($AWM_FAST_JUDGE_MODEL), api_key
($AWM_FAST_JUDGE_API_KEY, sent as `Authorization: Bearer KEY`; none for a local server), concurrency (requests in
flight, a thread pool), timeout_s (the whole call, each request's socket timeout being what is left of it).
The client does not retry: as for `reward.name=http`, the trainer's `reward.retries` (train/faults.py) is the one
retry layer. No answer / HTTP 5xx / an unparsable answer raise RewardServerError (retried there); HTTP 4xx raises
ValueError (a wrong model name or key: not retried).
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from awm_fast.rewards.base import check_batch, to_pil
from awm_fast.rewards.http import RewardServerError, _error_line, http_errors

URL_ENV, MODEL_ENV, KEY_ENV = "AWM_FAST_JUDGE_URL", "AWM_FAST_JUDGE_MODEL", "AWM_FAST_JUDGE_API_KEY"
TEMPLATE = ("You are judging a generated image against the prompt it was generated from.\n"
            "Prompt: \"{prompt}\"\n"
            "Rate from 0 to 10 how well the image matches the prompt and how good it looks "
            "(10: perfect match, no artifacts). Answer with the number only.")
NUMBER = r"(-?\d+(?:\.\d+)?)"
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


class JudgeAnswerError(RewardServerError):
    """The judge answered something the score pattern does not read."""


def parse_score(answer: str, pattern: re.Pattern, max_score: float, where: str) -> float:
    """s from the judge's answer text (module docstring); JudgeAnswerError quoting the answer otherwise."""
    text = _THINK.sub("", answer).strip()
    found = pattern.search(text)
    quoted = " ".join(text.split())[:200]
    if found is None:
        raise JudgeAnswerError(f"reward 'vlm_judge': {where} answered {quoted!r}, which has no score matching "
                               f"{pattern.pattern!r}; make the prompt template ask for the number only or set "
                               "reward.options.answer_pattern")
    score = float(found.group(1))
    if not (math.isfinite(score) and 0 <= score <= max_score):
        raise JudgeAnswerError(f"reward 'vlm_judge': {where} answered {quoted!r}: score {score:g} is outside "
                               f"[0, {max_score:g}] (reward.options.max_score)")
    return score


def data_url(image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper())
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode()}"


class VlmJudgeReward:
    name = "vlm_judge"

    def __init__(self, url: str | None = None, model: str | None = None, api_key: str | None = None,
                 prompt_template: str = TEMPLATE, max_score: float = 10.0, answer_pattern: str = NUMBER,
                 concurrency: int = 8, timeout_s: float = 120.0, max_tokens: int = 16, temperature: float = 0.0,
                 image_format: str = "png") -> None:
        url = url or os.environ.get(URL_ENV, "")
        model = model or os.environ.get(MODEL_ENV, "")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward 'vlm_judge': url={url!r} must be the chat API's http(s):// address "
                             f"(reward.options.url or ${URL_ENV}, e.g. http://127.0.0.1:8000/v1)")
        if not model:
            raise ValueError(f"reward 'vlm_judge': no model name (reward.options.model or ${MODEL_ENV}: the name the "
                             "server serves, e.g. Qwen/Qwen2.5-VL-7B-Instruct)")
        try:
            prompt_template.format(prompt="x")
            pattern = re.compile(answer_pattern)
        except (KeyError, IndexError, ValueError, re.error) as exc:
            raise ValueError(f"reward 'vlm_judge': prompt_template / answer_pattern do not parse ({exc}); the template "
                             "takes {prompt} only, the pattern one regex group") from None
        if "{prompt}" not in prompt_template or pattern.groups != 1:
            raise ValueError(f"reward 'vlm_judge': prompt_template must contain {{prompt}} and answer_pattern "
                             f"exactly one group (got {pattern.groups} in {answer_pattern!r})")
        if not (isinstance(concurrency, int) and concurrency >= 1 and isinstance(max_tokens, int) and max_tokens >= 1
                and math.isfinite(timeout_s) and timeout_s > 0 and math.isfinite(max_score) and max_score > 0
                and temperature >= 0 and image_format in ("png", "jpeg")):
            raise ValueError(f"reward 'vlm_judge': need integers concurrency >= 1 and max_tokens >= 1, finite "
                             f"timeout_s > 0 and max_score > 0, temperature >= 0, image_format png|jpeg (got "
                             f"{concurrency}, {max_tokens}, {timeout_s}, {max_score}, {temperature}, {image_format!r})")
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model, self.template, self.pattern = model, prompt_template, pattern
        self.api_key = api_key if api_key is not None else os.environ.get(KEY_ENV, "")
        self.max_score, self.timeout_s, self.max_tokens = float(max_score), float(timeout_s), max_tokens
        self.temperature, self.image_format = float(temperature), image_format
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vlm_judge")

    def request_body(self, image, prompt: str) -> bytes:
        content = [{"type": "image_url", "image_url": {"url": data_url(image, self.image_format)}},
                   {"type": "text", "text": self.template.format(prompt=prompt)}]
        return json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "max_tokens": self.max_tokens, "temperature": self.temperature}).encode()

    def _post(self, body: bytes, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RewardServerError(f"reward 'vlm_judge': the call to {self.endpoint} ran past "
                                    f"timeout_s={self.timeout_s:g} s")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.endpoint, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=left) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = _error_line(exc)
            if exc.code < 500:
                raise ValueError(f"reward 'vlm_judge': {self.endpoint} rejected the request (HTTP {exc.code}: "
                                 f"{detail}); check reward.options.model / api_key (${KEY_ENV})") from None
            raise RewardServerError(f"reward 'vlm_judge': {self.endpoint} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http_errors()) as exc:
            reason = getattr(exc, "reason", exc)
            last = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
            raise RewardServerError(f"reward 'vlm_judge': no answer from {self.endpoint} ({last[:200]}; timeout "
                                    f"{self.timeout_s:g} s for the call); start the server or fix reward.options.url")

    def _score_one(self, image, prompt: str, index: int, deadline: float) -> float:
        data = self._post(self.request_body(image, prompt), deadline)
        try:
            content = json.loads(data.decode())["choices"][0]["message"]["content"]
        except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise RewardServerError(f"reward 'vlm_judge': {self.endpoint} sent no chat completion "
                                    f"({data[:120]!r})") from None
        if isinstance(content, list):  # content parts: keep the text ones
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise RewardServerError(f"reward 'vlm_judge': {self.endpoint} sent message content {content!r}")
        return parse_score(content, self.pattern, self.max_score, f"the judge ({self.model}) for image {index}")

    def __call__(self, images, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        check_batch(self.name, images, prompts, metadata)
        deadline = time.monotonic() + self.timeout_s
        futures = [self.pool.submit(self._score_one, im, p, i, deadline)
                   for i, (im, p) in enumerate(zip(to_pil(images), prompts))]
        try:
            scores = [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()
        return {"reward": torch.tensor(scores, dtype=torch.float32) / self.max_score}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
