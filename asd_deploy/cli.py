"""Command line: `asd-deploy` / `python -m asd_deploy generate ...`, `... encode-prompt ...`, `... decode ...`
and `... serve ...` (the server itself lives in `serve/`).

Owns: argument parsing, the one flag vocabulary every tool of the project shares (the helpers
below; `export.build`, `training.*` and `benchmarks.*` use them), progress and summary printing,
and turning errors into one-line messages and a non-zero exit. Does not own any generation logic
(`pipeline.py`).

The vocabulary: `--steps` is denoising steps per chunk (1-4) everywhere; a training run's length
is `--max-steps`. `--ffe/--no-ffe` is First-Frame Enhancement, on by default everywhere, with
`--ffe-steps`. `--config` is a model config preset (tiny, small, ...) everywhere; a training
recipe is `--recipe`. `--model` is a model folder (or 'default'), `--engine` an engine folder,
`--checkpoint` DiT weights. `--quiet` turns progress output off. `--seed` is an integer in
[0, 2**63), as the C++ runtime takes it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_PROMPT = "a red circle moving right on a white background"
BACKENDS = ("eager", "compile", "ort", "aoti", "trt", "auto")
SEED_LIMIT = 2 ** 63
# What a command may raise for bad input or a bad environment; each becomes "error: ..." and exit 2.
# (EngineError, CheckpointError, ConfigError derive from RuntimeError / ValueError.)
USER_ERRORS = (ValueError, OSError, RuntimeError, ImportError)


# ---- the shared vocabulary ---------------------------------------------------------------------
def seed_arg(text: str) -> int:
    """argparse type of --seed: an integer in [0, 2**63) (no wrap-around, no overflow)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63); got {text!r}") from None
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63); got {text}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {v}")
    return v


def add_schedule_args(p: argparse.ArgumentParser, steps_help: str = "denoising steps per chunk (1-4); one "
                                                                    "model serves every count") -> None:
    p.add_argument("--steps", type=int, default=1, help=steps_help)
    p.add_argument("--ffe", action=argparse.BooleanOptionalAction, default=True,
                   help="First-Frame Enhancement: the first chunk gets --ffe-steps denoising steps")
    p.add_argument("--ffe-steps", type=int, default=4, help="denoising steps of the first chunk with --ffe")


def add_quiet(p: argparse.ArgumentParser, old: str | None = None) -> None:
    """`--quiet` (no progress output); `old` is a deprecated spelling kept working with a note."""
    p.add_argument("--quiet", action="store_true", help="no progress output")
    if old:
        p.add_argument(old, dest="quiet", action=_Deprecated, nargs=0, new="--quiet", const=True,
                       help=argparse.SUPPRESS)


