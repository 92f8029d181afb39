"""The HTTP reward server behind `awm-fast serve-reward` (commands/serve_reward.py): the standard library's
ThreadingHTTPServer with explicit limits, so that no client can exhaust it (wire format: rewards/http.py).

    POST /score  -> {"scores": {...}}           GET /health -> {"status": "ok", "reward": NAME, "max_images", ...}

Limits (ServerLimits), each answered with one JSON line {"error": reason}:
- size: Content-Length is required and at most max_request_bytes (default from RequestLimits: max_images images
  of 3 x max_side^2 bytes + 1 MiB of JSON); a larger one is refused (400) before a byte of its body is read;
- shapes: the JSON header must be an object nested at most MAX_JSON_DEPTH deep, the .npy header must declare
  uint8 (N <= max_images, 1 or 3, H, W <= max_side) (exactly the reward's `image_size` when it has one) and exactly
  the bytes that follow: checked before the images are allocated (400);
- time: a client has timeout_s from its connection to the last byte of its request; a watchdog shuts a slower one's
  socket (dropped, one log line);
- concurrency: at most max_concurrent connections are served at once; one more is answered 503 at once and closed
  (so file handles never run out and the client's retry comes later);
- auth: with a token, every request needs `Authorization: Bearer TOKEN` or `X-AWM-Token: TOKEN`
  (hmac.compare_digest), else 401;
- log: at most LOG_BURST error lines per LOG_WINDOW_S seconds; the rest are counted in the next line.

Memory: bodies held at once <= max_concurrent x max_request_bytes; they are decoded (float32, 4 bytes a pixel) and
scored one at a time under the scoring lock (a reward model is not assumed thread-safe), so the server's peak
growth is at most (max_concurrent + 4) x max_request_bytes plus what the reward itself allocates.
"""
from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from awm_fast.rewards.base import check_reward_output, evaluation_mode
from awm_fast.rewards.http import RequestLimits, decode_request

logger = logging.getLogger(__name__)
LOG_BURST, LOG_WINDOW_S = 20, 60.0


@dataclass(frozen=True)
class ServerLimits:
    request: RequestLimits = field(default_factory=RequestLimits)
    max_request_bytes: int = 0  # 0: request.max_request_bytes()
    max_concurrent: int = 8
    timeout_s: float = 30.0
    token: str = ""

    def body_limit(self) -> int:
        return self.max_request_bytes or self.request.max_request_bytes()


class RateLimitedLog:
    """logger.warning at most `burst` lines per `window_s`; suppressed lines are counted into the next one."""

    def __init__(self, burst: int = LOG_BURST, window_s: float = LOG_WINDOW_S, clock=time.monotonic) -> None:
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self.start, self.count, self.suppressed = clock(), 0, 0
        self.lock = threading.Lock()

    def __call__(self, line: str) -> bool:
        with self.lock:
            now = self.clock()
            if now - self.start >= self.window_s:
                self.start, self.count = now, 0
            if self.count >= self.burst:
                self.suppressed += 1
                return False
            self.count += 1
            more, self.suppressed = self.suppressed, 0
        logger.warning(line + (f" ({more} more error lines suppressed)" if more else ""))
        return True


class _Dropped(Exception):
    """The client was too slow or went away: nothing to answer."""


