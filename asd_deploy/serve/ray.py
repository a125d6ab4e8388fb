"""The same server as a Ray Serve deployment: N replicas, each its own pipeline and slot engine.

Owns: `deployment(...)` (the Ray Serve application: the FastAPI app of `app.py`, built on each
replica at start-up), `build_app` (the builder for `serve run asd_deploy.serve.ray:build_app
key=value ...`) and `run_ray` (`python -m asd_deploy serve --ray --replicas N`). A thin shell:
nothing here generates, routes or validates.

Streams and replicas: a WebSocket is one ASGI connection, which Ray Serve's proxy keeps on the
replica that accepted it for its whole life, so a stream's cache never moves. Each replica refuses
streams beyond its own --max-streams (WebSocket close 1013, HTTP 503); Ray's router sends a new
connection to the less loaded of two sampled replicas, so N replicas hold N x max-streams
streams. `max_ongoing_requests` is set above max-streams so that Ray never queues a stream the
replica would refuse. GPU machines: one replica per GPU (`gpus_per_replica=1`).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import time

DEFAULTS = dict(model="default", checkpoint=None, config=None, backend="eager", engine=None, device="cpu", vae=None,
                text_encoder=None, decoder="vae", tiny_decoder=None)


def deployment(pipeline_args: dict, *, replicas: int = 1, max_streams: int = 4, max_chunks: int = 64,
               buffer_chunks: int = 2, stall_timeout_s: float = 10.0, cpus_per_replica: float = 1.0,
               gpus_per_replica: float = 0.0):
    """A bound Ray Serve application serving `app.create_app` on `replicas` replicas."""
    from ray import serve

    @serve.deployment(name="asd_deploy", num_replicas=replicas, max_ongoing_requests=max_streams + 16,
                      ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica})
    @serve.ingress()
    class AsdServer:
        def __init__(self, args: dict, options: dict):
            from ..cli import _pipeline
            from .app import create_app
            from .protocol import Limits
            from .slots import SlotEngine

            ns = argparse.Namespace(**{**DEFAULTS, **args})
            if ns.config and not ns.checkpoint:
                ns.checkpoint = "random"
            pipe = _pipeline(ns, batch=options["max_streams"])
            self.engine = SlotEngine(pipe, options["max_streams"], buffer_chunks=options["buffer_chunks"],
                                     stall_timeout_s=options["stall_timeout_s"])
            self._asgi = create_app(self.engine, Limits.for_config(pipe.config, options["max_chunks"]),
                                    replica=f"{socket.gethostname()}:{os.getpid()}")

        def __serve_build_asgi_app__(self):
            return self._asgi

        def check_health(self):  # Ray restarts a replica whose engine has failed
            if not self.engine.healthy:
                raise RuntimeError(f"slot engine stopped: {self.engine.error}")

    options = dict(max_streams=max_streams, max_chunks=max_chunks, buffer_chunks=buffer_chunks,
                   stall_timeout_s=stall_timeout_s)
    args = {k: v for k, v in pipeline_args.items() if k in DEFAULTS}
    return AsdServer.bind(args, options)


def build_app(args: dict):
    """`serve run asd_deploy.serve.ray:build_app replicas=2 max_streams=4 [model=...] [backend=...]`
    (values arrive as strings)."""
    num = {"replicas": int, "max_streams": int, "max_chunks": int, "buffer_chunks": int, "stall_timeout_s": float,
           "cpus_per_replica": float, "gpus_per_replica": float}
    unknown = sorted(set(args) - set(num) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; known: {sorted(set(num) | set(DEFAULTS))}")
    return deployment({k: v for k, v in args.items() if k in DEFAULTS},
                      **{k: num[k](v) for k, v in args.items() if k in num})


def run_ray(args: dict, *, host: str, port: int, replicas: int, address: str | None = None,
            cpus_per_replica: float = 1.0, **options) -> int:
    """Start (or join, with `address`) a Ray cluster, serve the app on host:port until interrupted."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ImportError("--ray needs the ray extra: pip install -e '.[ray]'") from None
    gpus = 1.0 if str(args.get("device", "cpu")).startswith("cuda") else 0.0

    def interrupt(*_):
        raise KeyboardInterrupt
    ray.init(address=address, include_dashboard=False, log_to_driver=True)
    signal.signal(signal.SIGTERM, interrupt)  # a terminated driver still shuts its local cluster down
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(args, replicas=replicas, cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus,
                             **options), name="asd_deploy", route_prefix="/")
        print(f"serving on http://{host}:{port} with {replicas} Ray Serve replica(s); Ctrl-C stops", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
