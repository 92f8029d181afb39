"""Rewards over HTTP on loopback: the wire format, scores in order under 8 concurrent clients, a server killed
mid-run, a server answering garbage, a server slower than the timeout, bad input (HTTP 400, not retried), and a
training run scored through `reward.name=http`."""
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("aiohttp")

from awm_fast.commands.serve_reward import RewardServer, bind, url_of  # noqa: E402
from awm_fast.rewards import load_reward  # noqa: E402
from awm_fast.rewards.http import (HttpReward, RewardServerError, decode_request, encode_request,  # noqa: E402
                                   to_uint8_batch)

FAST = dict(retries=2, backoff_s=0.01)


def test_wire_format_round_trip_and_malformed_bodies(gen):
    images = torch.rand(3, 1, 5, 7, generator=gen)
    body = encode_request(to_uint8_batch(images), ["a", "b", "c"], [{"k": 1}, {}, {}], evaluating=True)
    got, prompts, metadata, evaluating = decode_request(body)
    assert torch.equal(got, (images * 255).round() / 255) and prompts == ["a", "b", "c"] and evaluating
    assert metadata == [{"k": 1}, {}, {}]
    with pytest.raises(ValueError, match="does not start with"):
        decode_request(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="'prompts' must be a list of 3 strings"):
        decode_request(encode_request(to_uint8_batch(images), ["a"], [{}], False))
    obj = np.array([{"x": 1}], dtype=object)  # an object array would need pickle: refused
    import io
    import struct

    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    head = json.dumps({"prompts": ["a"], "metadata": [{}]}).encode()
    with pytest.raises(ValueError, match="malformed request"):
        decode_request(b"AWM1" + struct.pack(">I", len(head)) + head + buf.getvalue())


def test_eight_concurrent_clients_get_their_own_scores_in_order(gen):
    local = load_reward("jpeg_compressibility")
    batches = [torch.rand(7, 3, 16, 16, generator=gen) * (0.2 + 0.1 * i) for i in range(8)]
    results, errors = [None] * 8, []
    with RewardServer(load_reward("jpeg_compressibility"), "jpeg_compressibility") as server:
        assert HttpReward(server.url).health() == {"status": "ok", "reward": "jpeg_compressibility"}
        start = threading.Barrier(8)

        def client(i):
            try:
                reward = load_reward("http", url=server.url, batch_size=3, **FAST)  # 3 requests per call
                start.wait()
                results[i] = reward(batches[i], [f"p{i}"] * 7, [{}] * 7)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i in range(8):
        expected = local(batches[i], [f"p{i}"] * 7, [{}] * 7)
        assert results[i].keys() == expected.keys()
        for key in expected:
            assert torch.equal(results[i][key], expected[key].float()), (i, key)


