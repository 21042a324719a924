"""Scale-out on Ray Serve (runtime/serve/ray_app.py): a local Ray instance started here, two CPU replicas of the
toy-talker with one session slot each, aiortc clients. Sessions land one per replica and stay there; a third client
gets 503; killing one replica ends its session with an `ended` event and leaves the other streaming; scaling down
drains (the replica that goes keeps its session until the session ends)."""
import asyncio
import threading
import time

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra is not installed")
ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[serve,ray]'")
httpx = pytest.importorskip("httpx")

from ray import serve  # noqa: E402

from bench.serve import run_client  # noqa: E402
from runtime.serve.ray_app import replica_of, running_replicas, wait_ready  # noqa: E402

PORT = 8765
URL = f"http://127.0.0.1:{PORT}"
OPTIONS = dict(sessions_per_replica=1, preset="toy-talker", device="cpu", compile=False, idle_timeout_s=20.0)
pytestmark = pytest.mark.timeout(300)


def deploy(replicas: int) -> None:
    """Deploy (or update) the application from a Serve config, the way `serve deploy config.yaml` does on a
    cluster: a change of replica count alone is applied in place (replicas that go are drained)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema
    config = {"applications": [{"name": "avatar", "route_prefix": "/", "import_path": "runtime.serve.ray_app:app_builder",
                                "args": dict(OPTIONS, replicas=2),
                                "deployments": [{"name": "AvatarReplica", "num_replicas": replicas}]}]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        deploy(2)
        wait_ready(URL, 2, timeout_s=240)
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.25 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def replica_actors() -> dict[str, str]:
    """Replica id -> actor name, for the live AvatarReplica actors."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "AvatarReplica" in a["name"]]
    return {name.rsplit("#", 1)[-1]: name for name in names}


def wait_serving(n: int, timeout: float = 120.0) -> None:
    """n replicas running, and their routing stats with the router (reported every second)."""
    assert wait_for(lambda: running_replicas() == n and len(replica_actors()) == n, timeout)
    time.sleep(2.5)


async def two_clients(seconds: float):
    """Two run_client tasks and their results once both are connected (a client that fails raises here)."""
    started: dict[str, object] = {}
    tasks = [asyncio.ensure_future(run_client(URL, tone(1.0), seconds, on_start=lambda r, k=k: started.setdefault(k, r)))
             for k in "ab"]
    while len(started) < 2:
        for task in tasks:
            if task.done():
                task.result()
        await asyncio.sleep(0.1)
    return tasks, started


def frames_after(result, t: float) -> int:
    return sum(1 for arrival, _ in result.video if arrival > t)


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return False


def test_sessions_spread_over_replicas_stay_there_and_a_full_service_answers_503(cluster):
    wait_serving(2)

    async def main():
        a = asyncio.ensure_future(run_client(URL, tone(1.0), 6.0))
        b = asyncio.ensure_future(run_client(URL, tone(1.0), 6.0))
        await asyncio.sleep(3.0)                        # both sessions made (stats reach the router within 1 s)
        async with httpx.AsyncClient(base_url=URL, timeout=30) as http:
            full = await http.post("/api/sessions", json={})
            health = (await http.get("/healthz")).json()
        return await a, await b, full, health

    a, b, full, health = asyncio.run(main())
    assert replica_of(a.session["id"]) != replica_of(b.session["id"])          # one per replica
    assert set(replica_actors()) >= {replica_of(a.session["id"]), replica_of(b.session["id"])}
    for result in (a, b):                     # media from the replica that answered the offer, for the whole call
        assert len(result.video) >= 75 and result.fps() > 15, (len(result.video), result.fps())
    assert full.status_code == 503 and full.headers["retry-after"] == "5" and "error" in full.json()
    assert health["ok"] and health["sessions"] == 2 and health["replicas"] == 2


def test_a_replica_that_dies_ends_its_sessions_and_the_others_stream_on(cluster):
    wait_serving(2)
    got: dict[str, str] = {}

    def listen(sid):
        with httpx.stream("GET", f"{URL}/api/sessions/{sid}/events", timeout=60) as response:
            got["events"] = "".join(response.iter_text())

    async def main():
        (a, b), started = await two_clients(9.0)
        await asyncio.sleep(2.0)
        sid = started["a"].session["id"]
        listener = threading.Thread(target=listen, args=(sid,))
        listener.start()
        await asyncio.sleep(0.5)
        ray.kill(ray.get_actor(replica_actors()[replica_of(sid)], namespace="serve"), no_restart=True)
        killed = time.monotonic()
        await asyncio.to_thread(listener.join, 30)
        return await a, await b, killed

    a, b, killed = asyncio.run(main())
    assert "event: ended" in got["events"] and "replica failed" in got["events"]
    assert frames_after(b, killed + 1.0) >= 60                 # the other replica's client kept streaming
    assert frames_after(a, killed + 1.0) <= 5                  # the dead replica's media stopped
    with httpx.Client(base_url=URL, timeout=30) as http:
        gone = http.post(f"/api/sessions/{a.session['id']}/offer", json={"sdp": "x", "type": "offer"})
        assert gone.status_code in (404, 410) and "error" in gone.json()
    wait_serving(2)                                            # Serve replaced the dead replica


def test_scaling_down_drains_the_replica_that_goes(cluster):
    """The config updated to one replica while both hold a streaming session: Serve stops one, but only once its
    session has ended; both clients stream on meanwhile, and afterwards one replica is left, taking new sessions."""
    wait_serving(2)

    async def main():
        (a, b), _ = await two_clients(10.0)
        await asyncio.to_thread(deploy, 1)
        scaled = time.monotonic()
        await asyncio.sleep(4.0)
        alive = len(replica_actors())
        return await a, await b, scaled, alive

    a, b, scaled, alive = asyncio.run(main())
    assert alive == 2                                          # the replica going down still holds its session
    for result in (a, b):
        assert frames_after(result, scaled + 1.0) >= 75       # neither session was cut
    assert wait_for(lambda: len(replica_actors()) == 1, 60)   # its session ended: the drain finished
    wait_serving(1)
    with httpx.Client(base_url=URL, timeout=30) as http:
        made = http.post("/api/sessions", json={})
        assert made.status_code == 200 and replica_of(made.json()["id"]) in replica_actors()
        http.delete(f"/api/sessions/{made.json()['id']}")
