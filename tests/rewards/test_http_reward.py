"""Rewards over HTTP on loopback: the wire format, scores in order under 8 concurrent clients (more than the
server's --max-concurrent: the client waits out its 503s), a server killed mid-run, a server answering garbage, a
server slower than the timeout, bad input (HTTP 400, not retried), and a training run scored through
`reward.name=http` (a dead server: one line at start-up, no run folder). The server's limits:
test_http_server.py."""
import json
import subprocess
import sys
import threading

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from awm_fast.commands.serve_reward import RewardServer, bind
from awm_fast.rewards import load_reward
from awm_fast.rewards.http import HttpReward, RewardServerError, decode_request, encode_request, to_uint8_batch
from awm_fast.rewards.http_server import RequestLimits, ServerLimits

FAST = dict(timeout_s=20)


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
    with pytest.raises(ValueError, match="must be uint8 .* got object"):  # refused from its header, never unpickled
        decode_request(b"AWM1" + struct.pack(">I", len(head)) + head + buf.getvalue())


def test_eight_concurrent_clients_get_their_own_scores_in_order(gen):
    local = load_reward("jpeg_compressibility")
    batches = [torch.rand(7, 3, 16, 16, generator=gen) * (0.2 + 0.1 * i) for i in range(8)]
    results, errors = [None] * 8, []
    limits = ServerLimits(max_concurrent=3)  # fewer slots than clients: the others get 503 and wait
    with RewardServer(load_reward("jpeg_compressibility"), "jpeg_compressibility", limits=limits) as server:
        assert HttpReward(server.url).health() == {"status": "ok", "reward": "jpeg_compressibility", "max_images": 32,
                                                   "max_request_bytes": RequestLimits().max_request_bytes(),
                                                   "max_side": 512}
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
        reward = HttpReward(line.rsplit(" ", 1)[1], timeout_s=30)
        images = torch.rand(4, 3, 8, 8, generator=gen)
        first = reward(images, ["x"] * 4, [{}] * 4)["reward"]
        assert torch.allclose(first, 2 * ((images * 255).round() / 255).mean(dim=(1, 2, 3)), atol=1e-6)
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(RewardServerError) as exc:
        reward(images, ["x"] * 4, [{}] * 4)
    message = str(exc.value)
    assert "\n" not in message and "no answer from the reward server" in message and "ConnectionRefused" in message
    assert "awm-fast serve-reward" in message


def test_a_server_answering_garbage_is_an_error_never_a_zero(gen):
    answers = iter([b"<html>proxy error</html>", json.dumps({"scores": {"reward": [0.5]}}).encode(),
                    b'{"scores": {"reward": [0.5, NaN]}}'])

    with _serve(lambda body: (200, next(answers))) as url:
        reward = HttpReward(url, batch_size=2, **FAST)  # this server has no /health to read max_images from
        images = torch.rand(2, 3, 4, 4, generator=gen)
        with pytest.raises(RewardServerError, match="not JSON"):
            reward(images, ["a", "b"], [{}, {}])
        with pytest.raises(RewardServerError, match=r"scores\['reward'\] that are not 2 finite numbers"):
            reward(images, ["a", "b"], [{}, {}])
        with pytest.raises(RewardServerError, match="not 2 finite numbers"):  # NaN is not JSON-standard either
            reward(images, ["a", "b"], [{}, {}])


def test_a_server_slower_than_the_timeout_stops_the_call_within_it():
    entered, release = threading.Event(), threading.Event()

    def blocking(images, prompts, metadata):
        entered.set()
        release.wait(30)
        return [0.0] * len(prompts)

    from awm_fast.rewards.combined import FunctionReward

    with RewardServer(FunctionReward(blocking, "blocking"), "blocking") as server:
        reward = HttpReward(server.url, timeout_s=0.2, batch_size=1)
        try:
            with pytest.raises(RewardServerError, match=r"no answer from the reward server at .*timed out"):
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
    for bad in (0, float("inf")):
        with pytest.raises(ValueError, match="need a finite timeout_s > 0"):
            load_reward("http", url="http://127.0.0.1:1", timeout_s=bad)
    with pytest.raises(TypeError, match="bad option"):  # the client does not retry: reward.retries does
        load_reward("http", url="http://127.0.0.1:1", retries=3)
    with pytest.raises(ValueError, match="cannot bind"):
        with bind("127.0.0.1", 0) as taken:
            bind("127.0.0.1", taken.getsockname()[1]).close()


def test_training_scores_through_the_http_reward(tmp_path, capsys):
    """digits served over HTTP: the run trains and logs; with the server gone it stops at start-up with one line,
    in seconds, leaving no run folder."""
    import time

    from awm_fast.cli import main
    from awm_fast.commands.serve_reward import build
    from tests.train.test_faults import TINY

    with RewardServer(build("digits", None, {}), "digits") as server:
        opts = f"reward.options={{url: {server.url}}}"
        assert main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=h", "train.steps=2",
                     "reward.name=http", opts]) == 0
    rows = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < r["reward_mean"] < 1 and "accuracy" in r for r in rows)
    capsys.readouterr()
    start = time.monotonic()
    assert main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=down", "train.steps=2", "reward.name=http",
                 opts]) == 1
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no answer from the reward server at " + server.url in err[0], err
    assert "start-up check" in err[0] and not (tmp_path / "down").exists()


class _serve:
    """A loopback server answering every POST with answer(body) -> (status, bytes), in a background thread."""

    def __init__(self, answer) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                status, data = answer(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        outer.thread.start()

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_start_up_check_finds_dead_servers_in_seconds(monkeypatch):
    """check_servers: http parts GET /health (503 busy counts as alive), geneval parts a TCP connection; options
    keyed by component for a "+" combination; one line naming the server otherwise."""
    import time

    from awm_fast.rewards.http import check_servers
    from awm_fast.rewards.http_server import RewardHTTPServer
    from awm_fast.train.faults import RewardFailed, check_reward_servers

    with bind("127.0.0.1", 0) as closed:
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(RewardServerError, match=rf"no answer from the reward server at {dead} .*start-up check"):
        check_servers("http", {"url": dead, "timeout_s": 99})
    with pytest.raises(RewardFailed, match=rf"no GenEval server at {dead} .*ConnectionRefused"):
        check_reward_servers("jpeg_compressibility+geneval", {"geneval": {"url": dead}})
    monkeypatch.setenv("AWM_FAST_GENEVAL_URL", dead)
    with pytest.raises(RewardServerError, match="no GenEval server"):
        check_servers("geneval", {})
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="must be the server's http:// address"):
        check_servers("http", {"url": "127.0.0.1:80"})
    with _serve(lambda body: (200, b"{}")) as url:  # answers, but not as serve-reward (no GET /health)
        with pytest.raises(RewardServerError, match="answered HTTP 501.*start-up check"):
            check_servers("http", {"url": url})
    check_servers("jpeg_compressibility", {})  # nothing to check
    with RewardServer(load_reward("jpeg_compressibility"), "jpeg_compressibility") as server:
        check_servers("jpeg_compressibility+http", {"http": {"url": server.url}})
        check_servers("geneval", {"url": server.url})  # a TCP listener is all the GenEval check asks
        monkeypatch.setattr(RewardHTTPServer, "process_request", lambda self, request, addr: (
            request.sendall(b"HTTP/1.0 503 Busy\r\nContent-Length: 2\r\n\r\n{}"), self.shutdown_request(request)))
        check_servers("http", {"url": server.url}, timeout_s=0.5)  # busy for the whole check: alive
