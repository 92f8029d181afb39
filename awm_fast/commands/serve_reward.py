"""`awm-fast serve-reward NAME [--host H] [--port P] [--device D] [--option key=value ...]`: any reward of the
registry (or a plug-in "package.module:function") behind HTTP, so that reward models run on other GPUs or
nodes; the trainer reaches it with `reward.name=http reward.options={url: http://HOST:PORT}`.

aiohttp (`pip install 'awm-fast[serve]'`) serves POST /score and GET /health (wire format:
awm_fast/rewards/http.py). Requests are scored one at a time on one worker thread (a reward model is not
assumed thread-safe) while the event loop keeps reading the next ones. `--port 0` binds a free port; the
bound address is printed as the first line: "serving reward NAME on http://HOST:PORT".
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import socket
import threading

import torch

from awm_fast.rewards.base import check_reward_output, evaluation_mode

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("serve-reward", help="serve a reward over HTTP for reward.name=http",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="a reward name (jpeg_compressibility, pickscore, clipscore, aesthetic, ocr, geneval, "
                                "digits, ...) or 'package.module:function'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8765, help="port (0: a free one, printed)")
    p.add_argument("--device", default=None, help="device of the reward model (passed as its device option)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor option of the reward (value parsed as YAML), e.g. --option model=/ckpt/PickScore_v1")
    p.add_argument("--max-request-mb", type=float, default=1024.0, help="largest request body accepted")


def score(reward, name: str, body: bytes) -> dict:
    """Decode one request, score it, and return the JSON-able answer (ValueError: the request is bad)."""
    from awm_fast.rewards.http import decode_request

    images, prompts, metadata, evaluating = decode_request(body)
    with torch.no_grad(), (evaluation_mode(reward) if evaluating else _null()):
        out = reward(images, prompts, metadata)
    check_reward_output(name, out, len(prompts))
    return {"scores": {k: torch.as_tensor(v).double().reshape(-1).tolist() for k, v in out.items()}}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_app(reward, name: str, max_request_mb: float = 1024.0):
    from aiohttp import web

    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    async def health(request):
        return web.json_response({"status": "ok", "reward": name})

    async def handle(request):
        body = await request.read()
        try:
            answer = await asyncio.get_running_loop().run_in_executor(worker, score, reward, name, body)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": _line(exc)}, status=400)
        except Exception as exc:  # noqa: BLE001 - the reward's own failure: the client retries a 500
            return web.json_response({"error": _line(exc)}, status=500)
        return web.Response(body=json.dumps(answer).encode(), content_type="application/json")

    async def shutdown(app):
        worker.shutdown(wait=False, cancel_futures=True)

    app = web.Application(client_max_size=int(max_request_mb * 2**20))
    app.router.add_get("/health", health)
    app.router.add_post("/score", handle)
    app.on_cleanup.append(shutdown)
    return app


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
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class RewardServer:
    """The server in a background thread (tests, notebooks): `with RewardServer(reward, "name") as s: s.url`."""

    def __init__(self, reward, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.reward, self.name, self.sock = reward, name, bind(host, port)
        self.url = url_of(self.sock)
        self._loop = asyncio.new_event_loop()
        self._ready, self._runner = threading.Event(), None
        self._thread = threading.Thread(target=self._serve, name="reward-server", daemon=True)

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(make_app(self.reward, self.name))
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.SockSite(self._runner, self.sock).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def __enter__(self) -> "RewardServer":
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self.sock.close()


def build(name: str, device: str | None, options: dict):
    """The reward to serve; `digits` gets the digits task's classifier (cached artefacts)."""
    from awm_fast.rewards import build_reward

    if device is not None:
        options = {**options, "device": device}
    classifier = None
    if "digits" in [p.strip() for p in name.split("+")]:
        from awm_fast.config import DigitsConfig
        from awm_fast.tasks.digits import prepare_digits

        classifier = prepare_digits(DigitsConfig()).classifier
    return build_reward(name, digits_classifier=classifier, **options)


def run(args) -> int:
    from aiohttp import web

    from awm_fast.commands.common import UsageError, parse_options

    options = parse_options(args.option, "--option")
    try:
        reward = build(args.name, args.device, options)
    except (ValueError, TypeError, ImportError) as exc:
        raise UsageError(f"reward {args.name!r}: {exc}") from None
    try:
        sock = bind(args.host, args.port)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    logger.info(f"serving reward {args.name} on {url_of(sock)}")
    web.run_app(make_app(reward, args.name, args.max_request_mb), sock=sock, print=None,
                handle_signals=True)
    return 0
