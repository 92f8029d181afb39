"""GenEval client against a loopback HTTP server speaking the reward server's protocol (pickled dicts)."""
import io
import pickle
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from awm_fast.rewards.geneval import GenEvalReward


class Server:
    """Scores each JPEG by its mean brightness; `fail_first` requests answer HTTP 500; with `hang` no request is
    answered before `close()` (each one releases `received` first)."""

    def __init__(self, fail_first=0, hang=False, status=200, garbage=False):
        self.requests, self.fail_first, self.hang, self.status = [], fail_first, hang, status
        self.garbage = garbage
        self.received, self.closing = threading.Semaphore(0), threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(pickle.loads(body))
                outer.received.release()
                if outer.hang:
                    outer.closing.wait()
                if len(outer.requests) <= outer.fail_first or outer.status != 200:
                    self.send_response(500 if outer.status == 200 else outer.status)
                    self.end_headers()
                    return
                data = outer.requests[-1]
                scores = [float(Image.open(io.BytesIO(b)).convert("L").getextrema()[1]) / 255 for b in data["images"]]
                reply = b"<html>not a pickle</html>" if outer.garbage else pickle.dumps({"scores": scores, "rewards": [float(s > 0.5) for s in scores],
                                      "strict_rewards": [float(s > 0.9) for s in scores],
                                      "group_rewards": {}, "group_strict_rewards": {}})
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request):
    s = Server(**getattr(request, "param", {}))
    yield s
    s.close()


def batch(n):
    """Image i is uniformly grey at level i / (n - 1), so the server's score for it is i / (n - 1) (+- JPEG)."""
    levels = torch.linspace(0, 1, n)
    images = levels.view(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous()
    meta = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]} for _ in range(n)]
    return images, [f"a photo of a cat {i}" for i in range(n)], meta, levels


def test_batches_of_64_in_order(server):
    images, prompts, meta, levels = batch(70)
    out = GenEvalReward(url=server.url, timeout=10)(images, prompts, meta)
    assert [len(r["images"]) for r in server.requests] == [64, 6]
    first = server.requests[0]
    assert first["only_strict"] is True and first["meta_datas"][0]["prompt"] == "a photo of a cat 0"
    assert first["images"][0][:2] == b"\xff\xd8"  # JPEG bytes
    torch.testing.assert_close(out["reward"], levels, atol=2 / 255, rtol=0)
    assert torch.equal(out["geneval_accuracy"], (out["reward"] > 0.5).float())
    assert set(out) == {"reward", "geneval_accuracy", "geneval_strict"}


@pytest.mark.parametrize("server", [{"fail_first": 2}], indirect=True)
def test_retries_after_server_errors(server):
    images, prompts, meta, levels = batch(3)
    out = GenEvalReward(url=server.url, retries=3, backoff=0.01, timeout=5)(images, prompts, meta)
    assert len(server.requests) == 3
    torch.testing.assert_close(out["reward"], levels, atol=2 / 255, rtol=0)


@pytest.mark.parametrize("server", [{"hang": True}], indirect=True)
def test_timeout_is_bounded(server):
    """The server never answers: the call returns (an error after both attempts timed out) only because each
    attempt is bounded by `timeout` (pytest-timeout fails the test if it hangs)."""
    images, prompts, meta, _ = batch(2)
    with pytest.raises(RuntimeError, match="after 2 attempts"):
        GenEvalReward(url=server.url, retries=1, backoff=0.01, timeout=0.2)(images, prompts, meta)
    assert all(server.received.acquire(timeout=30) for _ in range(2))  # each attempt reached the server, timed out
    assert len(server.requests) == 2 and not server.received.acquire(timeout=0.5)  # and no third one


@pytest.mark.parametrize("server", [{"status": 400}], indirect=True)
def test_client_errors_are_not_retried(server):
    images, prompts, meta, _ = batch(2)
    with pytest.raises(RuntimeError, match="HTTP 400"):
        GenEvalReward(url=server.url, retries=3, backoff=0.01, timeout=5)(images, prompts, meta)
    assert len(server.requests) == 1


def test_no_server_and_bad_metadata():
    images, prompts, meta, _ = batch(2)
    with socket.socket() as s:  # bound for the whole test but not listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match="no answer from the GenEval server"):
            GenEvalReward(url=f"http://127.0.0.1:{port}", retries=1, backoff=0.01, timeout=1)(images, prompts, meta)
        with pytest.raises(ValueError, match="GenEval metadata"):
            GenEvalReward(url=f"http://127.0.0.1:{port}")(images, prompts, [{}, {}])
    with pytest.raises(ValueError, match="http://"):
        GenEvalReward(url="127.0.0.1:18085")


@pytest.mark.parametrize("server", [{"garbage": True}], indirect=True)
def test_garbage_answer_is_a_clear_error(server):
    images, prompts, meta, _ = batch(2)
    with pytest.raises(RuntimeError, match="not a pickle"):
        GenEvalReward(url=server.url, retries=2, backoff=0.01, timeout=5)(images, prompts, meta)
