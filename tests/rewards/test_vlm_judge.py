"""The VLM judge against a loopback fake OpenAI-compatible chat server (127.0.0.1, a few requests, sub-second
waits): the request it sends, score parsing, concurrency, timeouts, HTTP errors, and retries through the
trainer's one retry layer (train.faults.RetryingReward)."""
import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from awm_fast.rewards import load_reward
from awm_fast.rewards.http import RewardServerError
from awm_fast.rewards.vlm_judge import JudgeAnswerError, VlmJudgeReward
from awm_fast.train.faults import RetryingReward

PROMPTS = ["a red cat", "a photo of a dog", "blue sky", "a dog"]


class FakeJudge:
    """Answers "Score: 10 * mean pixel" (rounded to 0.01) for the image in the request, unless `answers` holds
    scripted (status, content) pairs to hand out first. Records requests and the most requests in flight."""

    def __init__(self) -> None:
        self.requests, self.answers, self.delay_s = [], [], 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append((self.path, dict(self.headers), body))
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                    scripted = judge.answers.pop(0) if judge.answers else None
                time.sleep(judge.delay_s)
                with judge.lock:
                    judge.in_flight -= 1
                status, content = scripted or (200, f"Score: {judge.score_of(body):.2f}")
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                                  if status == 200 else {"error": content}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up first (the timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def image_of(body) -> np.ndarray:
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))

    def score_of(self, body) -> float:
        return round(10 * self.image_of(body).mean() / 255, 2)


@pytest.fixture
def judge():
    fake = FakeJudge()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def images():
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.2, 0.5, 0.8, 1.0]).view(4, 1, 1, 1)


def expected_scores(images):
    pixels = (images.clamp(0, 1) * 255).round()
    return torch.tensor([round(10 * float(p.mean()) / 255, 2) / 10 for p in pixels])


def test_judge_request_and_scores(judge, images):
    reward = VlmJudgeReward(url=judge.url, model="judge-vl", api_key="sk-test", concurrency=4, timeout_s=10)
    out = reward(images, PROMPTS, [{}] * 4)
    torch.testing.assert_close(out["reward"], expected_scores(images), atol=1e-6, rtol=0)
    path, headers, body = judge.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-vl" and body["temperature"] == 0.0 and body["max_tokens"] == 16
    texts = sorted(r[2]["messages"][0]["content"][1]["text"] for r in judge.requests)
    assert all(any(f'"{p}"' in t for t in texts) for p in PROMPTS)
    shapes = {FakeJudge.image_of(r[2]).shape for r in judge.requests}
    assert shapes == {(16, 16, 3)}


def test_judge_runs_requests_concurrently(judge, images):
    judge.delay_s = 0.6  # long enough that the four requests overlap on a loaded machine
    VlmJudgeReward(url=judge.url, model="m", concurrency=4, timeout_s=10)(images, PROMPTS, [{}] * 4)
    assert judge.max_in_flight == 4  # all four requests were open at once
    judge.max_in_flight = 0
    VlmJudgeReward(url=judge.url, model="m", concurrency=2, timeout_s=10)(images, PROMPTS, [{}] * 4)
    assert judge.max_in_flight == 2  # never more than `concurrency`


def test_judge_unparsable_and_out_of_range_answers(judge, images):
    reward = VlmJudgeReward(url=judge.url, model="m", concurrency=1, timeout_s=10)
    judge.answers = [(200, "<think>maybe 7?</think> I cannot rate this image.")]
    with pytest.raises(JudgeAnswerError, match="'I cannot rate this image.', which has no score"):
        reward(images[:1], PROMPTS[:1], [{}])
    judge.answers = [(200, "11")]
    with pytest.raises(JudgeAnswerError, match=r"score 11 is outside \[0, 10\]"):
        reward(images[:1], PROMPTS[:1], [{}])
    judge.answers = [(200, "<think>7 or 8</think>Rating: 8/10")]
    assert reward(images[:1], PROMPTS[:1], [{}])["reward"].tolist() == [pytest.approx(0.8)]


