"""python -m runtime.serve: the live WebRTC server and its page.

    python -m runtime.serve                                   # the shipped toy-talker on 127.0.0.1:8080
    python -m runtime.serve --preset wan-1.3b --weights DIR --device cuda --host 0.0.0.0 --token SECRET

Open http://127.0.0.1:8080/ (with --token: http://127.0.0.1:8080/?token=SECRET), pick a face, press Start, speak.
Exit codes: 0 after a clean stop (Ctrl-C), 2 for bad arguments or a missing extra (the message says what to do).
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.split("\n\n")[0])
    # model
    p.add_argument("--preset", default="toy-talker", help="model preset (default: the shipped toy-talker)")
    p.add_argument("--weights", help="directory in the official download layout (wan-1.3b)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the engine step (default: on a CPU; CUDA graphs do the same on a GPU)")
    # network
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token", default=os.environ.get("AVATAR_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' on every endpoint (default: $AVATAR_TOKEN, if set)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="allow cross-origin requests from this origin (repeatable; default: none)")
    # limits
    p.add_argument("--max-sessions", type=int, default=2, help="concurrent sessions (503 past it; default 2)")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds without an offer or client audio before a session is ended (default 30)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_sessions < 1 or not 0 < args.port < 65536 or args.idle_timeout <= 0:
        print("error: --max-sessions must be >= 1, --port in 1..65535 and --idle-timeout > 0", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from .app import Hub, create_app
    except ImportError as err:
        print(f"error: the live server needs the 'serve' extra ({err.name} is missing): pip install -e '.[serve]'",
              file=sys.stderr)
        return 2
    from ..generate import build_pipeline, device_and_dtype
    try:
        device, dtype = device_and_dtype(args.device, None)
        pipe = build_pipeline(argparse.Namespace(preset=args.preset, weights=args.weights, seed=0), device, dtype)
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    hub = Hub(pipe, max_sessions=args.max_sessions, idle_timeout_s=args.idle_timeout, compile=args.compile)
    print("warming up the model (compiling its step takes up to a minute on a small CPU) ...", file=sys.stderr)
    print(f"warm in {hub.warm_up():.1f} s", file=sys.stderr)
    app = create_app(hub, token=args.token, cors_origins=args.cors_origin or None)
    shown = f"http://{args.host}:{args.port}/" + (f"?token={args.token}" if args.token else "")
    print(f"serving {pipe.config.name} on {shown} (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
