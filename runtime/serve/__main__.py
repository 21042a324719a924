"""python -m runtime.serve: the live WebRTC server and its page.

    python -m runtime.serve                                   # the shipped toy-talker on 127.0.0.1:8080
    python -m runtime.serve --preset wan-1.3b --weights DIR --device cuda --host 0.0.0.0 --token SECRET
    python -m runtime.serve --ray --replicas 2 --sessions-per-replica 2      # Ray Serve, a local Ray instance

Open http://127.0.0.1:8080/ (with --token: http://127.0.0.1:8080/?token=SECRET), pick a face, press Start, speak.
Exit codes: 0 after a clean stop (Ctrl-C), 2 for bad arguments or a missing extra (the message says what to do),
1 when the Ray Serve application cannot start.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.split("\n\n")[0])
    # model
    p.add_argument("--preset", default="toy-talker", help="model preset (default: the shipped toy-talker)")
    p.add_argument("--weights", help="directory in the official download layout (wan-1.3b)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--stream", default=None,
                   help="stream preset of the live sessions (default: the model's live stream: 'live' for "
                        "toy-talker, 0.16 s of look-ahead; the model's own stream for others)")
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
    # scale-out
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve: replicas of the model, sessions spread "
                                                     "over them (runtime/serve/ray_app.py; the 'ray' extra)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (one GPU each on CUDA; default 1)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="with --ray: autoscale on sessions per replica from --replicas up to this many")
    p.add_argument("--sessions-per-replica", type=int, default=2, help="with --ray: sessions per replica (default 2)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_sessions < 1 or not 0 < args.port < 65536 or args.idle_timeout <= 0:
        print("error: --max-sessions must be >= 1, --port in 1..65535 and --idle-timeout > 0", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from ..live import freeze_heap, host_thread
        from .app import Hub, create_app
    except ImportError as err:
        print(f"error: the live server needs the 'serve' extra ({err.name} is missing): pip install -e '.[serve]'",
              file=sys.stderr)
        return 2
    if args.ray:
        return serve_on_ray(args)
    from ..generate import serving_pipeline
    host_thread()                   # the event loop's thread: no OpenMP team of its own (runtime.live.host_thread)
    try:
        pipe = serving_pipeline(args.preset, args.weights, args.device, args.stream)
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    hub = Hub(pipe, max_sessions=args.max_sessions, idle_timeout_s=args.idle_timeout, compile=args.compile)
    print("warming up the model (compiling its step takes up to a minute on a small CPU) ...", file=sys.stderr)
    print(f"warm in {hub.warm_up():.1f} s", file=sys.stderr)
    freeze_heap()
    app = create_app(hub, token=args.token, cors_origins=args.cors_origin or None)
    shown = f"http://{args.host}:{args.port}/" + (f"?token={args.token}" if args.token else "")
    print(f"serving {pipe.config.name} on {shown} (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def serve_on_ray(args) -> int:
    if args.replicas < 1 or args.sessions_per_replica < 1 or (args.max_replicas or args.replicas) < args.replicas:
        print("error: --replicas and --sessions-per-replica must be >= 1, --max-replicas >= --replicas",
              file=sys.stderr)
        return 2
    try:
        import ray
        from ray import serve

        from .ray_app import build_app, wait_ready
    except ImportError as err:
        print(f"error: --ray needs the 'ray' extra ({err.name} is missing): pip install -e '.[serve,ray]'",
              file=sys.stderr)
        return 2
    ray.init(include_dashboard=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))        # a stop also shuts the local Ray instance down
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print("starting the replicas (each loads and warms up the model; they take turns on one machine) ...",
              file=sys.stderr)
        serve.run(build_app(replicas=args.replicas, max_replicas=args.max_replicas,
                            sessions_per_replica=args.sessions_per_replica, preset=args.preset, weights=args.weights,
                            device=args.device, stream=args.stream, compile=args.compile, token=args.token,
                            idle_timeout_s=args.idle_timeout), name="avatar", route_prefix="/", blocking=False)
        url = f"http://{args.host}:{args.port}/"
        wait_ready(url, args.replicas)
        print(f"serving on {url} with Ray Serve (Ctrl-C stops)", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as err:         # a replica failed to start (its error is in the message)
        print(f"error: the Serve application did not start: {err}", file=sys.stderr)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
