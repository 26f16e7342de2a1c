"""`duetgen serve --ray [--ray-address ADDRESS] --replicas K`: the same app (chat page, /api, /v1) as a Ray Serve deployment.

    duetgen serve --model DIR --ray --replicas 2                 # a local Ray instance on this machine
    duetgen serve --model DIR --ray --ray-address auto --replicas 8 --host 0.0.0.0 --allowed-host duetgen.example
                                                                 # the Ray cluster this machine belongs to

    from duetgen.serve.ray_serve import deploy
    ray.init(num_cpus=2); serve.start(http_options=http_options("127.0.0.1", 8000, ServeLimits()))
    deploy("checkpoints/shapeworld-toy", replicas=2)             # http://127.0.0.1:8000/, /api, /v1

Design choices:
- Two deployments. The model replicas (``DuetGenReplica``, K of them): one Ray actor each that loads the
  model from ``model_dir`` (so the directory must be readable at that path on every node) and holds
  ``create_app`` over it: the same endpoints, limits, Host check and errors as ``duetgen serve``. A
  replica asks Ray for one GPU (``num_gpus=1``) when it runs on CUDA, so Ray places replicas one per
  GPU, across the cluster's machines. In front of them one ingress (``DuetGenIngress``, no CPU
  reserved) owns HTTP: it reads the body (capped), hands the request to a replica through Ray's
  router (a streaming handle call: the replica runs the app on it and streams its ASGI messages
  back) and plays the answer back. A client that leaves cancels the call; the replica's app then
  sees the disconnect and a stream cancels its generation.
- Admission at the ingress: each replica has 2 x ``max_batch`` slots (``max_ongoing_requests``:
  ``max_batch`` generating and as many waiting at the replica, or light requests such as
  /v1/images); the ingress (one, so one count for the cluster) admits requests while fewer than all
  replicas' slots + ``queue_size`` are in flight, and answers the next **429 with Retry-After: 5 in
  the route's own error shape** (OpenAI's on /v1, ``detail`` on /api; Ray's proxy would answer in
  plain text, which is why the ingress exists). Ray's router sends an admitted request to a replica
  with a free slot and holds it (its own queue unbounded) until one frees. Ray's
  ``max_queued_requests`` is not the limit: it counts a request as queued from its arrival until
  the router has probed the replicas, so a burst that fits answered 429 on an idle cluster (an
  audit: 4 requests at once on 2 replicas with ``--queue-size 1`` got one or two 429s in 6 of 6
  rounds; Ray's own router code describes the case). The replica's own queue is as large as its
  slots, so its 429 does not fire under Ray: a request is refused only when every replica is full.
  A request is counted once its body has arrived (read within the deadline; a stalled upload gets 408
  and holds nothing). A client that leaves frees its admission at once; its replica slot up to
  ``APP_EXIT_S`` later, so for that long one more request than ``queue_size`` may wait at the router.
- ``--timeout`` end to end at the ingress: waiting for a replica and generating together; the
  ingress allows 2 s more than ``--timeout`` so that a replica's own 503/504 (same shape as
  ``duetgen serve``) comes first when it started at once, and answers 504 in the route's shape when
  the request is still waiting or a JSON answer still generating (a started stream just ends). Ray's
  proxy times out 10 s later still, as a backstop. Ray's proxy lets a client set its own timeout
  (``x-request-timeout-seconds``: that request then gets Ray's plain 408 when it is shorter) and keep
  a request running after it disconnects (``x-request-disconnect-disabled: ?1``); the replica's
  ``--timeout`` still ends every generation, and a public deployment should strip both headers in the
  reverse proxy in front of Ray.
- Generated images are served by URL from every replica: the ``/v1/images/`` store is one Ray
  actor (``ImageStoreActor``, bounded as the in-process store) that every replica writes to and
  reads from, because the router sends a request for an image to any replica, not to the one that drew it.
- Each response carries ``X-DuetGen-Replica`` (the Ray Serve replica id): which replica answered.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
from dataclasses import replace

import ray
from ray import serve

from duetgen.serve.common import ServeLimits
from duetgen.serve.openai_api import ImageStore, error_body
from duetgen.serve.server import create_app

APP_NAME = "duetgen"
RETRY_AFTER_S = 5  # as the single server's 429
TIMEOUT_GRACE_S = 2.0  # the ingress's end-to-end timeout is --timeout + this, so a replica's own 503/504 comes first
PROXY_BACKSTOP_S = 10.0  # Ray's proxy times out later still (its 408 is plain text)
APP_EXIT_S = 5.0  # a cancelled request's app gets this long to see the disconnect before it is cancelled
INGRESS_SPARE = 32  # requests the ingress holds beyond the replicas' slots and the queue (page, images, the 429s)


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
    """One model and the ``duetgen serve`` app over it; the ingress hands it each HTTP request (``http``)."""

    def __init__(self, model_dir: str, device: str, limits: ServeLimits, allowed_hosts: list[str] | None, images,
                 threads: int = 1):
        import torch

        from duetgen.infer.pipeline import DuetGenPipeline

        torch.set_num_threads(threads)  # as many as the CPUs the replica reserved (Ray sets OMP_NUM_THREADS alike)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"replica asked for device {device!r} but sees no GPU "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        pipeline = DuetGenPipeline.from_pretrained(model_dir, device=device)
        app = create_app(pipeline, limits, allowed_hosts=allowed_hosts, image_store=RemoteImageStore(images))
        self.app = ReplicaHeader(app, serve.get_replica_context().replica_id.unique_id)

    async def http(self, scope: dict, body: bytes):
        """Run one request through the app; its ASGI messages as they are sent. Cancelled (the client left): the
        app sees ``http.disconnect`` (a stream cancels its generation) and is then cancelled."""
        messages: asyncio.Queue = asyncio.Queue()
        left = asyncio.Event()
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        task = asyncio.create_task(self.app(scope, receive, messages.put))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                yield message
            task.result()  # the app's own error, if it raised one
        finally:
            left.set()
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), APP_EXIT_S)  # let it notice and clean up
                except Exception:  # it did not stop in time (or failed on the way out)
                    task.cancel()


def refusal(path: str, status: int, message: str, code: str, retry_after: float | None = None) -> list[dict]:
    """The ASGI messages of an error answered by the ingress, in the shape of the route's own errors:
    OpenAI's ``{"error": {...}}`` under ``/v1``, ``{"detail": ...}`` elsewhere (as ``duetgen serve``)."""
    payload = error_body(status, message, None, code) if path.startswith("/v1") else {"detail": message}
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(0, math.ceil(retry_after))).encode()))
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": data}]


