"""Serve a registered reward over HTTP (logic in ``rewards/server.py``).

    python launch/reward_server.py --reward pickscore --host 127.0.0.1 --port 8000 \
        [--token T] [--max-batch N] [--max-image-side S] [--max-request-mb M] [--max-request-pixels P] \
        [--max-concurrent C] [--max-queued Q] [--header-timeout S] [--body-timeout S] \
        [--device cuda] [--options '{"scale": 0.0384}']

Limits (``rewards/server.py``): past the byte, batch, side or pixel limit a request is a 413; past
``--max-concurrent`` requests in progress and ``--max-queued`` waiting, a 429 (the client retries);
a connection without complete headers after ``--header-timeout`` s is closed; a body not received
within ``--body-timeout`` s is a 408. Worst-case memory: about max-concurrent x (max-request-mb +
4 bytes x max-request-pixels).

Clients: ``build_reward("remote", url="http://127.0.0.1:8000", token=T)`` or
``MultiReward({"remote:http://127.0.0.1:8000": 1.0})``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    from rewards.server import DEFAULT_MAX_REQUEST_PIXELS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reward", required=True, help="registered reward name")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=os.environ.get("REWARD_SERVER_TOKEN"),
                   help="bearer token clients must send (default $REWARD_SERVER_TOKEN; none = no auth)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-image-side", type=int, default=2048)
    p.add_argument("--max-request-mb", type=float, default=64.0)
    p.add_argument("--max-request-pixels", type=int, default=DEFAULT_MAX_REQUEST_PIXELS,
                   help="decoded pixels per request, all images together (default %(default)s: 32 x 1024^2)")
    p.add_argument("--max-concurrent", type=int, default=4, help="requests read, decoded and scored at once")
    p.add_argument("--max-queued", type=int, default=64, help="requests waiting for a slot before 429s")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a connection may take to send headers")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds a request may take to send its body")
    p.add_argument("--device", default="cpu")
    p.add_argument("--options", default="{}", help="JSON object of reward options")
    args = p.parse_args(argv)

    from rewards.registry import available_rewards, build_reward
    from rewards.server import create_app, deadline_protocol

    for name in ("max_batch", "max_image_side", "max_request_pixels", "max_concurrent"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    for name in ("max_request_mb", "header_timeout", "body_timeout"):
        if not 0 < getattr(args, name) < float("inf"):
            print(f"error: --{name.replace('_', '-')} must be a finite number > 0, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    if args.max_queued < 0:
        print(f"error: --max-queued must be >= 0, got {args.max_queued}", file=sys.stderr)
        return 2

    try:
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        print(f"error: --options must be a JSON object: {e}", file=sys.stderr)
        return 2
    if args.reward not in available_rewards():
        print(f"error: unknown reward {args.reward!r}; available: {', '.join(available_rewards())}", file=sys.stderr)
        return 2
    try:
        reward = build_reward(args.reward, device=args.device, **options)
    except (TypeError, ValueError) as e:
        print(f"error: cannot build reward {args.reward!r}: {e}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        print(f"warning: serving on {args.host} without --token", file=sys.stderr)

    import uvicorn

    uvicorn.run(create_app(reward, token=args.token, max_batch=args.max_batch,
                           max_image_side=args.max_image_side, max_request_mb=args.max_request_mb,
                           max_request_pixels=args.max_request_pixels, max_concurrent=args.max_concurrent,
                           max_queued=args.max_queued, body_timeout=args.body_timeout),
                host=args.host, port=args.port, log_level="info", http=deadline_protocol(args.header_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
