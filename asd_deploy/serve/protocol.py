"""What a request may hold: the stream parameters, the WebSocket messages, and their limits.

Owns: `Limits`, `StreamRequest` and the parsers (`parse_query` for GET /v1/video, `parse_start`
for a JSON start message or POST body, `parse_message` for every WebSocket text message). Each
refuses with a `ProtocolError` whose text names the field, what was expected and what came, so
a client sees exactly what to fix. Pure: no I/O, no model (the routes in `app.py` and the Ray
shell share it). Does not own the streaming itself (`slots.py`).

WebSocket messages (client -> server; JSON text):
  {"type": "start", "prompt": str, "steps": 1-4, "ffe": bool, "seed": int, "frames": int,
   "init": base64 image/video, "switch_mode": "recache"|"cut", "realtime": bool, "format": "jpeg"|"png"}
      first message ("type" may be left out); all but "prompt" optional
  {"type": "prompt", "prompt": str, "mode": "recache"|"cut"}   switch (also just {"prompt": ...})
  {"type": "stop"}                                              end the stream now
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from ..config import ModelConfig
from ..continuation import MAX_INIT_BYTES
from ..schedule import MAX_STEPS
from .slots import SWITCH_MODES

START_FIELDS = ("type", "prompt", "steps", "ffe", "seed", "frames", "init", "switch_mode", "realtime", "format")
QUERY_FIELDS = ("prompt", "steps", "ffe", "seed", "frames", "quality")
PROMPT_FIELDS = ("type", "prompt", "mode")
QUALITIES = ("default", "lossless")
FRAME_FORMATS = ("jpeg", "png")
MAX_MESSAGE_BYTES = 64 * 1024  # any WebSocket text message but a start carrying an init


class ProtocolError(ValueError):
    """A request the server refuses, with the reason a client can act on."""


@dataclass(frozen=True)
class Limits:
    max_frames: int            # pixel frames per stream
    max_prompt_chars: int = 500
    max_init_bytes: int = MAX_INIT_BYTES

    @classmethod
    def for_config(cls, config: ModelConfig, max_chunks: int = 64, **kw) -> "Limits":
        return cls(max_frames=config.pixel_frames_for(max_chunks * config.frames_per_chunk), **kw)


@dataclass(frozen=True)
class StreamRequest:
    prompt: str
    steps: int = 1
    ffe: bool = True
    seed: int = 0
    frames: int | None = None      # None: the server's default length
    init: bytes | None = None      # an uploaded image or video
    switch_mode: str = "recache"
    realtime: bool = False         # pace chunks at the video's frame rate (the page's live view)
    quality: str = "default"       # /v1/video: "lossless" = RGB H.264 at qp 0 (bit-exact; few players)
    format: str = "jpeg"           # /v1/stream frames: jpeg, or png (lossless)


def _prompt(value, limits: Limits, field: str = "prompt") -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{field!r} must be a string; got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ProtocolError(f"{field!r} must be a non-empty string")
    if len(text) > limits.max_prompt_chars:
        raise ProtocolError(f"{field!r} has {len(text)} characters; at most {limits.max_prompt_chars}")
    return text


def _int(value, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{field!r} must be an integer in {lo}..{hi}; got {value!r}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{field!r} must be in {lo}..{hi}; got {value}")
    return value


def _bool(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{field!r} must be true or false; got {value!r}")
    return value


def _choice(value, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ProtocolError(f"{field!r} must be one of {list(choices)}; got {value!r}")
    return value


def _frames(value, config: ModelConfig, limits: Limits) -> int | None:
    if value is None:
        return None
    frames = _int(value, "frames", 1, limits.max_frames)
    try:
        config.latent_frames_for(frames)
    except ValueError as e:
        raise ProtocolError(f"'frames': {e}") from None
    return frames


def _unknown(d: dict, known: tuple[str, ...], what: str):
    extra = sorted(set(d) - set(known))
    if extra:
        raise ProtocolError(f"unknown field(s) {extra} in {what}; known: {list(known)}")


def parse_start(msg: dict, config: ModelConfig, limits: Limits) -> StreamRequest:
    """A start message or POST body (a JSON object) -> StreamRequest."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"a start message must be a JSON object; got {type(msg).__name__}")
    _unknown(msg, START_FIELDS, "the start message")
    if msg.get("type", "start") != "start":
        raise ProtocolError(f"the first message must start a stream (\"type\": \"start\"); got type "
                            f"{msg.get('type')!r}")
    if "prompt" not in msg:
        raise ProtocolError("the start message needs a 'prompt'")
    init = None
    if msg.get("init") is not None:
        if not isinstance(msg["init"], str):
            raise ProtocolError("'init' must be a base64 string of an image or video file")
        text = msg["init"].split(",", 1)[1] if msg["init"].startswith("data:") else msg["init"]  # data URLs too
        if len(text) * 3 // 4 > limits.max_init_bytes:
            raise ProtocolError(f"'init' is over the {limits.max_init_bytes} byte limit")
        try:
            init = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("'init' is not valid base64") from None
    return StreamRequest(
        prompt=_prompt(msg["prompt"], limits),
        steps=_int(msg.get("steps", 1), "steps", 1, MAX_STEPS),
        ffe=_bool(msg.get("ffe", True), "ffe"),
        seed=_int(msg.get("seed", 0), "seed", 0, 2 ** 63 - 1),
        frames=_frames(msg.get("frames"), config, limits),
        init=init,
        switch_mode=_choice(msg.get("switch_mode", "recache"), "switch_mode", SWITCH_MODES),
        realtime=_bool(msg.get("realtime", False), "realtime"),
        format=_choice(msg.get("format", "jpeg"), "format", FRAME_FORMATS))