def forwarded_scope(scope: dict) -> dict:
    """The plain-data part of an HTTP scope (what crosses to the replica)."""
    keys = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
            "client", "server")
    out = {k: scope[k] for k in keys if k in scope}
    out["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    return out


class Forward:
    """The ingress's ASGI app: reads the body (capped), sends the request to a model replica through Ray's router and
    plays the replica's response back. Admission and the end-to-end timeout live here, answered in the route's
    error shape (Ray's proxy would answer both in plain text)."""

    def __init__(self, replicas, limits: ServeLimits, capacity: int | None = None):
        self.replicas, self.limits = replicas.options(stream=True), limits
        self.capacity = capacity  # requests admitted at once (every replica's slots + the queue); None: no limit here
        self.in_flight = 0  # one event loop: checked and counted with no await between

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":  # nothing to start: the model is in the replicas
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] != "http":
            return
        deadline = time.monotonic() + self.limits.request_timeout_s + TIMEOUT_GRACE_S
        root, path = scope.get("root_path", ""), scope["path"]
        path = path[len(root):] if root and path.startswith(root) else path  # the route's own path, e.g. /v1/...
        if self._full():  # a cheap refusal first, before a body is read for nothing
            return await self._busy(path, send)
        try:  # the body within the deadline: a client that stalls its upload holds no admission
            body = await asyncio.wait_for(capped_body(receive, self.limits.max_body_bytes),
                                          max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            for m in refusal(path, 408, f"the request body did not arrive within {self.limits.request_timeout_s:g} s",
                             "timeout"):
                await send(m)
            return
        if body is None:
            return  # the client left while sending
        if self._full():
            return await self._busy(path, send)
        self.in_flight += 1  # (no await since the check: one event loop)
        try:
            await self._forward(scope, body, send, path, deadline)
        finally:
            self.in_flight -= 1

    def _full(self) -> bool:
        return self.capacity is not None and self.in_flight >= self.capacity

    async def _busy(self, path: str, send) -> None:
        for m in refusal(path, 429, f"the server is busy: every replica is full and {self.limits.queue_size} "
                         "request(s) wait; retry later", "server_busy", RETRY_AFTER_S):
            await send(m)

    async def _forward(self, scope, body: bytes, send, path: str, deadline: float):
        response = self.replicas.http.remote(forwarded_scope(scope), body)
        started = False
        try:
            while True:
                try:
                    message = await asyncio.wait_for(response.__anext__(), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    response.cancel()
                    if not started:
                        for m in refusal(path, 504, f"timed out after {self.limits.request_timeout_s:g} s "
                                         "(waiting for a replica and generating)", "timeout"):
                            await send(m)
                    return  # a started stream just ends (the replica's own --timeout normally comes first)
                started = started or message["type"] == "http.response.start"
                await send(message)
        except BaseException:  # the client left (cancelled) or sending failed: the replica stops the answer
            response.cancel()
            raise


async def capped_body(receive, max_bytes: int) -> bytes | None:
    """The request body, read no further than ``max_bytes + 1`` bytes (the replica's cap answers 413 from those);
    None if the client disconnected."""
    chunks, seen, more = [], 0, True
    while more and seen <= max_bytes:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        seen += len(chunks[-1])
        more = message.get("more_body", False)
    return b"".join(chunks)[:max_bytes + 1]


class DuetGenIngress:
    """The HTTP entry of the app (one replica, no CPU reserved): ``Forward`` over the model replicas' handle."""

    def __init__(self, replicas, limits: ServeLimits, capacity: int | None = None):
        self.forward = Forward(replicas, limits, capacity)

    def __serve_build_asgi_app__(self):
        return self.forward


def replica_limits(limits: ServeLimits) -> ServeLimits:
    """The limits a replica runs with: its own queue as large as its Ray slots, so only the ingress answers 429."""
    return replace(limits, queue_size=limits.max_batch)


def deploy(model_dir: str, replicas: int = 1, *, device: str = "cpu", limits: ServeLimits | None = None,
           allowed_hosts: list[str] | None = None, num_cpus: float = 1, name: str = APP_NAME,
           route_prefix: str = "/"):
    """Run the app with ``replicas`` model replicas on the connected Ray cluster (``serve.run``); its handle.

    ``limits.queue_size``: requests waiting at the ingress for a free replica; the next get 429.
    ``device``: "cpu", or "cuda" (each replica takes one GPU, ``num_gpus=1``).
    ``num_cpus``: CPUs each replica reserves, and its torch threads (at least 1).
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1; got {replicas}")
    limits = limits or ServeLimits()
    num_gpus = 1 if device.startswith("cuda") else 0
    images = ImageStoreActor.options(name=f"{name}-images", get_if_exists=True).remote(
        limits.image_store_bytes, limits.image_ttl_s)
    slots = 2 * limits.max_batch  # per replica: max_batch generating, as many waiting at it or light (/v1/images)
    capacity = replicas * slots + limits.queue_size  # admitted at once, one count for the cluster
    model = serve.deployment(
        DuetGenReplica,
        name=f"{name}-model",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=slots,
        max_queued_requests=-1,  # unbounded: the ingress admits at most every slot + the queue (its docstring)
    ).bind(str(model_dir), "cuda" if num_gpus else device, replica_limits(limits), allowed_hosts, images,
           max(1, int(num_cpus)))
    ingress = serve.deployment(
        serve.ingress()(DuetGenIngress),
        name=name,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=capacity + INGRESS_SPARE,  # never queued at Ray's proxy
    ).bind(model, limits, capacity)
    return serve.run(ingress, name=name, route_prefix=route_prefix)


def remove(name: str = APP_NAME) -> None:
    """Delete the app and its image store from the cluster."""
    serve.delete(name)
    try:
        ray.kill(ray.get_actor(f"{name}-images"))
    except ValueError:  # already gone
        pass


def http_options(host: str, port: int, limits: ServeLimits) -> dict:
    """Ray Serve's proxy settings (``serve.start(http_options=...)``): where it listens, and a backstop timeout after
    the ingress's own (``--timeout`` end to end, answered in the route's error shape)."""
    return {"host": host, "port": port,
            "request_timeout_s": limits.request_timeout_s + TIMEOUT_GRACE_S + PROXY_BACKSTOP_S}


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
