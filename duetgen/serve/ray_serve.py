"""`duetgen serve --ray [--ray-address ADDRESS] --replicas K`: the same app (chat page, /api, /v1) as a Ray Serve deployment.

    duetgen serve --model DIR --ray --replicas 2                 # a local Ray instance on this machine
    duetgen serve --model DIR --ray --ray-address auto --replicas 8 --host 0.0.0.0 --allowed-host duetgen.example
                                                                 # the Ray cluster this machine belongs to

    from duetgen.serve.ray_serve import deploy
    ray.init(num_cpus=2); serve.start(http_options=http_options("127.0.0.1", 8000, ServeLimits()))
    deploy("checkpoints/shapeworld-toy", replicas=2)             # http://127.0.0.1:8000/, /api, /v1

Design choices:
- One replica = one Ray actor that loads the model from ``model_dir`` (so the directory must be
  readable at that path on every node) and runs ``create_app`` over it: the same endpoints, limits,
  Host check and errors as ``duetgen serve``. A replica asks Ray for one GPU (``num_gpus=1``) when it
  runs on CUDA, so Ray places replicas one per GPU, across the cluster's machines.
- Admission moves out of the replica: Ray Serve's proxy routes each request to a replica with a free
  slot (``max_ongoing_requests`` = 2 x ``max_batch`` per replica: ``max_batch`` generating and as
  many waiting at the replica, or light requests such as /v1/images), and holds up to
  ``queue_size`` more per proxy (``max_queued_requests``) until any replica frees one; the next get
  429 with ``Retry-After: 5`` from the proxy (``BackpressureConfig``). The replica's own queue is as
  large as its slots, so its 429 does not fire under Ray: a request is refused only when every
  replica is full, never because the router picked a busy one.
- Generated images are served by URL from every replica: the ``/v1/images/`` store is one Ray
  actor (``ImageStoreActor``, bounded as the in-process store) that every replica writes to and
  reads from, because the proxy sends a request for an image to any replica, not to the one that drew it.
- Each response carries ``X-DuetGen-Replica`` (the Ray Serve replica id): which replica answered.
- The proxy's end-to-end timeout (``request_timeout_s``) is the server's ``--timeout``, so time spent
  waiting at the proxy for a replica counts too (Ray answers 408 when it runs out). Ray's proxy lets
  a client override it per request (``x-request-timeout-seconds``, 0 = none) and keep a generation
  running after it disconnects (``x-request-disconnect-disabled: ?1``); the replica's own
  ``--timeout`` still ends any generation, and a public deployment should strip both headers in
  the reverse proxy in front of Ray.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import ray
from ray import serve
from ray.serve.config import BackpressureConfig

from duetgen.serve.common import ServeLimits
from duetgen.serve.openai_api import ImageStore
from duetgen.serve.server import create_app

APP_NAME = "duetgen"
RETRY_AFTER_S = 5  # as the single server's 429


@ray.remote(num_cpus=0)
class ImageStoreActor:
    """The /v1 image store shared by every replica (one ``ImageStore`` in one actor)."""

    def __init__(self, max_bytes: int, ttl_s: float):
        self.store = ImageStore(max_bytes, ttl_s)

    def put(self, png: bytes) -> str:
        return self.store.put(png)

    def get(self, sha: str) -> bytes | None:
        return self.store.get(sha)


class RemoteImageStore:
    """``ImageStore``'s two calls on an ``ImageStoreActor``; blocking (the app calls them off the event loop)."""

    def __init__(self, actor):
        self.actor = actor

    def put(self, png: bytes) -> str:
        return ray.get(self.actor.put.remote(png))

    def get(self, sha: str) -> bytes | None:
        return ray.get(self.actor.get.remote(sha))


class ReplicaHeader:
    """ASGI middleware: ``X-DuetGen-Replica: <id>`` on every response."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-duetgen-replica", self.replica)]}
            await send(message)

        await self.app(scope, receive, tagged)


class DuetGenReplica:
    """One model and the ``duetgen serve`` app over it (wrapped by ``serve.ingress`` below)."""

    def __init__(self, model_dir: str, device: str, limits: ServeLimits, allowed_hosts: list[str] | None, images):
        import torch

        from duetgen.infer.pipeline import DuetGenPipeline

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"replica asked for device {device!r} but sees no GPU "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        self.pipeline = DuetGenPipeline.from_pretrained(model_dir, device=device)
        self.limits, self.allowed_hosts, self.images = limits, allowed_hosts, images

    def __serve_build_asgi_app__(self):
        app = create_app(self.pipeline, self.limits, allowed_hosts=self.allowed_hosts,
                         image_store=RemoteImageStore(self.images))
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app


def replica_limits(limits: ServeLimits) -> ServeLimits:
    """The limits a replica runs with: its own queue as large as its Ray slots, so only Ray's queue answers 429."""
    return replace(limits, queue_size=limits.max_batch)


def deploy(model_dir: str, replicas: int = 1, *, device: str = "cpu", limits: ServeLimits | None = None,
           allowed_hosts: list[str] | None = None, num_cpus: float = 1, name: str = APP_NAME,
           route_prefix: str = "/"):
    """Run the app with ``replicas`` replicas on the connected Ray cluster (``serve.run``); its handle.

    ``limits.queue_size``: requests waiting at each Ray Serve proxy for a free replica; the next get 429.
    ``device``: "cpu", or "cuda" (each replica takes one GPU, ``num_gpus=1``).
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1; got {replicas}")
    limits = limits or ServeLimits()
    num_gpus = 1 if device.startswith("cuda") else 0
    images = ImageStoreActor.options(name=f"{name}-images", get_if_exists=True).remote(
        limits.image_store_bytes, limits.image_ttl_s)
    deployment = serve.deployment(
        serve.ingress()(DuetGenReplica),
        name=name,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=2 * limits.max_batch,
        max_queued_requests=limits.queue_size,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
    )
    app = deployment.bind(str(model_dir), "cuda" if num_gpus else device, replica_limits(limits), allowed_hosts, images)
    return serve.run(app, name=name, route_prefix=route_prefix)


def remove(name: str = APP_NAME) -> None:
    """Delete the app and its image store from the cluster."""
    serve.delete(name)
    try:
        ray.kill(ray.get_actor(f"{name}-images"))
    except ValueError:  # already gone
        pass


def http_options(host: str, port: int, limits: ServeLimits) -> dict:
    """Ray Serve's proxy settings (``serve.start(http_options=...)``): where it listens, and ``--timeout`` end to end."""
    return {"host": host, "port": port, "request_timeout_s": limits.request_timeout_s}


def serve_on_ray(model_dir: str, replicas: int, *, host: str, port: int, device: str, limits: ServeLimits,
                 allowed_hosts: list[str], num_cpus: float = 1) -> None:
    """``duetgen serve --ray`` (after ``ray.init``): deploy, hold until Ctrl-C, then remove the app."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if device.startswith("cuda") and gpus < replicas:
        print(f"warning: {replicas} replica(s) want one GPU each and the cluster has {gpus:g} now; "
              "the rest wait until GPUs join", flush=True)
    serve.start(http_options=http_options(host, port, limits))

    def stop(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (kill, systemd, Kubernetes) as Ctrl-C; SIGINT too, since a shell ignores it for a background job
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        deploy(model_dir, replicas, device=device, limits=limits, allowed_hosts=allowed_hosts, num_cpus=num_cpus)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        remove()
        ray.shutdown()  # a local instance stops; a cluster is only disconnected from