def _query_int(params, field: str, default: int) -> int:
    if field not in params:
        return default
    try:
        return int(params[field])
    except ValueError:
        raise ProtocolError(f"{field!r} must be an integer; got {params[field]!r}") from None


def parse_query(params, config: ModelConfig, limits: Limits) -> StreamRequest:
    """GET /v1/video query parameters (a mapping of strings) -> StreamRequest."""
    _unknown(dict(params), QUERY_FIELDS, "the query")
    if "prompt" not in params:
        raise ProtocolError("the query needs a 'prompt' (e.g. /v1/video?prompt=a+red+circle)")
    ffe = params.get("ffe", "1").lower()
    if ffe not in ("1", "0", "true", "false"):
        raise ProtocolError(f"'ffe' must be 1, 0, true or false; got {params['ffe']!r}")
    frames = _query_int(params, "frames", 0) if "frames" in params else None
    return StreamRequest(
        prompt=_prompt(params["prompt"], limits),
        steps=_int(_query_int(params, "steps", 1), "steps", 1, MAX_STEPS),
        ffe=ffe in ("1", "true"),
        seed=_int(_query_int(params, "seed", 0), "seed", 0, 2 ** 63 - 1),
        frames=_frames(frames, config, limits),
        quality=_choice(params.get("quality", "default"), "quality", QUALITIES))


@dataclass(frozen=True)
class Message:
    kind: str                  # "prompt" | "stop"
    prompt: str | None = None
    mode: str | None = None


def parse_json(raw: str | bytes, limit: int = MAX_MESSAGE_BYTES) -> dict:
    if isinstance(raw, bytes):
        raise ProtocolError("binary messages are not accepted; send JSON text")
    if len(raw) > limit:
        raise ProtocolError(f"message of {len(raw)} bytes is over the {limit} byte limit")
    try:
        msg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"malformed JSON: {e.msg} at character {e.pos}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"a message must be a JSON object; got {type(msg).__name__}")
    return msg


def parse_message(raw: str | bytes, limits: Limits) -> Message:
    """A message after the start: a prompt switch or a stop."""
    msg = parse_json(raw)
    kind = msg.get("type", "prompt" if "prompt" in msg else None)
    if kind == "stop":
        _unknown(msg, ("type",), "a stop message")
        return Message("stop")
    if kind == "prompt":
        _unknown(msg, PROMPT_FIELDS, "a prompt message")
        if "prompt" not in msg:
            raise ProtocolError("a prompt message needs a 'prompt'")
        mode = msg.get("mode")
        return Message("prompt", _prompt(msg["prompt"], limits),
                       None if mode is None else _choice(mode, "mode", SWITCH_MODES))
    if kind == "start":
        raise ProtocolError("this stream has already started; send {\"type\": \"prompt\", ...} or "
                            "{\"type\": \"stop\"}")
    raise ProtocolError(f"unknown message type {kind!r}; expected 'prompt' or 'stop'")
