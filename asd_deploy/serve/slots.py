"""Many streams, one step call: a batched KV cache of slots, the tick loop, prompt switching.

Owns: `SlotEngine` (up to `max_streams` streams share one chunk step: each holds a row of a
batched static cache, and every tick runs the step once for all rows) and `SlotStream` (one
stream's handle: iterate for decoded chunks, switch its prompt, close it). Does not own HTTP or
WebSockets (`app.py`), the model or backends (reached through the `Pipeline`), or media encoding.

How a tick works. Each active slot runs a program (`_Slot._program`) that mirrors
`generator.generate` exactly: it draws its noise from its own seeded generator in the same order
(`generator.draw_noise`, chunk by chunk),
and instead of calling the step it yields one operation at a time (a denoising step, or a clean
pass that writes the chunk's keys/values). The loop gathers the pending operation of every
runnable slot into the batch rows [B, ...] (idle rows: zeros at position 0, no cache), calls the
step once with per-row positions frame_index/cache_len [B], and hands each row its output. Rows
never mix inside the step (every op is per sample), so a stream's latents are the same-seed solo
run's up to float rounding, whatever the other rows hold. Shapes never change: the batch is
`max_streams`, which is also the static batch an engine must be built with.

Backpressure. Each slot buffers at most `buffer_chunks` finished chunks that its consumer has not
taken; a slot with a full buffer sits out the ticks (its row idles) instead of growing memory,
and if its consumer takes nothing for `stall_timeout_s` the slot is dropped and freed (a slow or
vanished client), leaving the others untouched. `SlotStream.close()` frees the slot at once.

Prompt switching (at the next chunk boundary; static shapes throughout):
  recache  the slot keeps the clean latents of the chunks its cache window holds; on a switch the
           window is re-encoded under the new prompt's cross-attention: the keys/values are
           rewritten chunk by chunk, in video order at their own frame positions, each attending
           to the re-encoded chunks before it (one clean pass per window chunk, batched with the
           other slots' work). Then the next chunk is denoised under the new prompt.
  cut      the cache is emptied and the video restarts at frame position 0 under the new prompt
           (First-Frame Enhancement applies again); the noise generator continues.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..cache import chunk_slot
from ..generator import draw_noise
from ..schedule import Schedule, flow_to_x0, renoise

SWITCH_MODES = ("recache", "cut")


class Busy(RuntimeError):
    """Every slot is taken: the request is refused (HTTP 503 / WebSocket close), never queued."""


@dataclass
class ChunkOut:
    """One finished chunk of a stream, as its consumer receives it."""
    index: int                 # chunk number in the stream (0, 1, ...)
    latents: torch.Tensor      # clean latents [1, C, Fc, h, w], float32, CPU
    frames: np.ndarray | None  # uint8 [T, H, W, 3] (None when the stream does not decode)
    prompt: str                # the prompt this chunk was generated under
    switched: bool             # first chunk under a new prompt
    gen_s: float               # from the chunk's first tick to its latents (its batched steps)
    wait_s: float              # then held in the slot's buffer until the consumer took it
    decode_s: float            # VAE decode
    latency_s: float           # gen_s + decode_s: the chunk's own production time (held back excluded)
    ready_s: float             # since the stream was opened (time to first frame for chunk 0)


@dataclass
class _Op:
    """One row of a tick: x [1, C, Fc, h, w] float32 at timestep t, attending to the slot's first
    `cache_chunks` cached chunks, RoPE at `frame` (latent frames); `write` is the cache chunk slot
    the output keys/values go to (clean passes) or None (denoising steps)."""
    x: torch.Tensor
    t: float
    frame: int
    cache_chunks: int
    write: int | None


class _Slot:
    """One stream's state inside the engine; its program runs on the engine's thread only."""

    def __init__(self, engine: "SlotEngine", row: int, prompt: str, context: torch.Tensor, schedule: Schedule,
                 seed: int, num_chunks: int, init: torch.Tensor | None, switch_mode: str):
        self.engine, self.row = engine, row
        self.prompt, self.schedule, self.num_chunks, self.switch_mode = prompt, schedule, num_chunks, switch_mode
        self.gen = torch.Generator(device=engine.device).manual_seed(int(seed))
        self.context, self.init = context, init
        self.opened = time.perf_counter()
        self.out: collections.deque[tuple] = collections.deque()  # finished, not yet taken by the consumer
        self.last_take = self.opened
        self.pending_switch: tuple[str, torch.Tensor, str] | None = None
        self.switched = False
        self.end_reason: str | None = None   # set when the stream ends (complete, closed, dropped, failed)
        self.written = 0      # chunks written to the cache (the ring counter of cache.chunk_slot)
        self.next_chunk = 0   # absolute chunk index (RoPE position / frames_per_chunk) of the next chunk
        self.window: dict[int, tuple[int, torch.Tensor]] = {}  # cache chunk slot -> (absolute chunk, latents)
        self.chunk_started: float | None = None
        self.op: _Op | None = None
        self._program_it = self._program()

    # ---- the program: generator.generate, one operation at a time --------------------------------
    def _program(self) -> Iterator[_Op]:
        eng, cfg = self.engine, self.engine.config
        eng._set_cross(self.row, self.context)
        if self.init is not None:  # continuation: the user's clean latents, as generator.prefill_cache
            for c in range(self.init.shape[2] // cfg.frames_per_chunk):
                yield from self._write(self.init[:, :, c * cfg.frames_per_chunk:(c + 1) * cfg.frames_per_chunk])
        sched_chunk = 0
        for n in range(self.num_chunks):
            sigmas = self.schedule.sigmas_for_chunk(sched_chunk)
            noise = draw_noise(self.gen, cfg.chunk_shape(1), sigmas, eng.device)  # the solo loop's draws
            x, eps = noise[0], iter(noise[1:])
            for i, sigma in enumerate(sigmas[:-1]):
                flow = yield _Op(x, cfg.num_train_timesteps * sigma, self.next_chunk * cfg.frames_per_chunk,
                                 self._visible(), None)
                x0 = flow_to_x0(x, flow.float(), sigma)
                if sigmas[i + 1] > 0:
                    x = renoise(x0, next(eps), sigmas[i + 1])
            self._emit(n, x0)
            sched_chunk += 1
            if n + 1 == self.num_chunks:
                break
            switch = eng._take_switch(self)
            if switch is None:
                yield from self._write(x0)
                continue
            self.prompt, context, mode = switch
            self.switched = True
            eng._set_cross(self.row, context)
            if mode == "cut":
                self.window.clear()
                self.written = self.next_chunk = sched_chunk = 0
            else:
                yield from self._recache(x0)

    def _visible(self) -> int:
        return min(self.written, self.engine.config.cache_chunks)

    def _write(self, latents: torch.Tensor) -> Iterator[_Op]:
        """The clean pass of one chunk at the next position (as the loop's, then `KVCache.append`)."""
        cfg = self.engine.config
        where = int(chunk_slot(cfg, torch.tensor(self.written)))
        yield _Op(latents, 0.0, self.next_chunk * cfg.frames_per_chunk, self._visible(), where)
        self.window[where] = (self.next_chunk, latents)
        self.written += 1
        self.next_chunk += 1

    def _recache(self, latents: torch.Tensor) -> Iterator[_Op]:
        """Append `latents` to the window (evicting as the ring would), then rewrite every window
        chunk's keys/values under the current cross K/V: in video order, chunk j into cache slot j
        at its own frame position, attending to chunks 0..j-1. The ring counter becomes the window
        size, so the next write evicts the oldest non-sink chunk, as before the switch."""
        cfg = self.engine.config
        self.window[int(chunk_slot(cfg, torch.tensor(self.written)))] = (self.next_chunk, latents)
        ordered = sorted(self.window.values(), key=lambda item: item[0])
        self.window, self.written = {}, 0
        for absolute, lat in ordered:
            yield _Op(lat, 0.0, absolute * cfg.frames_per_chunk, self.written, self.written)
            self.window[self.written] = (absolute, lat)
            self.written += 1
        self.next_chunk += 1

    def _emit(self, index: int, x0: torch.Tensor):
        now = time.perf_counter()
        self.engine._deliver(self, (index, x0.detach().float().cpu().clone(), self.prompt, self.switched,
                                    self.chunk_started or now, now))
        self.switched = False
        self.chunk_started = None  # the next chunk's time starts with this one's clean pass

    def advance(self, result) -> bool:
        """Feed the last op's flow (None to start); returns False when the program has finished."""
        try:
            self.op = self._program_it.send(result) if result is not None else next(self._program_it)
            return True
        except StopIteration:
            self.op = None
            return False


class SlotEngine:
    """Up to `max_streams` concurrent streams on one pipeline, batched into one step call per tick.

    `pipe` is an `asd_deploy.pipeline.Pipeline`; its step runs at batch `max_streams` (an engine
    must have been built with `--batch max_streams`; eager and compile take any batch). Thread-
    safe: `open`, `SlotStream` methods and `close` may be called from any thread; the step runs on
    the engine's own thread only."""

    def __init__(self, pipe, max_streams: int = 4, *, buffer_chunks: int = 2, stall_timeout_s: float = 10.0,
                 prompt_cache: int = 64):
        if not isinstance(max_streams, int) or max_streams < 1:
            raise ValueError(f"max_streams must be a positive integer; got {max_streams!r}")
        step = pipe.step
        engine_batch = getattr(step, "batch", None)
        if engine_batch is not None and engine_batch != max_streams:
            raise ValueError(f"the {getattr(step, 'name', 'engine')} engine has static batch {engine_batch}; "
                             f"{max_streams} streams need an engine built with --batch {max_streams} "
                             f"(python -m export.build --backend {getattr(step, 'name', 'ort')} --batch "
                             f"{max_streams} ...), or --max-streams {engine_batch}")
        if buffer_chunks < 1:
            raise ValueError(f"buffer_chunks must be >= 1; got {buffer_chunks}")
        self.pipe, self.step, self.config = pipe, step, pipe.config
        self.max_streams, self.buffer_chunks, self.stall_timeout_s = max_streams, buffer_chunks, stall_timeout_s
        self.device, self.dtype = step.device, step.dtype
        cfg, b = self.config, max_streams
        # the batched state, allocated once: one row per slot. A live-cache step (eager on CUDA)
        # attends in place and wants one chunk of work slots after the cache (KVCache(work_chunk)).
        shape = list(cfg.cache_shape(b))
        shape[2] += cfg.tokens_per_chunk if getattr(step, "live_cache", False) else 0
        self.cache_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache_v = torch.zeros_like(self.cache_k)
        self.cross_k = torch.zeros(cfg.cross_shape(b), dtype=self.dtype, device=self.device)
        self.cross_v = torch.zeros_like(self.cross_k)
        self.x = torch.zeros(cfg.chunk_shape(b), dtype=self.dtype, device=self.device)
        self.t = torch.zeros(b, cfg.frames_per_chunk, dtype=self.dtype, device=self.device)
        self.frame_index = torch.zeros(b, dtype=torch.long, device=self.device)
        self.cache_len = torch.zeros(b, dtype=torch.long, device=self.device)
        self.slots: list[_Slot | None] = [None] * b
        self.ticks = 0
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._stopped = False
        self._prompts: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._prompt_cache = prompt_cache
        self._prompt_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="asd-slot-engine", daemon=True)
        self._thread.start()

    # ---- public --------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        with self._cond:
            return sum(s is not None for s in self.slots)

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._stopped and self._thread.is_alive()

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """[1, text_len, text_dim]; the last `prompt_cache` prompts are kept (bounded memory)."""
        with self._prompt_lock:
            if prompt in self._prompts:
                self._prompts.move_to_end(prompt)
                return self._prompts[prompt]
            ctx = self.pipe.text_encoder.encode(prompt)
            self._prompts[prompt] = ctx
            while len(self._prompts) > self._prompt_cache:
                self._prompts.popitem(last=False)
            return ctx

    def open(self, prompt: str, steps: int = 1, ffe: bool = True, seed: int = 0, frames: int | None = None,
             init: torch.Tensor | None = None, switch_mode: str = "recache", decode: bool = True) -> "SlotStream":
        """Start a stream in a free slot, or raise `Busy`. `frames`: pixel frames (1 + 4k filling
        whole chunks; default one cache length); `init`: clean latents [1, C, F, h, w] to continue
        from (F a multiple of frames_per_chunk, see `continuation.py`)."""
        cfg = self.config
        schedule = Schedule(steps=steps, ffe=ffe)
        frames = frames or cfg.pixel_frames_for(cfg.cache_chunks * cfg.frames_per_chunk)
        num_chunks = cfg.latent_frames_for(frames) // cfg.frames_per_chunk
        if switch_mode not in SWITCH_MODES:
            raise ValueError(f"switch mode must be one of {list(SWITCH_MODES)}; got {switch_mode!r}")
        if init is not None:
            want = (1, cfg.in_channels, cfg.latent_height, cfg.latent_width)
            if init.ndim != 5 or (init.shape[0], init.shape[1], init.shape[3], init.shape[4]) != want \
                    or init.shape[2] % cfg.frames_per_chunk or not init.shape[2]:
                raise ValueError(f"init latents must be [1, {cfg.in_channels}, F, {cfg.latent_height}, "
                                 f"{cfg.latent_width}] with F a positive multiple of {cfg.frames_per_chunk}; "
                                 f"got {list(init.shape)}")
            init = init.to(self.device, self.dtype)
        if not self.healthy:
            raise RuntimeError(f"the slot engine has stopped: {self.error or 'closed'}")
        with self._cond:
            if all(s is not None for s in self.slots):  # refuse before any work (no queueing)
                raise Busy(f"all {self.max_streams} stream slots are busy (--max-streams {self.max_streams}); "
                           f"try again when a stream ends")
        context = self.encode_prompt(prompt)
        with self._cond:
            free = [i for i, s in enumerate(self.slots) if s is None]
            if not free:
                raise Busy(f"all {self.max_streams} stream slots are busy (--max-streams {self.max_streams}); "
                           f"try again when a stream ends")
            slot = _Slot(self, free[0], prompt, context, schedule, seed, num_chunks, init, switch_mode)
            self.slots[slot.row] = slot
            self._cond.notify_all()
        return SlotStream(self, slot, num_chunks, decode)

    def close(self):
        """Stop the loop and end every stream."""
        with self._cond:
            self._stopped = True
            for s in self.slots:
                if s is not None:
                    self._free(s, "server shutting down")
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ---- called with or from the engine thread -----------------------------------------------------
    def _set_cross(self, row: int, context: torch.Tensor):
        """The prompt's cross K/V into row `row`. A static-batch engine's cross_kv takes B rows: the
        context is repeated and row 0 kept."""
        batch = getattr(self.step, "batch", 1)
        k, v = self.step.cross_kv(context.expand(batch, -1, -1).contiguous())
        self.cross_k[:, row].copy_(k[:, 0])
        self.cross_v[:, row].copy_(v[:, 0])

    def _take_switch(self, slot: _Slot):
        with self._cond:
            switch, slot.pending_switch = slot.pending_switch, None
            return switch

    def _deliver(self, slot: _Slot, item: tuple):
        with self._cond:
            if self.slots[slot.row] is slot:
                slot.out.append(item)
                self._cond.notify_all()

    def _free(self, slot: _Slot, reason: str):
        """With the lock held: end the stream and free its row now (an op in flight is discarded)."""
        if slot.end_reason is None:
            slot.end_reason = reason
        if self.slots[slot.row] is slot:
            self.slots[slot.row] = None
        self._cond.notify_all()

    def _runnable(self) -> list[_Slot]:
        """With the lock held: slots that may take part in the next tick; drops stalled ones."""
        now, ready = time.perf_counter(), []
        for s in self.slots:
            if s is None:
                continue
            if len(s.out) >= self.buffer_chunks:  # its consumer is behind: sit out
                if now - s.last_take > self.stall_timeout_s:
                    self._free(s, f"dropped: the client took no chunk for {self.stall_timeout_s:g} s with "
                                  f"{len(s.out)} chunks waiting (too slow)")
                continue
            ready.append(s)
        return ready

    def _loop(self):
        try:
            while True:
                with self._cond:
                    while not self._stopped and not (slots := self._runnable()):
                        self._cond.wait(timeout=0.25)
                    if self._stopped:
                        return
                self._tick(slots)
        except BaseException as e:  # the step failed: every stream ends with the reason, healthz says so
            self.error = e
            with self._cond:
                for s in self.slots:
                    if s is not None:
                        self._free(s, f"server error: {type(e).__name__}: {e}")

    def _tick(self, slots: list[_Slot]):
        rows = []
        with self._cond:  # closed since the snapshot: leave their rows alone
            slots = [s for s in slots if self.slots[s.row] is s]
        for s in slots:
            if s.op is None and not s.advance(None):  # a new slot: run its program to its first op
                self._finish(s)
                continue
            if s.op is not None:
                rows.append(s)
        if not rows:
            return
        cfg, now = self.config, time.perf_counter()
        self.x.zero_()
        self.t.zero_()
        positions = torch.zeros(2, self.max_streams, dtype=torch.long)
        for s in rows:
            op = s.op
            self.x[s.row].copy_(op.x[0])
            self.t[s.row].fill_(op.t)
            positions[0, s.row] = op.frame
            positions[1, s.row] = op.cache_chunks * cfg.tokens_per_chunk
            if s.chunk_started is None:
                s.chunk_started = now
        self.frame_index.copy_(positions[0])
        self.cache_len.copy_(positions[1])
        flow, k_new, v_new = self.step(self.x, self.t, self.cross_k, self.cross_v, self.cache_k, self.cache_v,
                                       self.frame_index, self.cache_len)
        self.ticks += 1
        tpc = cfg.tokens_per_chunk
        for s in rows:
            with self._cond:
                if self.slots[s.row] is not s:  # closed or dropped while the step ran
                    continue
            if s.op.write is not None:
                span = slice(s.op.write * tpc, (s.op.write + 1) * tpc)
                self.cache_k[:, s.row, span] = k_new[:, s.row]
                self.cache_v[:, s.row, span] = v_new[:, s.row]
            if not s.advance(flow[s.row:s.row + 1]):
                self._finish(s)

    def _finish(self, slot: _Slot):
        with self._cond:
            self._free(slot, "complete")


