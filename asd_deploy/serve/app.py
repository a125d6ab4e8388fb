"""The HTTP/WebSocket routes (FastAPI). Routes only: streams come from `SlotEngine`, requests are
checked by `protocol.py`, frames are packed by `media.py`.

  GET  /             the live page (page/index.html)
  GET  /v1/info      model geometry, fps, limits, slots
  GET  /healthz      200 while the engine runs (503 once it has failed)
  GET  /metrics      Prometheus text: streams active, chunks served, chunk latency histogram, ...
  GET  /v1/video     ?prompt=&steps=&ffe=&seed=&frames=&quality= -> fragmented MP4, chunked
  POST /v1/video     the same from a JSON body (which may carry "init", base64)
  WS   /v1/stream    JSON start, then per chunk a JSON header + one JPEG (or PNG) per frame;
                     {"prompt": ...} switches, {"type": "stop"} stops (protocol in README "Serving")
A full house is refused at once (HTTP 503, WebSocket close 1013), never queued.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import anyio
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .media import FragmentedMP4, image_bytes
from .protocol import (QUALITIES, Limits, ProtocolError, StreamRequest, parse_json, parse_message, parse_query,
                       parse_start)
from .slots import Busy, SlotEngine

PAGE = Path(__file__).parent / "page" / "index.html"
START_TIMEOUT_S = 30.0
CLOSE_TRY_AGAIN = 1013   # WebSocket close: "try again later" (all slots busy)
CLOSE_POLICY = 1008      # WebSocket close: a message broke the protocol


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps in one process stay apart)."""

    def __init__(self, engine: SlotEngine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        Gauge("asd_streams_active", "streams holding a slot", registry=r).set_function(lambda: engine.active)
        Gauge("asd_stream_slots", "slots (--max-streams)", registry=r).set(engine.max_streams)
        Gauge("asd_engine_ticks", "batched step calls so far", registry=r).set_function(lambda: engine.ticks)
        self.streams = Counter("asd_streams", "streams ended, by route and outcome", ["route", "outcome"], registry=r)
        self.chunks = Counter("asd_chunks_served", "chunks sent to clients", registry=r)
        self.frames = Counter("asd_frames_served", "frames sent to clients", registry=r)
        self.switches = Counter("asd_prompt_switches", "prompt switches requested", registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.latency = Histogram("asd_chunk_latency_seconds", "a chunk's first tick to its decoded frames",
                                 buckets=buckets, registry=r)
        self.ttff = Histogram("asd_time_to_first_frame_seconds", "stream opened to its first frames",
                              buckets=buckets, registry=r)

    def chunk(self, c):
        self.chunks.inc()
        self.frames.inc(0 if c.frames is None else len(c.frames))
        self.latency.observe(c.latency_s)
        if c.index == 0:
            self.ttff.observe(c.ready_s)

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


def _outcome(reason: str | None) -> str:
    return (reason or "closed").split(":")[0].split(" ")[0]


def create_app(engine: SlotEngine, limits: Limits | None = None, replica: str | None = None) -> FastAPI:
    """The app over `engine`; `replica` names this process in answers (Ray Serve runs several)."""
    pipe, cfg = engine.pipe, engine.config
    limits = limits or Limits.for_config(cfg)
    metrics = Metrics(engine)
    app = FastAPI(title="asd-deploy", description="One-step causal video generation, streamed.")
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits

    def info() -> dict:
        return {"model": pipe.info, "config": cfg.name, "width": cfg.width, "height": cfg.height, "fps": pipe.fps,
                "frames_per_chunk": cfg.pixel_frames_for(cfg.frames_per_chunk),
                "default_frames": cfg.pixel_frames_for(cfg.cache_chunks * cfg.frames_per_chunk),
                "max_frames": limits.max_frames, "max_prompt_chars": limits.max_prompt_chars,
                "steps": [1, 2, 3, 4], "max_streams": engine.max_streams, "streams_active": engine.active,
                "replica": replica}

    async def open_stream(req: StreamRequest, decode: bool = True):
        init = None
        if req.init is not None:
            from ..continuation import decode_init_bytes, init_latents
            init = await anyio.to_thread.run_sync(
                lambda: init_latents(pipe.vae, decode_init_bytes(req.init), cfg))
        return await anyio.to_thread.run_sync(lambda: engine.open(
            req.prompt, steps=req.steps, ffe=req.ffe, seed=req.seed, frames=req.frames, init=init,
            switch_mode=req.switch_mode, decode=decode))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/v1/info")
    async def get_info():
        return info()

    @app.get("/healthz")
    async def healthz():
        body = {"status": "ok" if engine.healthy else "failed", "streams_active": engine.active,
                "max_streams": engine.max_streams, **({"replica": replica} if replica else {})}
        if not engine.healthy:
            body["error"] = f"{type(engine.error).__name__}: {engine.error}" if engine.error else "engine stopped"
        return JSONResponse(body, status_code=200 if engine.healthy else 503)

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def refuse(status: int, msg: str, route: str, outcome: str):
        metrics.streams.labels(route, outcome).inc()
        return JSONResponse({"error": msg}, status_code=status)

    async def video(req: StreamRequest, route: str):
        try:
            stream = await open_stream(req)
        except Busy as e:
            return refuse(503, str(e), route, "refused")
        except ValueError as e:  # a bad init upload
            return refuse(400, str(e), route, "bad_request")

        async def body():
            mux = FragmentedMP4(cfg.width, cfg.height, pipe.fps, req.quality)
            try:
                while (c := await anyio.to_thread.run_sync(stream.next_chunk)) is not None:
                    data = mux.add(c.frames)
                    metrics.chunk(c)
                    if data:
                        yield data
                yield mux.close()
            finally:
                stream.close("closed by client" if stream.end_reason is None else stream.end_reason)
                metrics.streams.labels(route, _outcome(stream.end_reason)).inc()
        return StreamingResponse(body(), media_type="video/mp4",
                                 headers={"Cache-Control": "no-store", "X-Stream-Slot": str(stream.row)})

    @app.get("/v1/video")
    async def get_video(request: Request):
        try:
            req = parse_query(request.query_params, cfg, limits)
        except ProtocolError as e:
            return refuse(400, str(e), "video", "bad_request")
        return await video(req, "video")

    @app.post("/v1/video")
    async def post_video(request: Request):
        try:
            body = parse_json((await request.body()).decode("utf-8", "replace"), limit=2 * limits.max_init_bytes)
            quality = body.pop("quality", "default")
            if quality not in QUALITIES:
                raise ProtocolError(f"'quality' must be one of {list(QUALITIES)}; got {quality!r}")
            req = parse_start(body, cfg, limits)
        except ProtocolError as e:
            return refuse(400, str(e), "video", "bad_request")
        return await video(StreamRequest(**{**req.__dict__, "quality": quality}), "video")

    @app.websocket("/v1/stream")
    async def ws_stream(ws: WebSocket):
        await ws.accept()
        send_lock = asyncio.Lock()

        async def send_json(obj):
            async with send_lock:
                await ws.send_text(json.dumps(obj))

        async def fail(code: int, msg: str, outcome: str):
            metrics.streams.labels("stream", outcome).inc()
            try:
                await send_json({"type": "error", "error": msg})
                await ws.close(code=code, reason=msg[:120])
            except (WebSocketDisconnect, RuntimeError):
                pass

        try:
            raw = await asyncio.wait_for(ws.receive_text(), START_TIMEOUT_S)
            req = parse_start(parse_json(raw, limit=2 * limits.max_init_bytes), cfg, limits)
        except asyncio.TimeoutError:
            return await fail(CLOSE_POLICY, f"no start message within {START_TIMEOUT_S:g} s", "bad_request")
        except WebSocketDisconnect:
            return
        except (ProtocolError, KeyError) as e:  # KeyError: a binary frame where text was expected
            return await fail(CLOSE_POLICY, str(e) if isinstance(e, ProtocolError) else "send JSON text",
                              "bad_request")
        try:
            stream = await open_stream(req)
        except Busy as e:
            return await fail(CLOSE_TRY_AGAIN, str(e), "refused")
        except ValueError as e:
            return await fail(CLOSE_POLICY, str(e), "bad_request")
        t0 = time.perf_counter()
        try:
            await send_json({"type": "started", "slot": stream.row, "chunks": stream.num_chunks, "replica": replica,
                             "width": cfg.width, "height": cfg.height, "fps": pipe.fps, "prompt": req.prompt,
                             "steps": req.steps, "ffe": req.ffe, "seed": req.seed})

            async def sender():
                sent = 0
                while (c := await anyio.to_thread.run_sync(stream.next_chunk)) is not None:
                    if req.realtime:  # keep one chunk ahead of the viewer's clock, not more
                        ahead = t0 + sent / pipe.fps - time.perf_counter() - len(c.frames) / pipe.fps
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                    async with send_lock:
                        await ws.send_text(json.dumps({
                            "type": "chunk", "index": c.index, "frames": len(c.frames), "prompt": c.prompt,
                            "switched": c.switched, "gen_s": round(c.gen_s, 6), "wait_s": round(c.wait_s, 6),
                            "decode_s": round(c.decode_s, 6), "latency_s": round(c.latency_s, 6),
                            "ready_s": round(c.ready_s, 6)}))
                        for f in c.frames:
                            await ws.send_bytes(image_bytes(f, req.format))
                    metrics.chunk(c)
                    sent += len(c.frames)
                return stream.end_reason

            async def receiver():
                while True:
                    raw = await ws.receive()
                    if raw["type"] == "websocket.disconnect":
                        return "closed by client"
                    try:
                        msg = parse_message(raw.get("text") if raw.get("text") is not None else raw.get("bytes"),
                                            limits)
                    except ProtocolError as e:  # the stream goes on; the client learns what was wrong
                        await send_json({"type": "error", "error": str(e)})
                        continue
                    if msg.kind == "stop":
                        return "stopped by client"
                    await anyio.to_thread.run_sync(lambda: stream.switch_prompt(msg.prompt, msg.mode))
                    metrics.switches.inc()
                    await send_json({"type": "prompt", "prompt": msg.prompt, "mode": msg.mode or req.switch_mode})

            async def watchdog():  # a dropped slot ends the connection even while a send is blocked
                while stream.end_reason is None or stream.end_reason == "complete":
                    await asyncio.sleep(0.25)
                return stream.end_reason

            tasks = [asyncio.create_task(x()) for x in (sender, receiver, watchdog)]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            first = done.pop()
            error = first.exception()
            reason = (first.result() if error is None else "closed by client"
                      if isinstance(error, (WebSocketDisconnect, OSError)) else f"server error: {error}")
            stream.close(reason)
            reason = stream.end_reason
            metrics.streams.labels("stream", _outcome(reason)).inc()
            if reason != "closed by client":
                with anyio.move_on_after(2):
                    await send_json({"type": "end", "reason": reason})
                    await ws.close(code=1000 if reason in ("complete", "stopped by client") else 1011,
                                   reason=reason[:120])
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            stream.close()

    return app


def serve(pipe, *, host: str = "127.0.0.1", port: int = 8000, max_streams: int = 4, max_chunks: int = 64,
          buffer_chunks: int = 2, stall_timeout_s: float = 10.0, log_level: str = "info"):
    """Run the server in this process until interrupted (`python -m asd_deploy serve`)."""
    import uvicorn

    engine = SlotEngine(pipe, max_streams, buffer_chunks=buffer_chunks, stall_timeout_s=stall_timeout_s)
    app = create_app(engine, Limits.for_config(pipe.config, max_chunks))
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, ws_max_size=4 * app.state.limits.max_init_bytes)
    finally:
        engine.close()
