"""Serving: the streaming HTTP/WebSocket server, its page, batched stream slots and Ray Serve.

  slots.py     `SlotEngine`: many streams share one step call (batched KV slots, tick loop,
               prompt switching); a client of `Pipeline`
  protocol.py  what a request may hold (validation and limits), shared by the routes and Ray
  media.py     frames -> fragmented MP4 (PyAV) and JPEG for the wire
  app.py       FastAPI routes only: /, /v1/video, /v1/stream, /v1/info, /healthz, /metrics
  page/        the single page (static HTML/JS)
  ray.py       the same app as a Ray Serve deployment (a thin shell)
Needs the `serve` extra (`pip install -e '.[serve]'`); Ray needs the `ray` extra.
"""
