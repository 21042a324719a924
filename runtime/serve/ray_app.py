"""The live server scaled out on Ray Serve: many replicas (one GPU each), each holding up to K live sessions.

    python -m runtime.serve --ray --replicas 2 --sessions-per-replica 2      # a local Ray instance
    serve run runtime/serve/ray_config.yaml                                  # a cluster (README: Scale-out)

Two deployments:
- `AvatarReplica` (one GPU each: `num_gpus=1`; CPU in tests) loads the pipeline once and runs runtime.serve's Hub:
  its sessions, their aiortc peer connections and their live cores. WebRTC media flows between the client and the
  replica that answered its offer, directly; Serve only carries the signalling.
- `AvatarIngress` serves the same HTTP endpoints as `python -m runtime.serve` (create_app, on a RemoteHub).

Routing. A session lives on one replica for its whole life (its KV cache, ring and decoder cache are there), so every
later request for it must reach that replica. The session id starts with the replica's id ("<replica>.<secret>")
and a Serve request router (`SessionRouter`, Serve's own extension point for routing) sends offer, delete and
events to the replica named in the id; a new session goes to the replica with the most free slots, from the
routing stats every replica reports each second ({"sessions", "capacity"}). Chosen over a registry
actor (one more actor to keep alive and consistent, on the signalling path) and over per-replica handles (Serve does
not hand them out): the id carries the placement, so the ingress keeps no routing state and can itself be
replicated.

Sessions are Serve requests. For each session the ingress keeps one `hold` call open on its replica until the
session ends, so Serve itself sees a replica's sessions as its ongoing requests:
- autoscaling on sessions per replica is Serve's own (target_ongoing_requests = K);
- scaling down drains: Serve routes nothing new to a replica it stops and waits for its ongoing requests (the
  sessions) to finish, up to graceful_shutdown_timeout_s (one hour by default here), before stopping it. A session on
  it that has not sent its offer yet cannot reach it any more (404; the client makes a new one);
- a replica that dies fails its hold calls: the ingress marks those sessions failed, tells their clients with an
  `ended` event ({"reason": "its replica failed ..."}) on GET /api/sessions/{id}/events, and their slots go with the
  replica (Serve starts a fresh one). Health checks: Serve calls `check_health` every few seconds; a replica whose
  event loop is stuck or whose model broke is restarted.
When every replica is full (a replica that is stopping takes none), creating a session is a 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import tempfile
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ..live import freeze_heap
from .app import HTTPError, Hub, create_app, shipped_faces

SEP = "."                    # session id = <replica id> SEP <secret>
STATS_PERIOD_S = 1.0
DRAIN_TIMEOUT_S = 3600.0
CONTROL_REQUESTS = 16        # room for create/offer/delete/stats calls beside the K held sessions
MAX_INGRESS_REQUESTS = 10000     # per ingress replica: every session holds a call and usually an event stream


def running_replicas(app: str = "avatar") -> int:
    """AvatarReplica replicas of the application that are running (Serve's controller says)."""
    status = serve.status().applications.get(app)
    if status is None or "AvatarReplica" not in status.deployments:
        return 0
    return status.deployments["AvatarReplica"].replica_states.get("RUNNING", 0)


def replica_of(sid: str) -> str:
    return sid.split(SEP, 1)[0] if SEP in sid else ""


class SessionRouter(RequestRouter):
    """Offer, delete, hold and events go to the replica named in the session id; `create` to the replica with the
    most free slots (replicas the caller already tried are skipped). Serve leaves replicas that are stopping out of
    the candidates."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None or not candidate_replicas:
            return [candidate_replicas]
        method = pending_request.metadata.call_method
        if method == "create":
            tried = set(pending_request.kwargs.get("exclude", ()))
            free = []
            for r in candidate_replicas:
                stats = r.routing_stats or {}
                room = stats.get("capacity", 1) - stats.get("sessions", 0)
                if r.replica_id.unique_id not in tried and room > 0:
                    free.append((-room, r.replica_id.unique_id, r))
            if free:
                return [[r for *_, r in sorted(free, key=lambda x: x[:2])]]
            untried = [r for r in candidate_replicas if r.replica_id.unique_id not in tried]
            return [untried or candidate_replicas]      # stale stats: the replica itself answers 503 if full
        sid = pending_request.kwargs.get("sid") or (pending_request.args[0] if pending_request.args else "")
        owner = replica_of(sid) if isinstance(sid, str) else ""
        named = [r for r in candidate_replicas if r.replica_id.unique_id == owner]
        return [named or candidate_replicas]            # gone (died or drained): any replica answers 404


def _unwrap(reply: dict) -> dict:
    """A replica's reply -> itself, or the HTTPError it carries."""
    if "error" in reply:
        status, message, headers = reply["error"]
        raise HTTPError(status, message, headers)
    return reply


def _lost(err: Exception) -> str:
    return f"its replica failed ({type(err).__name__}); create a new session"


async def _call(coro) -> dict:
    """A Hub call inside a replica -> {"ok": result} or {"error": [status, message, headers]} (exceptions of HTTP
    meaning cross the process boundary as data, not as Ray task errors)."""
    try:
        return {"ok": await coro}
    except HTTPError as err:
        return {"error": [err.status, err.message, err.headers]}


class AvatarReplica:
    """One replica: a pipeline and a Hub of at most `sessions` live sessions (see the module docstring)."""

    def __init__(self, preset: str = "toy-talker", weights: str | None = None, device: str | None = None,
                 sessions: int = 2, compile: bool | None = None, idle_timeout_s: float = 30.0,
                 stream: str | None = None):
        from ..generate import serving_pipeline
        self.id = serve.get_replica_context().replica_id.unique_id
        pipe = serving_pipeline(preset, weights, device, stream)
        self.hub = Hub(pipe, max_sessions=sessions, idle_timeout_s=idle_timeout_s, compile=compile,
                       sid_prefix=self.id + SEP)
        # Replicas on one machine that compile at once race on TorchInductor's shared cache (one loads a module
        # another is still writing: "file too short"): they take turns, and the later ones load the first's work.
        with open(os.path.join(tempfile.gettempdir(), "avatar-replica-warm-up.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.hub.warm_up()
        freeze_heap()
        self._sweeper: asyncio.Task | None = None

    def _sweep(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self.hub.sweep())

    async def create(self, image, exclude=()) -> dict:
        self._sweep()
        reply = await _call(self.hub.create(image))
        if "error" in reply:
            reply["error"][2] = {**reply["error"][2], "X-Replica": self.id}
        return reply

    async def offer(self, sid: str, sdp: str) -> dict:
        return await _call(self.hub.offer(sid, sdp))

    async def delete(self, sid: str) -> dict:
        return {"ok": await self.hub.remove(sid)}

    async def hold(self, sid: str) -> dict:
        """Returns when the session ends (the ingress keeps this call open: Serve counts it as ongoing)."""
        return await _call(self.hub.ended(sid))

    def record_routing_stats(self) -> dict:
        return {"sessions": len(self.hub.sessions) + self.hub._creating, "capacity": self.hub.max_sessions}

    async def check_health(self) -> None:
        """Serve's health check: the event loop answers, and the device still runs work (a CUDA error poisons the
        context for good, and then this raises and Serve replaces the replica)."""
        await asyncio.to_thread(self._probe)

    def _probe(self) -> None:
        import torch
        x = torch.ones(8, device=self.hub.pipe.device)
        if float((x * 2).sum()) != 16.0:
            raise RuntimeError(f"the device {self.hub.pipe.device} computes wrong results")

    async def __del__(self):
        await self.hub.close()


@dataclass
class _Held:
    task: asyncio.Task              # the hold call, open until the session ends
    ended: asyncio.Future           # its result: {"id", "reason"}


class RemoteHub:
    """runtime.serve's Hub interface on the replicas (what create_app needs), for the ingress."""

    def __init__(self, replicas, *, replicas_hint: int = 1, sessions_per_replica: int = 2):
        self.replicas = replicas                        # DeploymentHandle to AvatarReplica
        self.faces = shipped_faces()
        self.max_sessions = replicas_hint * sessions_per_replica
        self.sessions: dict[str, _Held] = {}
        self.failed: dict[str, str] = {}                # sid -> reason, for sessions whose replica died
        self._registry = CollectorRegistry()
        self._gauge = Gauge("avatar_sessions", "live sessions held by this ingress", registry=self._registry)
        self._lost = Counter("avatar_sessions_lost_total", "sessions ended by their replica's failure",
                             registry=self._registry)

    async def _remote(self, method: str, *args, **kwargs):
        try:
            reply = await getattr(self.replicas, method).remote(*args, **kwargs)
        except Exception as err:                        # the replica died or Serve could not reach one
            raise HTTPError(503, f"no replica could take the request ({type(err).__name__}); retry later",
                            {"Retry-After": "5"}) from None
        return _unwrap(reply)

    async def create(self, image) -> dict:
        """On the replica with the most free slots; one that refuses (its slots filled since its last stats) is
        skipped and the next tried, until every replica has refused: then a 503."""
        tried: list[str] = []
        while True:
            try:
                reply = await self._remote("create", image, exclude=tuple(tried))
            except HTTPError as err:
                replica = err.headers.pop("X-Replica", None)
                if err.status != 503:
                    raise
                if replica is None or replica in tried:
                    raise HTTPError(503, f"every replica is full ({err.message})",
                                    {"Retry-After": "5"}) from None
                tried.append(replica)
                continue
            self._hold(reply["ok"]["id"])
            return reply["ok"]

    def _hold(self, sid: str) -> None:
        ended = asyncio.get_running_loop().create_future()

        async def hold():
            try:
                reply = await self.replicas.hold.remote(sid=sid)
                result = reply.get("ok") or {"id": sid, "reason": "ended"}
            except Exception as err:                    # the replica died: its sessions with it
                reason = _lost(err)
                self.failed[sid] = reason
                self._lost.inc()
                result = {"id": sid, "reason": reason}
            self.sessions.pop(sid, None)
            if not ended.done():
                ended.set_result(result)

        self.sessions[sid] = _Held(asyncio.ensure_future(hold()), ended)

    async def offer(self, sid: str, sdp: str) -> dict:
        self._check(sid)
        return (await self._remote("offer", sid=sid, sdp=sdp))["ok"]

    async def remove(self, sid: str, reason: str = "deleted") -> bool:
        if sid in self.failed:
            return bool(self.failed.pop(sid))
        return (await self._remote("delete", sid=sid))["ok"]     # routed by the id: any ingress replica can ask

    async def ended(self, sid: str) -> dict:
        if sid in self.failed:
            return {"id": sid, "reason": self.failed[sid]}
        held = self.sessions.get(sid)
        if held is not None:
            return await asyncio.shield(held.ended)
        try:                                            # held by another ingress replica: wait on the replica
            reply = await self.replicas.hold.remote(sid=sid)
        except Exception as err:
            return {"id": sid, "reason": _lost(err)}
        return _unwrap(reply)["ok"]

    def _check(self, sid: str) -> None:
        if sid in self.failed:
            raise HTTPError(410, f"session {sid!r} is gone: {self.failed[sid]}")

    async def health(self) -> dict:
        """Ready when a replica runs (replicas load and warm up the model first: a minute or more on a CPU);
        `replicas`: how many run now."""
        running = await asyncio.to_thread(running_replicas)
        return {"ok": running > 0, "sessions": len(self.sessions), "max_sessions": self.max_sessions,
                "replicas": running}

    def metrics_text(self) -> bytes:
        """This ingress's view: sessions it holds and sessions lost with their replica (each replica's own frames,
        drops and step times are in its Hub; Ray exports Serve's request metrics)."""
        self._gauge.set(len(self.sessions))
        return generate_latest(self._registry)

    async def sweep(self) -> None:
        return None

    async def close(self) -> None:
        for held in self.sessions.values():
            held.task.cancel()


@serve.ingress()
class AvatarIngress:
    """The HTTP endpoints of runtime.serve, for sessions on AvatarReplica replicas."""

    def __init__(self, replicas, token: str | None = None, replicas_hint: int = 1, sessions_per_replica: int = 2):
        self.hub = RemoteHub(replicas, replicas_hint=replicas_hint, sessions_per_replica=sessions_per_replica)
        self.token = token

    def __serve_build_asgi_app__(self):
        return create_app(self.hub, token=self.token)


def build_app(*, replicas: int = 1, sessions_per_replica: int = 2, max_replicas: int | None = None,
              preset: str = "toy-talker", weights: str | None = None, device: str | None = None,
              stream: str | None = None, gpus_per_replica: float | None = None, compile: bool | None = None,
              token: str | None = None,
              idle_timeout_s: float = 30.0, health_check_period_s: float = 5.0):
    """The Serve application: `replicas` AvatarReplica (autoscaling up to `max_replicas` when given) behind one
    AvatarIngress. `gpus_per_replica`: default 1 when the device is CUDA (or unset and Ray sees GPUs), else 0."""
    import ray
    if gpus_per_replica is None:
        gpus_per_replica = 1 if device == "cuda" or (device is None and ray.is_initialized()
                                                       and ray.cluster_resources().get("GPU", 0) > 0) else 0
    scaling = dict(num_replicas=replicas) if not max_replicas else dict(autoscaling_config=AutoscalingConfig(
        min_replicas=replicas, max_replicas=max_replicas, target_ongoing_requests=sessions_per_replica,
        upscale_delay_s=5.0, downscale_delay_s=60.0))
    replica = serve.deployment(
        AvatarReplica, name="AvatarReplica", ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 1},
        max_ongoing_requests=sessions_per_replica + CONTROL_REQUESTS,
        graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S, graceful_shutdown_wait_loop_s=1.0,
        health_check_period_s=health_check_period_s, health_check_timeout_s=30.0,
        request_router_config=RequestRouterConfig(request_router_class=SessionRouter,
                                                  request_routing_stats_period_s=STATS_PERIOD_S),
        **scaling)
    ingress = serve.deployment(AvatarIngress, name="AvatarIngress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_INGRESS_REQUESTS)
    return ingress.bind(replica.bind(preset=preset, weights=weights, device=device, sessions=sessions_per_replica,
                                     compile=compile, idle_timeout_s=idle_timeout_s, stream=stream),
                        token=token, replicas_hint=max_replicas or replicas,
                        sessions_per_replica=sessions_per_replica)


def app_builder(args: dict):
    """For `serve run` / a Serve config file: the build_app keywords as the application's args."""
    return build_app(**args)


def wait_ready(url: str, replicas: int = 1, timeout_s: float = 600.0) -> None:
    """Block until /healthz says `replicas` replicas run."""
    import json
    import urllib.request
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=5) as r:
                if json.load(r).get("replicas", 0) >= replicas:
                    return
        except OSError:                     # not up yet, or a 503 (no replica running)
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Serve application at {url} did not come up within {timeout_s:.0f} s")
        time.sleep(0.5)