class SlotStream:
    """A consumer's handle on one slot: iterate for `ChunkOut`s (decoded in the caller's thread),
    `switch_prompt` at any time, `close` to free the slot at once. After the iteration ends,
    `end_reason` says why ("complete", "closed by client", "dropped: ...", "server error: ...")."""

    def __init__(self, engine: SlotEngine, slot: _Slot, num_chunks: int, decode: bool):
        self.engine, self._slot, self.num_chunks = engine, slot, num_chunks
        self.row = slot.row
        self._decoder = engine.pipe.decoder.stream(1) if decode else None
        self._taken = 0

    @property
    def end_reason(self) -> str | None:
        return self._slot.end_reason

    @property
    def prompt(self) -> str:
        return self._slot.prompt

    def __iter__(self):
        return self

    def __next__(self) -> ChunkOut:
        out = self.next_chunk()
        if out is None:
            raise StopIteration
        return out

    def next_chunk(self, timeout: float | None = None) -> ChunkOut | None:
        """The next chunk (waits for it), or None when the stream has ended (see `end_reason`).
        Raises TimeoutError after `timeout` seconds without one."""
        slot, cond = self._slot, self.engine._cond
        deadline = None if timeout is None else time.perf_counter() + timeout
        with cond:
            while not slot.out:
                if slot.end_reason is not None:  # ended, and every chunk it made has been taken
                    return None
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no chunk within {timeout} s")
                cond.wait(timeout=0.25 if left is None else min(left, 0.25))
            index, latents, prompt, switched, started, done = slot.out.popleft()
            taken = slot.last_take = time.perf_counter()
            cond.notify_all()  # the slot may run again
        self._taken += 1
        frames, decode_s = None, 0.0
        if self._decoder is not None:
            from ..vae import to_uint8_frames

            t0 = time.perf_counter()
            frames = to_uint8_frames(self._decoder.decode_chunk(latents.to(self.engine.pipe.decoder.device)))
            decode_s = time.perf_counter() - t0
        return ChunkOut(index, latents, frames, prompt, switched, done - started, taken - done, decode_s,
                        done - started + decode_s, time.perf_counter() - slot.opened)

    def switch_prompt(self, prompt: str, mode: str | None = None):
        """Switch from the next chunk boundary on (`mode`: recache (default: the stream's) or cut)."""
        mode = mode or self._slot.switch_mode
        if mode not in SWITCH_MODES:
            raise ValueError(f"switch mode must be one of {list(SWITCH_MODES)}; got {mode!r}")
        context = self.engine.encode_prompt(prompt)
        with self.engine._cond:
            self._slot.pending_switch = (prompt, context, mode)

    def close(self, reason: str = "closed by client"):
        """Free the slot now; chunks made but not yet taken are dropped (the consumer has left)."""
        with self.engine._cond:
            self._slot.out.clear()
            self.engine._free(self._slot, reason)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
