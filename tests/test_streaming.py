"""Pipelining (the DiT one chunk ahead on a worker thread) and frames written as they come:
pipelined frames equal the sequential path's, the stages really overlap, errors and early stops
are clean; the streamed mp4 equals the one-shot mp4; the contact sheet's memory is bounded."""
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from asd_deploy.pipeline import Pipeline, split_threads
from asd_deploy.video import Mp4Writer, SheetSampler, read_mp4, write_mp4


@pytest.fixture(scope="module")
def pipes():
    return Pipeline.from_pretrained("default"), Pipeline.from_pretrained("default", pipelined=False)


@pytest.mark.parametrize("threads", [None, (1, 1)])
def test_pipelined_frames_equal_sequential(pipes, threads):
    """The promise is bit equality at the same per-stage threads. `None` is the pipeline's default
    split (half the threads each); the sequential run then gets that split explicitly, since at all
    threads fp32 kernels may round differently (a uint8 step now and then)."""
    piped, seq = pipes
    piped.threads = threads
    seq.threads = threads or split_threads(torch.get_num_threads())
    a = list(piped.stream("a blue square moving left", steps=1, ffe=True, seed=2, frames=45))
    b = list(seq.stream("a blue square moving left", steps=1, ffe=True, seed=2, frames=45))
    assert [f.shape[0] for f in a] == [9, 12, 12, 12]  # in order, first chunk 1 + 4 * 2 frames
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_split_threads():
    assert split_threads(1) == (1, 1) and split_threads(2) == (1, 1) and split_threads(7) == (3, 4)


class _Recorder:
    """Wraps a chunk step and a decode net; records (what, start, end) with a slow decode."""

    def __init__(self, step, net, decode_s):
        self.step, self.net, self.decode_s, self.log = step, net, decode_s, []
        self.config, self.dtype, self.device = step.config, step.dtype, step.device
        for k in ("name", "z_dim", "temporal_stride", "spatial_stride"):
            setattr(self, k, getattr(net, k))

    def cross_kv(self, context):
        return self.step.cross_kv(context)

    def __call__(self, *args):
        t0 = time.perf_counter()
        out = self.step(*args)
        self.log.append(("step", t0, time.perf_counter(), threading.current_thread().name))
        return out

    def cache_shapes(self, *a):
        return self.net.cache_shapes(*a)

    def stream(self, batch_size=1):
        from asd_deploy.decoders import DecodeStream
        return DecodeStream(self, batch_size)

    def _decode(self, fn, *args):
        t0 = time.perf_counter()
        time.sleep(self.decode_s)
        out = fn(*args)
        self.log.append(("decode", t0, time.perf_counter(), threading.current_thread().name))
        return out

    def first(self, latents):
        return self._decode(self.net.first, latents)

    def next(self, latents, caches):
        return self._decode(self.net.next, latents, caches)


def test_dit_runs_while_the_previous_chunk_decodes(pipes):
    """With a slow decode, chunk n+1's step calls start before chunk n's decode ends, on the
    worker thread; and never more than one chunk ahead (chunk n+2 waits for decode n)."""
    base, _ = pipes
    rec = _Recorder(base.step, base.decoder, decode_s=0.3)
    pipe = Pipeline(base.config, rec, base.text_encoder, base.vae, decoder=rec)
    list(pipe.stream("a red circle moving right", steps=1, ffe=False, seed=0, frames=33))
    decodes = [e for e in rec.log if e[0] == "decode"]
    steps = [e for e in rec.log if e[0] == "step"]
    assert len(decodes) == 3 and all(e[3] == "asd-dit" for e in steps)
    # 1 step per chunk + a clean pass before each later chunk: chunk c's calls are 2c-1, 2c
    chunk1 = steps[1:3]
    assert chunk1[0][1] < decodes[0][2], "chunk 1 was not denoised during chunk 0's decode"
    chunk2 = steps[3:5]
    assert chunk2[0][1] >= decodes[0][2], "the worker ran two chunks ahead"


def test_worker_errors_surface_and_early_stop_ends_the_worker(pipes):
    base, _ = pipes

    class Failing:
        def __init__(self, step):
            self.step, self.calls = step, 0
            self.config, self.dtype, self.device = step.config, step.dtype, step.device

        def cross_kv(self, c):
            return self.step.cross_kv(c)

        def __call__(self, *a):
            self.calls += 1
            if self.calls == 4:
                raise RuntimeError("step failed on purpose")
            return self.step(*a)

    pipe = Pipeline(base.config, Failing(base.step), base.text_encoder, base.vae)
    s = pipe.stream("a red circle moving right", ffe=False, frames=45)
    with pytest.raises(RuntimeError, match="on purpose"):
        list(s)
    before = {t.name for t in threading.enumerate()}
    s = base.stream("a red circle moving right", frames=45)
    next(s)
    s._it.close()  # the consumer stops early
    time.sleep(0.1)
    assert "asd-dit" not in {t.name for t in threading.enumerate()} - before


def test_streamed_mp4_equals_one_shot(tmp_path, pipes):
    chunks = list(pipes[0].stream("a green circle moving up", seed=1, frames=33))
    write_mp4(np.concatenate(chunks), tmp_path / "one.mp4")
    with Mp4Writer(tmp_path / "streamed.mp4") as w:
        for c in chunks:
            w.append(c)
    a, fa = read_mp4(tmp_path / "one.mp4")
    b, fb = read_mp4(tmp_path / "streamed.mp4")
    cfg = pipes[0].config
    assert a.shape == (33, cfg.height, cfg.width, 3) and np.array_equal(a, b) and fa == fb == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.mp4", "streamed.mp4"]  # no temp files left


def test_mp4_writer_is_atomic(tmp_path):
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="one frame size"):
        with Mp4Writer(tmp_path / "v.mp4") as w:
            w.append(frames)
            w.append(np.zeros((4, 8, 8, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []  # nothing under the name, no temp file
    with pytest.raises(ValueError, match="no frames"):
        with Mp4Writer(tmp_path / "v.mp4"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_sheet_sampler_is_bounded_and_even():
    s = SheetSampler(total=1001, count=16)
    for start in range(0, 1001, 12):
        idx = np.arange(start, min(start + 12, 1001))
        chunk = np.zeros((len(idx), 2, 2, 3), np.uint8)
        chunk[..., 0], chunk[..., 1] = (idx % 256)[:, None, None], (idx // 256)[:, None, None]  # frame number
        s.add(chunk)
    want = np.linspace(0, 1000, 16).round().astype(int).tolist()
    assert s.seen == 1001 and [int(f[0, 0, 0]) + 256 * int(f[0, 0, 1]) for f in s.frames] == want


def test_cli_tiny_decoder_missing_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "asd_deploy", "generate", "--decoder", "tiny", "--frames", "9",
                        "--tiny-decoder", str(tmp_path / "absent"), "--out", str(tmp_path / "x.mp4")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "training.tiny_decoder" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.mp4").exists()