class _Deprecated(argparse.Action):
    """An old flag spelling: works, and says which flag replaces it."""

    def __init__(self, option_strings, dest, new: str, const=None, **kw):
        self.new = new
        super().__init__(option_strings, dest, const=const, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_deprecated(p: argparse.ArgumentParser, old: str, new: str, dest: str, **kw) -> None:
    p.add_argument(old, dest=dest, action=_Deprecated, new=new, help=argparse.SUPPRESS, **kw)


def check_device(device: str):
    """A torch.device that exists here, or a ValueError saying what this torch and machine have."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"--device {device}: this torch ({torch.__version__}) is a CPU build without CUDA; "
                             f"use --device cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch has CUDA but sees no GPU here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: only cpu and cuda are supported")
    return dev


def print_error(e: BaseException) -> None:
    msg = str(e).strip().splitlines()
    if isinstance(e, OSError) and e.strerror and e.filename and not msg[1:]:
        msg = [f"{e.strerror}: {e.filename}"]
    print(f"error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
    for line in msg[1:6]:
        print(f"  {line}", file=sys.stderr)


def run_command(fn, *args, interrupted: str = "interrupted") -> int:
    """Run one CLI command: bad input and environment errors print one `error:` line (plus up to
    five detail lines) and return 2, never a traceback; Ctrl-C returns 130."""
    try:
        return fn(*args)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print_error(e)
        return 2


# ---- the asd-deploy commands ------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="asd-deploy",
                                 description="One-step causal video generation (ASD), streaming chunk by chunk.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a video (mp4) or its latents (.pt)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--model", default="default",
                   help="'default' (embedded, no download) or a model folder (config.json, dit.safetensors, vae/, "
                        "text_encoder/)")
    g.add_argument("--checkpoint", default=None,
                   help="DiT weights overriding the model's: a Self-Forcing/ASD .pt, safetensors, a diffusers "
                        "folder, or 'random' (seeded random weights at --config)")
    g.add_argument("--config", default=None, help="model config preset for --checkpoint (tiny, small, medium, "
                                                  "wan2.1-1.3b)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt")
    add_schedule_args(g)
    g.add_argument("--seed", type=seed_arg, default=0, help="noise seed in [0, 2**63); the same seed gives the "
                                                            "same video")
    g.add_argument("--frames", type=positive_int, default=None,
                   help="pixel frames, 1+4k filling whole 3-latent-frame chunks (e.g. 9, 21, 33, ...); "
                        "default: one cache length")
    g.add_argument("--init", default=None,
                   help="continue from this video or image (its last frames, encoded by the VAE, prefill the cache)")
    g.add_argument("--out", default="out.mp4", help="output: .mp4 for video, .pt for latents [1, C, F, H, W]")
    g.add_argument("--sheet", default=None, help="also write a PNG contact sheet of the frames (.png; video only)")
    g.add_argument("--backend", default="eager", choices=BACKENDS,
                   help="DiT backend; auto: the engine `python -m export.build --backend auto` chose on this machine")
    g.add_argument("--decoder", default="vae", choices=("vae", "tiny"),
                   help="latents -> frames: the model's VAE decoder, or its distilled tiny decoder (much faster); "
                        "an engine backend runs the engine's decoder when it was built from the same weights")
    g.add_argument("--tiny-decoder", default=None, help="tiny decoder folder overriding the model's tiny_decoder/")
    g.add_argument("--pipelined", action=argparse.BooleanOptionalAction, default=True,
                   help="denoise chunk n+1 on a worker thread while chunk n is decoded")
    g.add_argument("--device", default="cpu", help="device of the DiT (cpu, cuda); VAE and text encoder stay on CPU")
    g.add_argument("--cuda-graph", action="store_true",
                   help="capture the chunk step in a CUDA graph once and replay it (GPU only; not run on CPU CI)")
    g.add_argument("--engine", default=None,
                   help="engine folder from `python -m export.build` (default: the matching engine in your engine "
                        "cache, ~/.cache/asd-deploy/engines; never ./engines: an engine is code)")
    g.add_argument("--vae", default=None, help="local diffusers AutoencoderKLWan folder overriding the model's")
    g.add_argument("--text-encoder", default=None,
                   help="the model's text encoder overridden: 'default' (the grammar encoder), 'minilm' "
                        "(all-MiniLM-L6-v2, the [minilm] extra) or a local umT5 folder")
    add_quiet(g)

    e = sub.add_parser("encode-prompt", help="encode a prompt to a .npy embedding [1, text_len, text_dim]",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", default="default", help="'default' or a model folder")
    e.add_argument("--prompt", required=True)
    e.add_argument("--out", required=True, help="output .npy")

    d = sub.add_parser("decode", help="decode latents (.npy from asd_stream, or .pt from generate) to an mp4",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--latents", required=True, help="normalized latents [1, C, F, h, w] (.npy or .pt)")
    d.add_argument("--model", default="default", help="'default' or a model folder (its VAE decodes)")
    d.add_argument("--vae", default=None, help="local diffusers AutoencoderKLWan folder overriding the model's")
    d.add_argument("--out", required=True, help="output .mp4")
    d.add_argument("--sheet", default=None, help="also write a PNG contact sheet of the frames (.png)")
    s = sub.add_parser("serve", help="serve streams over HTTP/WebSocket with a live page (needs the serve extra)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", default="default", help="'default' or a model folder")
    s.add_argument("--checkpoint", default=None, help="DiT weights overriding the model's (as for generate)")
    s.add_argument("--config", default=None, help="model config preset for --checkpoint")
    s.add_argument("--backend", default="eager", choices=BACKENDS, help="DiT backend")
    s.add_argument("--engine", default=None, help="engine folder built with --batch equal to --max-streams")
    s.add_argument("--device", default="cpu", help="device of the DiT")
    s.add_argument("--vae", default=None, help="local diffusers AutoencoderKLWan folder overriding the model's")
    s.add_argument("--text-encoder", default=None,
                   help="the model's text encoder overridden: 'default' (the grammar encoder), 'minilm' "
                        "(all-MiniLM-L6-v2, the [minilm] extra) or a local umT5 folder")
    s.add_argument("--decoder", default="vae", choices=("vae", "tiny"),
                   help="latents -> frames in each stream: the model's VAE decoder, or its tiny decoder (much "
                        "faster); an engine backend runs the engine's decoder when it was built from the same weights")
    s.add_argument("--tiny-decoder", default=None, help="tiny decoder folder overriding the model's tiny_decoder/")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--max-streams", type=int, default=4,
                   help="concurrent streams, batched into one step call (the engine's static batch)")
    s.add_argument("--max-chunks", type=int, default=64, help="longest stream, in chunks")
    s.add_argument("--buffer-chunks", type=int, default=2, help="finished chunks a stream may hold unsent")
    s.add_argument("--stall-timeout", type=float, default=10.0,
                   help="seconds a client may leave a full buffer unread before its stream is dropped")
    s.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (needs the ray extra)")
    s.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    s.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. 'auto' on a node of it; default: start a local one)")
    s.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (with --ray)")
    s.add_argument("--log-level", default="info", help="uvicorn log level")
    return ap


def _serve(args) -> int:
    for name, value, lo in (("--max-streams", args.max_streams, 1), ("--max-chunks", args.max_chunks, 1),
                            ("--buffer-chunks", args.buffer_chunks, 1), ("--replicas", args.replicas, 1),
                            ("--port", args.port, 0)):
        if value < lo:
            raise ValueError(f"{name} must be >= {lo}; got {value}")
    if args.replicas > 1 and not args.ray:
        raise ValueError("--replicas needs --ray (one process serves one replica)")
    if args.config and not args.checkpoint:
        args.checkpoint = "random"
    options = dict(max_streams=args.max_streams, max_chunks=args.max_chunks, buffer_chunks=args.buffer_chunks,
                   stall_timeout_s=args.stall_timeout)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'") from None
    if args.ray:
        from .serve.ray import run_ray
        return run_ray(vars(args), host=args.host, port=args.port, replicas=args.replicas, address=args.ray_address,
                       cpus_per_replica=args.ray_cpus, **options)
    from .serve.app import serve
    serve(_pipeline(args, batch=args.max_streams), host=args.host, port=args.port, log_level=args.log_level,
          **options)
    return 0


def _check_sheet(sheet, out_suffix: str = ".mp4"):
    from .video import check_writable

    if sheet is None:
        return None
    if out_suffix != ".mp4":
        raise ValueError(f"--sheet {sheet}: a contact sheet needs video frames, and --out {out_suffix} writes latents "
                         f"only; drop --sheet or write an .mp4")
    if Path(sheet).suffix.lower() != ".png":
        raise ValueError(f"--sheet must end in .png (a PNG contact sheet); got {Path(sheet).name!r}")
    return check_writable(sheet)


def _generate(args) -> int:
    import torch
    from tqdm import tqdm

    from .schedule import Schedule
    from .video import Mp4Writer, SheetSampler, check_writable

    out = Path(args.out)
    if out.suffix not in (".mp4", ".pt"):
        raise ValueError(f"--out must end in .mp4 (video) or .pt (latents); got {out.name!r}")
    check_writable(out)
    _check_sheet(args.sheet, out.suffix)
    check_device(args.device)
    if args.init and not Path(args.init).is_file():
        raise FileNotFoundError(f"--init {args.init}: no such file; expected an image (png, jpg) or a video (mp4)")
    if args.config and not args.checkpoint:
        if args.model != "default":
            raise ValueError("--config applies to --checkpoint; a model folder carries its own config")
        args.checkpoint = "random"  # a bare config: seeded random weights at that size
    schedule = Schedule(steps=args.steps, ffe=args.ffe, ffe_steps=args.ffe_steps)  # validate before loading
    pipe = _pipeline(args)
    if args.cuda_graph:
        from .backends.graphs import GraphedStep
        pipe.step = GraphedStep(pipe.step)  # raises naming the missing GPU on CPU machines
    if args.frames is not None:
        pipe.config.latent_frames_for(args.frames)
    if pipe.info.get("trained") is False:
        print("note: this model has RANDOM weights (--checkpoint random, or the embedded default's trained "
              "assets are missing); the video is noise-like. Every code path is real.", file=sys.stderr)
    latents_only = out.suffix == ".pt"
    stream = pipe.stream(args.prompt, steps=args.steps, ffe=args.ffe, ffe_steps=args.ffe_steps, seed=args.seed,
                         frames=args.frames, latents_only=latents_only, keep_latents=latents_only, init=args.init)
    bar = tqdm(total=stream.num_chunks, unit="chunk", disable=args.quiet, file=sys.stderr)
    if latents_only:
        for _ in stream:
            bar.update()
        from .checkpoint import atomic_write
        latents = torch.cat(stream.latents, dim=2)
        atomic_write(out, lambda tmp: torch.save(latents.cpu(), tmp))
    else:  # chunk by chunk into the mp4 (renamed into place when whole): memory stays flat for any length
        sheet = SheetSampler(stream.frames) if args.sheet else None
        with Mp4Writer(out, fps=pipe.fps) as writer:
            for chunk in stream:
                writer.append(chunk)
                if sheet is not None:
                    sheet.add(chunk)
                bar.update()
        if sheet is not None:
            sheet.sheet(args.sheet)
    bar.close()
    s = stream.stats.summary(pipe.fps)
    cfg = pipe.config
    res = f"{cfg.width}x{cfg.height}"
    what = (f"latents {list(latents.shape)} ({stream.num_chunks} chunks)" if latents_only
            else f"{s['frames']} frames {res} ({s['video_seconds']:.2f} s at {pipe.fps} fps)")
    print(f"wrote {out}: {what}; backend {pipe.info['backend']}, {schedule.describe()}, seed {args.seed}")
    if latents_only:
        print(f"  DiT {s['dit_s']:.3f} s; first chunk after {s['first_frame_s']:.3f} s")
    else:
        print(f"  decoder {pipe.info['decoder']} ({pipe.info['decoder_note']})"
              + ("; DiT one chunk ahead on a worker thread" if pipe.pipelined else ""))
        print(f"  FPS {s['fps_dit_only']:.1f} DiT only, {s['fps_end_to_end']:.1f} end to end (decode included); "
              f"first frame after {s['first_frame_s']:.3f} s (text {s['text_s']:.3f} s)")
    if args.sheet:
        print(f"  contact sheet: {args.sheet}")
    return 0


def _pipeline(args, batch: int = 1):
    from .pipeline import Pipeline

    dec = dict(decoder=getattr(args, "decoder", "vae"), tiny_decoder=getattr(args, "tiny_decoder", None),
               pipelined=getattr(args, "pipelined", True))  # serve: no --pipelined (each consumer decodes)
    if args.checkpoint:  # a bare DiT checkpoint with the default VAE/text encoder of its config
        return Pipeline.from_checkpoint(args.checkpoint, args.config, backend=args.backend, engine=args.engine,
                                        vae=args.vae, text_encoder=args.text_encoder, device=args.device,
                                        batch=batch, **dec)
    return Pipeline.from_pretrained(args.model, backend=args.backend, engine=args.engine, vae=args.vae,
                                    text_encoder=args.text_encoder, device=args.device, batch=batch, **dec)


def _encode_prompt(args) -> int:
    import numpy as np

    from .pipeline import Pipeline
    from .video import check_writable

    out = check_writable(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out must end in .npy; got {out.name!r}")
    pipe = Pipeline.from_pretrained(args.model)
    emb = pipe.encode_prompt(args.prompt).float().cpu().numpy()
    from .checkpoint import atomic_write
    atomic_write(out, lambda tmp: np.save(open(tmp, "wb"), emb))
    print(f"wrote {out}: float32 {list(emb.shape)}")
    return 0


def read_latents(src: Path):
    """Latents from a .npy (asd_stream) or .pt (generate) file, refusing pickles and damage."""
    import numpy as np
    import torch

    from .checkpoint import check_finite, load_torch_file

    if not src.is_file():
        raise FileNotFoundError(f"--latents {src} does not exist or is not a file")
    if src.suffix == ".npy":
        try:
            lat = torch.from_numpy(np.load(src, allow_pickle=False))
        except (ValueError, OSError, EOFError, TypeError) as e:  # object arrays, truncation, not a .npy
            raise ValueError(f"cannot read {src} as a numeric .npy array ({e}); expected float latents "
                             f"[1, C, F, h, w] as asd_stream writes them") from None
    elif src.suffix == ".pt":
        lat = load_torch_file(src)
    else:
        raise ValueError(f"--latents must be a .npy (asd_stream) or .pt (generate --out x.pt) file; got {src.name!r}")
    if not isinstance(lat, torch.Tensor) or not lat.is_floating_point():
        raise ValueError(f"{src} holds {type(lat).__name__} {getattr(lat, 'dtype', '')}; expected a float tensor "
                         f"of latents [1, C, F, h, w]")
    check_finite({"latents": lat}, str(src))
    return lat


def _decode(args) -> int:
    from .pipeline import Pipeline
    from .vae import to_uint8_frames
    from .video import check_writable, contact_sheet, write_mp4

    out = check_writable(args.out)
    if out.suffix != ".mp4":
        raise ValueError(f"--out must end in .mp4; got {out.name!r}")
    _check_sheet(args.sheet)
    src = Path(args.latents)
    lat = read_latents(src)
    pipe = Pipeline.from_pretrained(args.model, vae=args.vae)
    cfg = pipe.config
    want = (cfg.in_channels, cfg.latent_height, cfg.latent_width)
    if lat.ndim != 5 or lat.shape[0] != 1 or (lat.shape[1], lat.shape[3], lat.shape[4]) != want:
        raise ValueError(f"{src} holds {list(lat.shape)}; model {cfg.name!r} decodes latents "
                         f"[1, {want[0]}, F, {want[1]}, {want[2]}]")
    video = to_uint8_frames(pipe.vae.decode(lat.float().to(pipe.vae.device)))
    write_mp4(video, out, fps=pipe.fps)
    if args.sheet:
        contact_sheet(video, args.sheet, every=max(1, len(video) // 16))
    print(f"wrote {out}: {len(video)} frames {cfg.width}x{cfg.height} from latents {list(lat.shape)}")
    return 0


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    command = {"generate": _generate, "encode-prompt": _encode_prompt, "decode": _decode,
               "serve": _serve}[args.command]
    return run_command(command, args, interrupted="interrupted; nothing was written")


def console_main() -> None:
    """The `asd-deploy` console script."""
    sys.exit(main())
