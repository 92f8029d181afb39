"""`awm-fast serve-reward NAME [--host H] [--port P] [--device D] [--option key=value ...] [limits]`: any reward of
the registry (or a plug-in "package.module:function") behind HTTP, so that reward models run on other GPUs or
nodes; the trainer reaches it with `reward.name=http reward.options={url: http://HOST:PORT}`.

The standard library's ThreadingHTTPServer serves POST /score and GET /health (server and limits:
awm_fast/rewards/http_server.py; wire format: awm_fast/rewards/http.py). Requests are scored one at a time (a
reward model is not assumed thread-safe). `--port 0` binds a free port; the bound address is printed as the first
line: "serving reward NAME on http://HOST:PORT".

Limits: a request holds at most --max-images images of at most --max-side px a side (default 512, the presets'
model.resolution: pass yours), so a body is at most --max-request-mb (default derived from those two: 32 x 3 x
512^2 bytes + 1 MiB = 25 MiB); clients have --timeout-s to send a request; --max-concurrent connections at once
(more are answered 503); every malformed request is answered 400 with the reason.

Security: the server binds 127.0.0.1 (this machine only) unless --host says otherwise. --host 0.0.0.0 WITHOUT a
token serves anyone who can reach the port: set a shared token with --token or $AWM_FAST_REWARD_TOKEN (on the
trainer's side too: $AWM_FAST_REWARD_TOKEN or reward.options.token); requests without it get 401.
"""
from __future__ import annotations

import argparse
import logging
import os

from awm_fast.rewards.http import TOKEN_ENV, RequestLimits
from awm_fast.rewards.http_server import RewardHTTPServer, RewardServer, ServerLimits, bind, url_of

logger = logging.getLogger(__name__)

__all__ = ["RewardServer", "bind", "build", "limits_from_args", "run", "url_of"]


def add_parser(sub) -> None:
    p = sub.add_parser("serve-reward", help="serve a reward over HTTP for reward.name=http",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="a reward name (jpeg_compressibility, pickscore, clipscore, aesthetic, ocr, geneval, "
                                "digits, ...) or 'package.module:function'")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only). 0.0.0.0 (every interface) without "
                        "--token serves ANYONE who can reach the port")
    p.add_argument("--port", type=int, default=8765, help="port (0: a free one, printed)")
    p.add_argument("--device", default=None, help="device of the reward model (passed as its device option)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor option of the reward (value parsed as YAML), e.g. --option model=/ckpt/PickScore_v1")
    p.add_argument("--token", default=None,
                   help=f"shared token every request must carry (Authorization: Bearer TOKEN); default ${TOKEN_ENV}; "
                        "needed beyond loopback")
    p.add_argument("--max-side", type=int, default=RequestLimits.max_side,
                   help="largest image side accepted, px (the model's resolution; default %(default)s)")
    p.add_argument("--max-images", type=int, default=RequestLimits.max_images,
                   help="most images in one request (clients split to it; default %(default)s)")
    p.add_argument("--max-request-mb", type=float, default=None,
                   help="largest request body, MiB (default: max-images x 3 x max-side^2 bytes + 1 MiB)")
    p.add_argument("--max-concurrent", type=int, default=ServerLimits.max_concurrent,
                   help="connections served at once; more are answered 503 (default %(default)s)")
    p.add_argument("--timeout-s", type=float, default=ServerLimits.timeout_s,
                   help="seconds a client has to send its whole request; slower ones are dropped (default %(default)s)")


def limits_from_args(args, reward=None) -> ServerLimits:
    """ServerLimits from the flags (ValueError for one out of range); `reward.image_size` (H, W), when the reward
    has one (digits), is the only image size accepted."""
    for flag, value in (("--max-side", args.max_side), ("--max-images", args.max_images),
                        ("--max-concurrent", args.max_concurrent), ("--timeout-s", args.timeout_s),
                        ("--max-request-mb", 1 if args.max_request_mb is None else args.max_request_mb)):
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"{flag} {value} must be a positive number")
    size = getattr(reward, "image_size", None)
    request = RequestLimits(max_images=args.max_images, max_side=args.max_side,
                            image_size=tuple(size) if size is not None else None)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    return ServerLimits(request=request, max_concurrent=args.max_concurrent, timeout_s=args.timeout_s, token=token,
                        max_request_bytes=int(args.max_request_mb * 2**20) if args.max_request_mb else 0)


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
    from awm_fast.commands.common import UsageError, parse_options

    options = parse_options(args.option, "--option")
    try:
        limits = limits_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        reward = build(args.name, args.device, options)
    except (ValueError, TypeError, ImportError) as exc:
        raise UsageError(f"reward {args.name!r}: {exc}") from None
    limits = limits_from_args(args, reward)
    try:
        sock = bind(args.host, args.port)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    logger.info(f"serving reward {args.name} on {url_of(sock)}")
    if not limits.token and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(f"[warn] serving on {args.host} without a token: anyone who reaches the port can use it "
                       f"(--token or ${TOKEN_ENV})")
    server = RewardHTTPServer(sock, reward, args.name, limits)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
