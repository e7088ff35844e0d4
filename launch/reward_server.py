"""Serve a registered reward over HTTP (logic in ``rewards/server.py``).

    python launch/reward_server.py --reward pickscore --host 127.0.0.1 --port 8000 \
        [--token T] [--max-batch N] [--max-image-side S] [--max-request-mb M] \
        [--device cuda] [--options '{"scale": 0.0384}']

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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reward", required=True, help="registered reward name")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=os.environ.get("REWARD_SERVER_TOKEN"),
                   help="bearer token clients must send (default $REWARD_SERVER_TOKEN; none = no auth)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-image-side", type=int, default=2048)
    p.add_argument("--max-request-mb", type=float, default=64.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--options", default="{}", help="JSON object of reward options")
    args = p.parse_args(argv)

    from rewards.registry import available_rewards, build_reward
    from rewards.server import create_app

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
                           max_image_side=args.max_image_side, max_request_mb=args.max_request_mb),
                host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
