"""The reward server's limits (rewards/http_server.py), on loopback with ephemeral ports, each bounded in count and
time: every malformed request is answered 400 with its reason before the reward sees it, declared shapes are
checked before anything is allocated, slow clients are dropped within the timeout, connections beyond
--max-concurrent get 503, the token, a rate-limited error log, and concurrent oversized and slow clients keep
the server process (a subprocess: its /proc/PID/status VmHWM) under the stated memory bound."""
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from awm_fast.rewards.http import MAGIC, HttpReward, RequestLimits, encode_request, to_uint8_batch
from awm_fast.rewards.http_server import RateLimitedLog, RewardServer, ServerLimits

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")


class Counting:
    """Mean brightness; counts its calls; needs 8 x 8 images (as digits does)."""

    name = "counting"
    image_size = (8, 8)

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        return {"reward": images.mean(dim=(1, 2, 3))}


def raw(url: str, data: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    """Send raw bytes, read until the server closes: (status, JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(body: bytes, extra: str = "", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return (f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-awm-reward\r\n{extra}"
            f"Content-Length: {size}\r\n\r\n").encode() + body


def npy_claiming(shape, payload: bytes = b"\x07" * 64) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + payload


def framed(head, npy: bytes) -> bytes:
    data = head if isinstance(head, bytes) else json.dumps(head).encode()
    return MAGIC + struct.pack(">I", len(data)) + data + npy


def valid(gen, n=2, side=8) -> bytes:
    images = torch.rand(n, 1, side, side, generator=gen)
    return encode_request(to_uint8_batch(images), [f"p{i}" for i in range(n)], [{} for _ in range(n)])


def test_every_malformed_request_is_answered_400_with_its_reason(gen):
    reward = Counting()
    good_head = {"prompts": ["a"], "metadata": [{}]}
    cases = {
        "request line": (b"GARBAGE\r\n\r\n", "Bad request"),
        "header line": (b"POST /score HTTP/1.1\r\nContent-Length: 5\r\n" + b"X-Many: 1\r\n" * 120 + b"\r\n", "headers"),
        "content length": (post(b"x", length=0).replace(b"Content-Length: 0", b"Content-Length: -5"),
                           "Content-Length must be a byte count"),
        "no content length": (b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n", "Content-Length must be a byte count"),
        "chunked": (post(b"", "Transfer-Encoding: chunked\r\n"), "Transfer-Encoding is not accepted"),
        "too large": (post(b"", length=10**12), "larger than this server's"),
        "magic": (post(b"\x80\x04pickle" * 4), "does not start with"),
        "json list": (post(framed([1, 2], npy_claiming((1, 1, 8, 8)))), "JSON header must be an object"),
        "json depth": (post(framed(b"[" * 100_000 + b"]" * 100_000, b"")), "nested deeper than"),
        "json depth 18": (post(framed({"prompts": ["a"], "metadata": [{"x": [[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]}]},
                                      npy_claiming((1, 1, 8, 8)))), "nested deeper than 16"),
        "json bytes": (post(framed(b"\xff\xfe{", b"")), "malformed JSON header"),
        "npy 1e12": (post(framed(good_head, npy_claiming((10**6, 3, 1000, 333)))), "this server takes 1 to 4"),
        "npy bytes": (post(framed(good_head, npy_claiming((1, 1, 8, 8), b"\x01" * 10))), "the body carries 10"),
        "npy dtype": (post(framed(good_head, npy_claiming((1, 1, 8, 8)).replace(b"|u1", b"<f8"))), "must be uint8"),
        "npy header": (post(framed(good_head, b"\x93NUMPY\x01\x00\xff\xff{garbage")), "not a .npy array header"),
        "image size": (post(framed(good_head, npy_claiming((1, 1, 16, 16), b"\x01" * 256))), "scores 8x8"),
        "prompts": (post(framed({"prompts": "a", "metadata": [{}]}, npy_claiming((1, 1, 8, 8)))),
                    "'prompts' must be a list of 1 strings"),
        "metadata": (post(framed({"prompts": ["a"], "metadata": [[1]]}, npy_claiming((1, 1, 8, 8)))),
                     "'metadata' must be a list of 1 objects"),
        "method": (b"PUT /score HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "Unsupported method"),
    }
    limits = ServerLimits(request=RequestLimits(max_images=4, max_side=64, image_size=(8, 8)))
    with RewardServer(reward, "counting", limits=limits) as server:
        for what, (data, reason) in cases.items():
            status, answer = raw(server.url, data)
            assert status == 400 and reason in answer["error"], (what, status, answer)
        assert raw(server.url, b"GET /nope HTTP/1.1\r\n\r\n")[0] == 404
        assert reward.calls == 0  # nothing malformed reached the reward
        status, answer = raw(server.url, post(valid(gen)))  # and the server still scores
        assert status == 200 and len(answer["scores"]["reward"]) == 2 and reward.calls == 1


def test_slow_and_silent_clients_are_dropped_within_the_timeout(gen):
    """1 byte every 0.2 s (body, then headers) and a client that sends nothing: each connection is closed by the
    server within timeout_s (+ the watchdog's tick); an honest client is served meanwhile."""
    body = post(valid(gen))
    limits = ServerLimits(timeout_s=1.0)
    closed_after = {}

    def slow(name, data, url):
        host, port = url.removeprefix("http://").split(":")
        start = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as s:
            try:
                for byte in data:
                    s.sendall(bytes([byte]))
                    time.sleep(0.2)
                    if time.monotonic() - start > 8:
                        break
                s.recv(1)
            except OSError:
                pass
        closed_after[name] = time.monotonic() - start

    with RewardServer(Counting(), "counting", limits=limits) as server:
        threads = [threading.Thread(target=slow, args=(name, data, server.url)) for name, data in
                   {"body": body, "headers": b"POST /score HTTP/1.1\r\n" + b"X" * 200,
                    "silent": b""}.items()]
        for t in threads:
            t.start()
        status, _ = raw(server.url, body)
        for t in threads:
            t.join(15)
    assert status == 200
    assert set(closed_after) == {"body", "headers", "silent"}
    assert all(s < 1.0 + 1.0 for s in closed_after.values()), closed_after  # + the watchdog tick, a loaded CPU


def test_connections_beyond_max_concurrent_get_503_then_are_served():
    limits = ServerLimits(max_concurrent=2, timeout_s=1.0)
    with RewardServer(Counting(), "counting", limits=limits) as server:
        host, port = server.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(2)]
        time.sleep(0.2)
        status, answer = raw(server.url, b"GET /health HTTP/1.1\r\n\r\n")
        assert status == 503 and "too many concurrent requests" in answer["error"]
        start = time.monotonic()
        assert HttpReward(server.url, timeout_s=5).health()["status"] == "ok"  # waits out the 503s (idle dropped)
        assert time.monotonic() - start < 3
        for s in idle:
            s.close()


def test_the_token(gen, monkeypatch):
    images = torch.rand(3, 1, 8, 8, generator=gen)
    limits = ServerLimits(token="s3cret")
    with RewardServer(Counting(), "counting", limits=limits) as server:
        for headers in ("", "Authorization: Bearer wrong\r\n", "X-AWM-Token: s3cre\r\n", "Authorization: s3cret\r\n"):
            status, answer = raw(server.url, post(valid(gen), headers))
            assert status == 401 and "token" in answer["error"], headers
        for headers in ("Authorization: Bearer s3cret\r\n", "X-AWM-Token: s3cret\r\n"):
            assert raw(server.url, post(valid(gen), headers))[0] == 200
        monkeypatch.delenv("AWM_FAST_REWARD_TOKEN", raising=False)
        with pytest.raises(ValueError, match=r"HTTP 401: missing or wrong token.*AWM_FAST_REWARD_TOKEN"):
            HttpReward(server.url, timeout_s=5, batch_size=3)(images, ["a"] * 3, [{}] * 3)
        expected = images.mul(255).round().div(255).mean(dim=(1, 2, 3))
        got = HttpReward(server.url, timeout_s=5, token="s3cret")(images, ["a"] * 3, [{}] * 3)["reward"]
        assert torch.allclose(got, expected, atol=1e-6)
        monkeypatch.setenv("AWM_FAST_REWARD_TOKEN", "s3cret")
        assert torch.allclose(HttpReward(server.url, timeout_s=5)(images, ["a"] * 3, [{}] * 3)["reward"], expected,
                              atol=1e-6)


def test_the_error_log_is_rate_limited(caplog):
    now = [0.0]
    log = RateLimitedLog(burst=3, window_s=10.0, clock=lambda: now[0])
    caplog.set_level("WARNING", logger="awm_fast")
    kept = [log(f"error {i}") for i in range(50)]
    assert kept == [True] * 3 + [False] * 47
    now[0] = 10.0
    assert log("later")
    assert [r.getMessage() for r in caplog.records] == ["error 0", "error 1", "error 2",
                                                        "later (47 more error lines suppressed)"]
    caplog.clear()
    with RewardServer(Counting(), "counting") as server:  # 60 malformed requests: at most 20 lines
        for _ in range(60):
            assert raw(server.url, post(b"junk"))[0] == 400
    lines = [r.getMessage() for r in caplog.records]
    assert 1 <= len(lines) <= 20 and all("does not start with" in x for x in lines)


def _status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def test_concurrent_oversized_and_slow_clients_stay_under_the_memory_bound(gen):
    """serve-reward in a subprocess with --max-request-mb 4 --max-concurrent 3 --timeout-s 2: 12 clients at once
    declaring 1 GiB bodies (sending up to 32 MiB each), 6 sending 4 MiB bodies slowly and 6 sending full 4 MiB bodies
    that are not valid; then 3 full bodies at once (one per slot: read whole, then refused with 400). The
    server's peak RSS (VmHWM, reset after start-up through /proc/PID/clear_refs) grows by at most
    (max_concurrent + 4) x 4 MiB + 24 MiB (threads, buffers), and /health answers afterwards."""
    mb, concurrent = 4, 3
    proc = subprocess.Popen([sys.executable, "-m", "awm_fast.cli", "serve-reward", "tests.rewards.user_rewards:brightness",
                             "--port", "0", "--max-request-mb", str(mb), "--max-concurrent", str(concurrent),
                             "--timeout-s", "2", "--max-side", "1024", "--max-images", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=os.getcwd())
    try:
        line = proc.stdout.readline().strip()
        url = line.rsplit(" ", 1)[1]
        assert HttpReward(url, timeout_s=30).health()["status"] == "ok"
        HttpReward(url, timeout_s=30)(torch.rand(4, 3, 64, 64, generator=gen), ["a"] * 4, [{}] * 4)  # warm
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status(proc.pid)
        junk = MAGIC + struct.pack(">I", 2) + b"{}" + b"\x00" * (mb * 2**20 - 200)
        results = []

        def client(kind):
            host, port = url.removeprefix("http://").split(":")
            try:
                with socket.create_connection((host, int(port)), timeout=10) as s:
                    if kind == "huge":  # up to 32 MiB of a declared 1 GiB (a buffering server would keep it)
                        s.sendall(post(b"", length=2**30))
                        for _ in range(32):
                            s.sendall(b"\x00" * 2**20)
                    elif kind == "slow":
                        s.sendall(post(junk[: 2**20], length=len(junk)))
                        time.sleep(3)
                        s.sendall(b"\x00" * 1000)
                    else:
                        s.sendall(post(junk))
                    results.append((kind, s.recv(200)[:12]))
            except OSError as exc:
                results.append((kind, type(exc).__name__))

        for wave in (["huge"] * 12 + ["slow"] * 6 + ["full"] * 6, ["full"] * concurrent):  # all at once, then
            threads = [threading.Thread(target=client, args=(k,)) for k in wave]  # as many bodies as slots
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        time.sleep(0.5)
        after = _status(proc.pid)
        growth = after["VmHWM"] - before["VmRSS"]
        bound = (concurrent + 4) * mb * 2**20 + 24 * 2**20
        print(f"server peak RSS growth {growth / 2**20:.1f} MiB (bound {bound / 2**20:.0f} MiB); RSS before "
              f"{before['VmRSS'] / 2**20:.0f} MiB, after {after['VmRSS'] / 2**20:.0f} MiB; {len(results)} clients")
        assert len(results) == 24 + concurrent
        assert growth <= bound, (growth, bound)
        assert after["VmRSS"] - before["VmRSS"] <= bound
        assert all(r == ("full", b"HTTP/1.0 400") for r in results[-concurrent:]), results  # read whole, refused
        assert HttpReward(url, timeout_s=10).health()["status"] == "ok"
    finally:
        proc.kill()
        proc.wait()
