"""Frames on the wire: fragmented MP4 for HTTP streaming and JPEG for the WebSocket.

Owns: `FragmentedMP4` (H.264 in fragmented MP4 through PyAV, bytes handed back as they are
muxed) and `image_bytes` (one frame as JPEG or PNG). Does not own decoding latents or the file writer of `generate` (`video.py`).

The MP4 is "empty moov" + one fragment (moof + mdat) per frame, so a player can start with the
first bytes and the file needs no seeking to finish. The muxer closes a fragment when the next
frame arrives, so each `add` returns every frame of the chunk but its last, which leaves with the
next chunk's first (or at `close`). The encoder runs without lookahead or B-frames (x264
`zerolatency`), so nothing else is held back. quality "lossless" is RGB H.264 at qp 0
(libx264rgb): bit-exact frames for tests, but most browsers cannot play it.
"""
from __future__ import annotations

import fractions
import io

import numpy as np

MOVFLAGS = "frag_every_frame+empty_moov+default_base_moof"


class _Sink(io.RawIOBase):
    def __init__(self):
        self.buf = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.buf += bytes(b)
        return len(b)

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class FragmentedMP4:
    """add(frames uint8 [T, H, W, 3]) -> bytes ready to send; close() -> the rest."""

    def __init__(self, width: int, height: int, fps: int, quality: str = "default"):
        import av

        self._sink = _Sink()
        self._out = av.open(self._sink, "w", format="mp4", options={"movflags": MOVFLAGS})
        if quality == "lossless":
            self._stream = self._out.add_stream("libx264rgb", rate=fps,
                                                options={"tune": "zerolatency", "preset": "ultrafast", "qp": "0"})
            self._stream.pix_fmt = "rgb24"
        else:
            self._stream = self._out.add_stream("libx264", rate=fps,
                                                options={"tune": "zerolatency", "preset": "veryfast", "crf": "18"})
            self._stream.pix_fmt = "yuv420p"
        self._stream.width, self._stream.height = width, height
        self._tb = fractions.Fraction(1, fps)
        self._n = 0
        self._closed = False

    def add(self, frames: np.ndarray) -> bytes:
        import av

        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts, frame.time_base = self._n, self._tb
            self._n += 1
            self._out.mux(self._stream.encode(frame))
        return self._sink.take()

    def close(self) -> bytes:
        if not self._closed:
            self._closed = True
            self._out.mux(self._stream.encode(None))
            self._out.close()
        return self._sink.take()


def image_bytes(frame: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """uint8 [H, W, 3] -> JPEG (lossy) or PNG (lossless) bytes."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