def test_judge_timeout_and_http_errors(judge, images):
    judge.delay_s = 3.0
    t0 = time.monotonic()
    with pytest.raises(RewardServerError, match="no answer"):
        VlmJudgeReward(url=judge.url, model="m", timeout_s=0.3)(images[:2], PROMPTS[:2], [{}] * 2)
    assert time.monotonic() - t0 < 2.0  # the call's deadline, not the server's 3 s
    judge.delay_s = 0.0
    reward = VlmJudgeReward(url=judge.url, model="m", concurrency=1, timeout_s=10)
    judge.answers = [(404, "model 'm' not found")]
    with pytest.raises(ValueError, match="HTTP 404: model 'm' not found"):
        reward(images[:1], PROMPTS[:1], [{}])
    judge.answers = [(503, "overloaded")]
    with pytest.raises(RewardServerError, match="HTTP 503"):
        reward(images[:1], PROMPTS[:1], [{}])


def test_judge_retried_by_the_trainers_retry_layer(judge, images):
    reward = RetryingReward(VlmJudgeReward(url=judge.url, model="m", concurrency=1, timeout_s=10), retries=2, wait_s=0.0)
    judge.answers = [(500, "boom"), (200, "no idea")]  # a server fault, then an unparsable answer, then the score
    out = reward(images[:1], PROMPTS[:1], [{}])
    torch.testing.assert_close(out["reward"], expected_scores(images[:1]), atol=1e-6, rtol=0)
    assert len(judge.requests) == 3


def test_judge_through_registry_env_and_combination(judge, images, monkeypatch):
    monkeypatch.setenv("AWM_FAST_JUDGE_URL", judge.url + "/chat/completions")
    monkeypatch.setenv("AWM_FAST_JUDGE_MODEL", "env-model")
    alone = load_reward("vlm_judge", timeout_s=10)(images, PROMPTS, [{}] * 4)["reward"]
    assert judge.requests[-1][2]["model"] == "env-model" and "Authorization" not in judge.requests[-1][1]
    both = load_reward("vlm_judge+jpeg_compressibility", weights=[1.0, 0.1], vlm_judge={"concurrency": 2})(
        images, PROMPTS, [{}] * 4)
    torch.testing.assert_close(both["vlm_judge"], alone)
    torch.testing.assert_close(both["reward"], alone + 0.1 * both["jpeg_compressibility"])


def test_judge_refuses_bad_options(monkeypatch):
    monkeypatch.delenv("AWM_FAST_JUDGE_URL", raising=False)
    with pytest.raises(ValueError, match="AWM_FAST_JUDGE_URL"):
        VlmJudgeReward(model="m")
    with pytest.raises(ValueError, match="must contain"):
        VlmJudgeReward(url="http://127.0.0.1:9/v1", model="m", prompt_template="rate it")
    with pytest.raises(ValueError, match="do not parse"):
        VlmJudgeReward(url="http://127.0.0.1:9/v1", model="m", prompt_template="{prompt} {other}")


def test_judge_from_a_config(judge, images):
    """reward.name / reward.options as a user writes them, through config validation and the trainer's build_reward."""
    from awm_fast.config import ConfigError, load_config
    from awm_fast.rewards import build_reward

    opts = f"{{vlm_judge: {{url: '{judge.url}', model: m, concurrency: 2}}, jpeg_compressibility: {{}}}}"
    cfg = load_config("pickscore_sd35m", ["model.path=/ckpt", "reward.name=vlm_judge+jpeg_compressibility",
                                          "reward.weights=[2.0,0.5]", f"reward.options={opts}"])
    out = build_reward(cfg.reward.name, weights=cfg.reward.weights, **cfg.reward.options)(images, PROMPTS, [{}] * 4)
    torch.testing.assert_close(out["vlm_judge"], expected_scores(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["reward"], 2.0 * out["vlm_judge"] + 0.5 * out["jpeg_compressibility"])
    with pytest.raises(ConfigError, match="vlm_judge.modle"):
        load_config("pickscore_sd35m", ["model.path=/ckpt", "reward.name=vlm_judge+jpeg_compressibility",
                                        "reward.options={vlm_judge: {modle: m}}"])
    with pytest.raises(ConfigError, match="does not apply to model.kind=digits"):
        load_config("digits", ["reward.name=vlm_judge"])