class Handler(BaseHTTPRequestHandler):
    server: "RewardHTTPServer"
    protocol_version = "HTTP/1.0"  # one request per connection: a connection's slot is freed with its answer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.limits.timeout_s)  # also bounds writing to a reader that stalls
        self.server.watch(self.connection)

    def finish(self) -> None:
        self.server.unwatch(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # no access log; errors go through log_error

    def log_error(self, format, *args) -> None:  # noqa: A002
        self.server.log(f"[serve-reward] {self.client_address[0]}: " + (format % args)[:300])

    def send_error(self, code, message=None, explain=None) -> None:
        """Every error as one JSON line {"error": reason} (the base class answers HTML); logged (rate-limited).
        Every client error but a missing token (401) or path (404) is 400 (the base class's 414, 431, 501 too)."""
        if code not in (401, 404, 500, 503):
            code = 400
        if code != 401:
            self.log_error("HTTP %d: %s", code, message)
        self._json(code, {"error": str(message or self.responses.get(code, ("error",))[0])[:500]})
        self.close_connection = True

    def _json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.request_version = "HTTP/1.0"  # a garbled request line leaves HTTP/0.9: no status line would be sent
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError as exc:  # the client went away or stalled reading
            self.log_error("answer not delivered (%s)", type(exc).__name__)

    def _authorized(self) -> bool:
        token = self.server.limits.token
        if not token:
            return True
        given = self.headers.get("X-AWM-Token", "")
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[len("Bearer "):]
        if hmac.compare_digest(given.strip().encode(), token.encode()):
            return True
        self.send_error(401, "missing or wrong token (Authorization: Bearer TOKEN)")
        return False

    def do_GET(self) -> None:
        if self.path != "/health":
            return self.send_error(404, f"no GET {self.path[:100]} (GET /health, POST /score)")
        if self._authorized():
            lim = self.server.limits
            self._json(200, {"status": "ok", "reward": self.server.name, "max_images": lim.request.max_images,
                             "max_request_bytes": lim.body_limit(), "max_side": lim.request.max_side})

    def do_POST(self) -> None:
        if self.path != "/score":
            return self.send_error(404, f"no POST {self.path[:100]} (POST /score)")
        if not self._authorized():
            return
        try:
            body = self._read_body()
        except ValueError as exc:
            return self.send_error(400, str(exc))
        except _Dropped as exc:
            self.close_connection = True
            return self.log_error("%s", exc)
        self.server.unwatch(self.connection)  # the request is in: scoring time is not the client's
        try:
            answer = self.server.score(body)
        except (ValueError, TypeError) as exc:
            return self.send_error(400, _line(exc))
        except Exception as exc:  # noqa: BLE001 - the reward's own failure: the trainer may retry a 500
            self.log_error("the reward failed: %s", _line(exc))
            return self.send_error(500, _line(exc))
        self._json(200, answer)

    def _read_body(self) -> bytearray:
        if self.headers.get("Transfer-Encoding"):
            raise ValueError("Transfer-Encoding is not accepted: send a Content-Length")
        raw, limit = self.headers.get("Content-Length"), self.server.limits.body_limit()
        if raw is None or not raw.strip().isdigit():
            raise ValueError(f"Content-Length must be a byte count, got {raw!r}")
        size = int(raw)
        if size > limit:
            raise ValueError(f"request of {size} bytes is larger than this server's {limit} (--max-request-mb; "
                             "the client splits batches to GET /health's max_images)")
        body, got = bytearray(size), 0
        view = memoryview(body)
        try:
            while got < size:
                n = self.rfile.readinto(view[got:])
                if not n:
                    break
                got += n
        except OSError as exc:  # a socket timeout or the watchdog's shutdown
            raise _Dropped(f"client dropped after {got} of {size} bytes ({type(exc).__name__})") from None
        finally:
            view.release()
        if got < size:
            raise _Dropped(f"client sent {got} of {size} bytes within {self.server.limits.timeout_s:g} s: dropped")
        return body


class RewardHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with ServerLimits (module docstring) around one reward."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, sock: socket.socket, reward, name: str, limits: ServerLimits = ServerLimits()) -> None:
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()
        self.socket, self.server_address = sock, sock.getsockname()[:2]
        self.reward, self.name, self.limits = reward, name, limits
        self.log = RateLimitedLog()
        self.score_lock, self._lock = threading.Lock(), threading.Lock()
        self.active, self._deadlines = 0, {}
        self._stop = threading.Event()
        threading.Thread(target=self._watchdog, name="reward-watchdog", daemon=True).start()

    def score(self, body) -> dict:
        """Decode one request under the scoring lock, score it; ValueError/TypeError: the request is bad."""
        with self.score_lock:
            images, prompts, metadata, evaluating = decode_request(body, self.limits.request)
            del body
            with torch.no_grad(), (evaluation_mode(self.reward) if evaluating else _null()):
                out = self.reward(images, prompts, metadata)
            check_reward_output(self.name, out, len(prompts))
            return {"scores": {k: torch.as_tensor(v).double().reshape(-1).tolist() for k, v in out.items()}}

    # connection cap: one more than max_concurrent is answered 503 from the accepting thread
    def process_request(self, request, client_address) -> None:
        with self._lock:
            busy = self.active >= self.limits.max_concurrent
            self.active += not busy
        if not busy:
            try:
                return super().process_request(request, client_address)
            except BaseException:
                with self._lock:
                    self.active -= 1
                raise
        self.log(f"[serve-reward] {client_address[0]}: busy ({self.limits.max_concurrent} requests in flight): 503")
        try:
            request.settimeout(0.05)
            try:
                request.recv(65536)  # what has arrived, so that closing does not reset the answer away
            except OSError:
                pass
            data = b'{"error": "server busy: too many concurrent requests (--max-concurrent); retry later"}'
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: 1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self.active -= 1

    def handle_error(self, request, client_address) -> None:
        import sys

        exc = sys.exc_info()[1]
        self.log(f"[serve-reward] {client_address[0]}: {_line(exc) if exc else 'error'}")

    # slow clients: a deadline per connection until its request is read
    def watch(self, sock) -> None:
        with self._lock:
            self._deadlines[sock] = time.monotonic() + self.limits.timeout_s

    def unwatch(self, sock) -> None:
        with self._lock:
            self._deadlines.pop(sock, None)

    def _watchdog(self) -> None:
        while not self._stop.wait(min(0.2, self.limits.timeout_s / 4)):
            now = time.monotonic()
            with self._lock:
                late = [s for s, t in self._deadlines.items() if t <= now]
                for s in late:
                    del self._deadlines[s]
            for s in late:
                try:
                    s.shutdown(socket.SHUT_RDWR)  # its blocked read returns: the handler drops it
                except OSError:
                    pass

    def server_close(self) -> None:
        self._stop.set()
        super().server_close()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: the OS picks a free one; the socket stays open and is served as is)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot bind {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(RewardHTTPServer.request_queue_size)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class RewardServer:
    """The server in a background thread (tests, notebooks): `with RewardServer(reward, "name") as s: s.url`."""

    def __init__(self, reward, name: str, host: str = "127.0.0.1", port: int = 0,
                 limits: ServerLimits = ServerLimits()) -> None:
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.httpd = RewardHTTPServer(self.sock, reward, name, limits)
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="reward-server", daemon=True)

    def __enter__(self) -> "RewardServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()