def test_a_server_killed_mid_run_stops_the_client_with_one_line(gen):
    proc = subprocess.Popen([sys.executable, "-m", "awm_fast.cli", "serve-reward",
                             "tests.rewards.user_rewards:brightness", "--port", "0", "--option", "scale=2.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline().strip()  # the first line names the bound address
        assert line.startswith("serving reward tests.rewards.user_rewards:brightness on http://127.0.0.1:"), line
        reward = HttpReward(line.rsplit(" ", 1)[1], timeout_s=30, **FAST)
        images = torch.rand(4, 3, 8, 8, generator=gen)
        first = reward(images, ["x"] * 4, [{}] * 4)["reward"]
        assert torch.allclose(first, 2 * ((images * 255).round() / 255).mean(dim=(1, 2, 3)), atol=1e-6)
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(RewardServerError) as exc:
        reward(images, ["x"] * 4, [{}] * 4)
    message = str(exc.value)
    assert "\n" not in message and "no answer from the reward server" in message and "after 3 attempts" in message
    assert "awm-fast serve-reward" in message


def test_a_server_answering_garbage_is_an_error_never_a_zero(gen):
    from aiohttp import web

    answers = iter([web.Response(text="<html>proxy error</html>"),
                    web.json_response({"scores": {"reward": [0.5]}}),
                    web.json_response({"scores": {"reward": [0.5, float("nan")]}})])

    async def garbage(request):
        await request.read()
        return next(answers)

    app = web.Application()
    app.router.add_post("/score", garbage)
    with _serve_app(app) as url:
        reward = HttpReward(url, **FAST)
        images = torch.rand(2, 3, 4, 4, generator=gen)
        with pytest.raises(RewardServerError, match="not JSON"):
            reward(images, ["a", "b"], [{}, {}])
        with pytest.raises(RewardServerError, match=r"scores\['reward'\] that are not 2 finite numbers"):
            reward(images, ["a", "b"], [{}, {}])
        with pytest.raises(RewardServerError, match="not 2 finite numbers"):  # NaN is not JSON-standard either
            reward(images, ["a", "b"], [{}, {}])


def test_a_server_slower_than_the_timeout_is_retried_then_stops():
    entered, release = threading.Event(), threading.Event()

    def blocking(images, prompts, metadata):
        entered.set()
        release.wait(30)
        return [0.0] * len(prompts)

    from awm_fast.rewards.combined import FunctionReward

    with RewardServer(FunctionReward(blocking, "blocking"), "blocking") as server:
        reward = HttpReward(server.url, timeout_s=0.2, retries=1, backoff_s=0.0)
        try:
            with pytest.raises(RewardServerError, match=r"after 2 attempts \(timeout 0.2 s; last: .*timed out"):
                reward(torch.rand(1, 3, 4, 4), ["a"], [{}])
            assert entered.is_set()
        finally:
            release.set()


def test_bad_input_on_the_server_is_a_value_error_not_retried():
    calls = []

    def counting_wrong_length(images, prompts, metadata):
        calls.append(len(prompts))
        return [0.0]

    from awm_fast.rewards.combined import FunctionReward

    with RewardServer(FunctionReward(counting_wrong_length, "short"), "short") as server:
        with pytest.raises(ValueError, match=r"rejected the request \(HTTP 400: ValueError: reward 'short' returned 1 "
                                             r"scores for 3 images\)"):
            HttpReward(server.url, **FAST)(torch.rand(3, 3, 4, 4), ["a"] * 3, [{}] * 3)
    assert calls == [3]


def test_client_options_are_checked():
    with pytest.raises(ValueError, match=r"reward.options.url=''"):
        load_reward("http")
    with pytest.raises(ValueError, match="need timeout_s > 0"):
        load_reward("http", url="http://127.0.0.1:1", timeout_s=0)
    with pytest.raises(ValueError, match="cannot bind"):
        with bind("127.0.0.1", 0) as taken:
            bind("127.0.0.1", taken.getsockname()[1]).close()


def test_training_scores_through_the_http_reward(tmp_path, capsys):
    """digits served over HTTP: the run trains and logs; with the server gone it stops with one line."""
    from awm_fast.cli import main
    from awm_fast.commands.serve_reward import build
    from tests.train.test_faults import TINY

    with RewardServer(build("digits", None, {}), "digits") as server:
        opts = f"reward.options={{url: {server.url}, retries: 0}}"
        assert main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=h", "train.steps=2",
                     "reward.name=http", opts]) == 0
    rows = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < r["reward_mean"] < 1 and "accuracy" in r for r in rows)
    capsys.readouterr()
    assert main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=down", "train.steps=2", "reward.name=http",
                 opts, "reward.retries=0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no answer from the reward server at " + server.url in err[0], err


class _serve_app:
    """An arbitrary aiohttp app on a free loopback port in a background thread."""

    def __init__(self, app) -> None:
        self.app = app

    def __enter__(self) -> str:
        import asyncio

        from aiohttp import web

        self.sock, self.loop, ready = bind("127.0.0.1", 0), asyncio.new_event_loop(), threading.Event()

        def serve():
            asyncio.set_event_loop(self.loop)
            self.runner = web.AppRunner(self.app)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.SockSite(self.runner, self.sock).start())
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.runner.cleanup())

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait()
        return url_of(self.sock)

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.sock.close()
