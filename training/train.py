"""Training entry point: teacher (flow matching) and distillation (DMD + alpha * ASD) stages.

    python -m training.train --recipe FILE_OR_NAME [--stage teacher|distill|all] [--out DIR]
                             [--max-steps N] [--config MODEL_PRESET] [--resume] [--set KEY=VALUE ...]
                             [--device auto|cpu|cuda] [--quiet]
    torchrun --nproc_per_node N -m training.train ...          # FSDP2: gloo on CPU, nccl on GPU

Owns: `LatentCache` (procedural videos encoded once by the VAE and the text encoder, stored on
disk; or random latents for tests), the data order, `Ema`, `Trainer` (models, optimizers, the
step of each stage, checkpoints, resume, logs) and the CLI. Does not own the objectives
(`losses.py`), rollouts (`rollout.py`) or sharding (`distributed.py`).

Output, per stage, under OUT/<stage>/:
    checkpoint.pt            Self-Forcing format (generator / critic / generator_ema, keys `model.*`),
                             loadable by asd_deploy.checkpoint.load_checkpoint; extra keys: step,
                             stage, discriminator, model_config, train_config, state_file
    train_state_<step>.pt    optimizer states + RNG state (resume only; plain tensors/containers)
    log.jsonl                one line per logged step: its values, and for what it did not update (the
                             generator every critic_ratio steps, D every disc_ratio) the latest value
                             since the previous line
    config.json              {"model": ModelConfig, "train": TrainConfig}
A step's randomness is a function of (seed, step) and the data order of (seed, position), so
`--resume` from a checkpoint continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from asd_deploy.checkpoint import atomic_write, check_state_dict, read_state_dict, save_checkpoint
from asd_deploy.config import ModelConfig
from asd_deploy.model import build_model

from . import distributed as D
from .config import TrainConfig, resumable_diff
from .losses import DiscHead, DistillNets, critic_losses, generator_loss, teacher_loss
from .rollout import FORWARD_METHODS, StepRandom, TrainNet, derive_seed

# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _cache_encoder_name(name: str) -> str:
    """The text encoder's name in a cache key. Until 2026-12-07 "default" named MiniLM: its caches
    keep that key (they stay valid as "minilm"), and the grammar encoder that took the name gets
    its own."""
    return {"minilm": "default", "default": "grammar"}.get(name, name)


class LatentCache:
    """Training latents [N, C, F, h, w] (normalized) and prompt embeddings [N, text_len, text_dim]."""

    FORMAT = 1

    def __init__(self, latents: torch.Tensor, context: torch.Tensor, captions: list[str] | None = None,
                 meta: dict | None = None):
        if latents.shape[0] != context.shape[0]:
            raise ValueError(f"{latents.shape[0]} latents but {context.shape[0]} contexts")
        self.latents, self.context = latents, context
        self.captions, self.meta = captions, meta or {}

    def __len__(self) -> int:
        return self.latents.shape[0]

    @staticmethod
    def key(cfg: TrainConfig) -> dict:
        """Everything the cached tensors depend on."""
        m, d = cfg.model_config(), cfg.data
        return {"format": LatentCache.FORMAT, "height": m.height, "width": m.width, "channels": m.in_channels,
                "frames": m.pixel_frames_for(d.num_chunks * m.frames_per_chunk), "text_len": m.text_len,
                "text_dim": m.text_dim, "num_samples": d.num_samples, "seed": d.seed, "vae": d.vae,
                "text_encoder": _cache_encoder_name(d.text_encoder), "max_objects": d.max_objects,
                "vae_weights": _vae_weights_hash(d.vae)} \
            | ({"speed_scale": d.speed_scale} if d.speed_scale != 1.0 else {})  # caches from before it stay valid

    @classmethod
    def random(cls, cfg: TrainConfig) -> "LatentCache":
        """Seeded standard-normal latents and contexts (tests, plumbing)."""
        m, d = cfg.model_config(), cfg.data
        g = torch.Generator().manual_seed(derive_seed(d.seed, "random-latents"))
        lat = torch.randn(d.num_samples, m.in_channels, d.num_chunks * m.frames_per_chunk, m.latent_height,
                          m.latent_width, generator=g)
        ctx = torch.randn(d.num_samples, m.text_len, m.text_dim, generator=g)
        return cls(lat, ctx, meta={"source": "random"})

    @classmethod
    def build(cls, path: Path, cfg: TrainConfig, batch: int = 4, progress: bool = True) -> "LatentCache":
        """Render the procedural videos, encode them (VAE) and their captions (text encoder) once,
        and write `path` atomically."""
        from tqdm import tqdm

        from asd_deploy.text import load_text_encoder
        from asd_deploy.vae import VideoVAE

        from .data import ProceduralVideos

        m, d, key = cfg.model_config(), cfg.data, cls.key(cfg)
        vae = VideoVAE.tiny() if d.vae == "tiny" else VideoVAE.from_pretrained(d.vae)
        if vae.z_dim != m.in_channels or vae.spatial_stride != m.vae_stride[1] or \
                vae.temporal_stride != m.vae_stride[0]:
            raise ValueError(f"VAE {vae!r} does not fit model config {m.name!r} (in_channels {m.in_channels}, "
                             f"vae_stride {m.vae_stride}); use a VAE with z_dim {m.in_channels} and those strides")
        text = load_text_encoder(d.text_encoder, m.text_len)
        if text.text_dim != m.text_dim:
            raise ValueError(f"text encoder {text!r} gives {text.text_dim}-dim embeddings; model config "
                             f"{m.name!r} has text_dim {m.text_dim}")
        videos = ProceduralVideos(num_samples=d.num_samples, seed=d.seed, height=m.height, width=m.width,
                                  frames=key["frames"], max_objects=d.max_objects, speed_scale=d.speed_scale)
        lats, ctxs, caps = [], [], []
        for start in tqdm(range(0, d.num_samples, batch), desc="latent cache", disable=not progress):
            items = [videos[i] for i in range(start, min(start + batch, d.num_samples))]
            lats.append(vae.encode(torch.stack([_video_tensor(it["video"]) for it in items])).cpu())
            caps += [it["caption"] for it in items]
            ctxs.append(text.encode([it["caption"] for it in items]).cpu())
        out = cls(torch.cat(lats), torch.cat(ctxs), caps, {**key, "source": "procedural", "vae_repr": repr(vae),
                                                          "text_encoder_repr": repr(text)})
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "captions.json", lambda tmp: Path(tmp).write_text(json.dumps(caps, indent=0)))
        atomic_write(path / "latents.pt", lambda tmp: torch.save(
            {"latents": out.latents, "context": out.context}, tmp))
        atomic_write(path / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(out.meta, indent=2)))
        return out

    @classmethod
    def load(cls, path: Path, key: dict) -> "LatentCache":
        meta = json.loads((path / "meta.json").read_text())
        diff = [f"{k}: {meta.get(k)!r} != {key[k]!r}" for k in sorted(key) if meta.get(k) != key[k]]
        if diff:
            raise ValueError(f"latent cache {path} was built for other settings ({'; '.join(diff)}); delete it "
                             f"or set data.cache_dir elsewhere")
        t = torch.load(path / "latents.pt", map_location="cpu", weights_only=True, mmap=True)
        caps = json.loads((path / "captions.json").read_text())
        return cls(t["latents"], t["context"], caps, meta)

    @classmethod
    def for_config(cls, cfg: TrainConfig, out: Path, info: D.DistInfo, progress: bool = True) -> "LatentCache":
        """The config's data: random, or the on-disk cache (built by rank 0 when absent)."""
        if cfg.data.source == "random":
            return cls.random(cfg)
        key = cls.key(cfg)
        tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "latents" / tag
        if info.is_main and not (path / "meta.json").exists():
            cls.build(path, cfg, progress=progress)
        D.barrier(info)
        return cls.load(path, key)

    def batch(self, step: int, global_batch: int, seed: int, info: D.DistInfo):
        """This rank's rows of global batch `step`: epochs are seeded permutations of the samples."""
        n, b = len(self), global_batch // info.world
        idx = []
        for pos in range(step * global_batch + info.rank * b, step * global_batch + (info.rank + 1) * b):
            epoch = pos // n
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))
            idx.append(int(perm[pos % n]))
        return (self.latents[idx].float().to(info.device), self.context[idx].float().to(info.device))


def _vae_weights_hash(vae: str) -> str | None:
    """Content hash of a VAE folder's weights, so a retrained VAE at the same path rebuilds the cache."""
    if vae == "tiny":
        return None
    from asd_deploy.backends.manifest import sha256_file
    from asd_deploy.vae import WEIGHT_FILES
    for name in WEIGHT_FILES:
        f = Path(vae) / name
        if f.is_file():
            return sha256_file(f)[:16]
    raise FileNotFoundError(f"data.vae={vae!r} has none of {list(WEIGHT_FILES)}; train one with the three "
                            f"`python -m training.vae` runs of the README's recipe (the last with --out {vae}), "
                            f"or use \"tiny\"")


def _video_tensor(video) -> torch.Tensor:
    """A procedural video as the VAE wants it: float [3, T, H, W] in [-1, 1]. Accepts that, or
    uint8 [T, H, W, 3] / [3, T, H, W] (numpy or torch)."""
    v = torch.as_tensor(video)
    if v.ndim != 4:
        raise ValueError(f"a video must be 4-D ([3, T, H, W] or [T, H, W, 3]); got {list(v.shape)}")
    if v.shape[0] != 3 and v.shape[-1] == 3:
        v = v.permute(3, 0, 1, 2)
    if v.dtype == torch.uint8:
        return v.float() / 127.5 - 1.0
    return v.float()


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------


class Ema:
    """Exponential moving average of a TrainNet's weights, sharded like them."""

    def __init__(self, net: TrainNet, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in net.model.named_parameters()}

    @torch.no_grad()
    def update(self, net: TrainNet):
        for k, p in net.model.named_parameters():
            self.shadow[k].lerp_(p.detach(), 1.0 - self.decay)

    def full_state_dict(self) -> dict:
        return {k: D.full_tensor(v).cpu().clone() for k, v in self.shadow.items()}

    def load_full(self, sd: dict):
        self.shadow = {k: D.shard_like(sd[k], v) for k, v in self.shadow.items()}


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------


def _log_step(line: str) -> int | None:
    """The step of one log.jsonl line, or None for a line a killed run left half-written."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _strip(sd: dict | None) -> dict | None:
    return None if sd is None else {k.removeprefix("model."): v for k, v in sd.items()}


def _adamw(params, o) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


class Trainer:
    """One stage of training: its networks, optimizers, step, checkpoint and log."""

    def __init__(self, cfg: TrainConfig, stage: str, out: str | Path, info: D.DistInfo | None = None,
                 progress: bool = True):
        self.cfg, self.stage, self.out = cfg, stage, Path(out)
        self.info = info or D.DistInfo()
        self.dir = self.out / stage
        self.mcfg: ModelConfig = cfg.model_config()
        self.progress = progress and self.info.is_main
        if cfg.batch_size % self.info.world:
            raise ValueError(f"batch_size={cfg.batch_size} does not split over {self.info.world} ranks; use a "
                             f"multiple of {self.info.world}")
        self.data = LatentCache.for_config(cfg, self.out, self.info, self.progress)
        self.num_chunks = self.data.latents.shape[2] // self.mcfg.frames_per_chunk
        self.step = 0
        self.ema: Ema | None = None
        self.teacher = self.critic = self.disc = None
        self.opts: dict[str, torch.optim.Optimizer] = {}

    # ---- construction ---------------------------------------------------------------------
    def _net(self, sd: dict | None, trainable: bool = True) -> TrainNet:
        model = build_model(self.mcfg, seed=self.cfg.seed)
        if sd is not None:
            model.load_state_dict(sd, strict=True)
        net = TrainNet(model).to(self.info.device).train(trainable).requires_grad_(trainable)
        return D.shard(net, self.info, FORWARD_METHODS)

    def _teacher_weights(self) -> dict | None:
        src = self.cfg.distill.teacher
        if src == "random":
            return None
        path = Path(src) if src else self.out / "teacher" / "checkpoint.pt"
        if not path.exists():
            raise FileNotFoundError(f"distillation needs a teacher checkpoint; {path} does not exist. Train one "
                                    f"first (--stage teacher, or --stage all) or set distill.teacher=PATH")
        return read_state_dict(path, prefer="generator_ema")

    def _teacher_init(self) -> dict | None:
        src = self.cfg.teacher.init
        if src is None:
            return None
        if not Path(src).exists():
            raise FileNotFoundError(f"teacher.init={src}: no such checkpoint (expected a teacher's checkpoint.pt, "
                                    f"or null to start from random weights)")
        sd = read_state_dict(src, prefer="generator_ema")
        check_state_dict(sd, self.mcfg)
        return sd

    def setup(self, resume: bool = False) -> "Trainer":
        ckpt = self._load_checkpoint() if resume else None
        if not resume and (self.dir / "checkpoint.pt").exists():
            raise FileExistsError(f"{self.dir / 'checkpoint.pt'} exists; pass --resume to continue that run or "
                                  f"choose another --out")
        c = self.cfg
        if self.stage == "teacher":
            self.generator = self._net(_strip(ckpt["generator"]) if ckpt else self._teacher_init())
            self.opts = {"generator": _adamw(self.generator.parameters(), c.teacher.optim)}
            decay = c.teacher.ema_decay
        else:
            init = self._teacher_weights()
            self.teacher = self._net(init, trainable=False)
            self.generator = self._net(_strip(ckpt["generator"]) if ckpt else init)
            self.critic = self._net(_strip(ckpt["critic"]) if ckpt else init)
            self.disc = DiscHead(self.mcfg.dim * len(c.disc_layers()), c.distill.disc_hidden, c.distill.asd_max_steps,
                                 seed=derive_seed(c.seed, "disc") % 2 ** 31).to(self.info.device)
            if ckpt:
                self.disc.load_state_dict(ckpt["discriminator"])
            D.broadcast_module_(self.disc, self.info)
            self.opts = {"generator": _adamw(self.generator.parameters(), c.distill.generator),
                         "critic": _adamw(self.critic.parameters(), c.distill.critic),
                         "discriminator": _adamw(self.disc.parameters(), c.distill.discriminator)}
            decay = c.distill.ema_decay
        self.ema_decay = decay
        # a delayed EMA (distill.ema_start) exists once started; a checkpoint saved before has none
        if decay > 0 and (self.stage == "teacher" or c.distill.ema_start == 0 or (ckpt and "generator_ema" in ckpt)):
            self.ema = Ema(self.generator, decay)
            if ckpt and "generator_ema" in ckpt:
                self.ema.load_full(_strip(ckpt["generator_ema"]))
        if ckpt:
            self._load_train_state(ckpt)
        return self

    def nets(self) -> DistillNets:
        return DistillNets(self.generator, self.critic, self.teacher, self.disc, self.cfg.disc_layers())

    # ---- one step -----------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.amp == "bf16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _optim_config(self, name: str):
        c = self.cfg
        return c.teacher.optim if self.stage == "teacher" else getattr(c.distill, name)

    def _update(self, name: str, params, max_norm: float) -> float:
        norm = D.grad_norm_clip_(params, max_norm)
        lr = self._optim_config(name).lr_at(self.step)
        for group in self.opts[name].param_groups:
            group["lr"] = lr
        self.opts[name].step()
        return norm

    def train_step(self) -> dict:
        """One step at `self.step`; returns logs (this rank's values)."""
        c, s = self.cfg, self.step
        rnd = StepRandom(c.seed, s, self.info.rank, self.info.world, self.info.device)
        latents, context = self.data.batch(s, c.batch_size, c.data.seed, self.info)
        logs: dict = {}
        if self.stage == "teacher":
            self.opts["generator"].zero_grad(set_to_none=True)
            with self._autocast():
                loss, lt = teacher_loss(self.generator, latents, context, c.teacher, rnd)
            loss.backward()
            logs.update(lt, grad_norm=self._update("generator", self.generator.parameters(), c.teacher.optim.grad_clip),
                        lr=c.teacher.optim.lr_at(s))
            if self.ema:
                self.ema.update(self.generator)
            return logs
        d, nets = c.distill, self.nets()
        if s % d.critic_ratio == 0:
            self.opts["generator"].zero_grad(set_to_none=True)
            with self._autocast():
                loss, lg = generator_loss(nets, context, d, self.num_chunks, rnd)
            loss.backward()
            logs.update(lg, grad_norm_g=self._update("generator", self.generator.parameters(), d.generator.grad_clip))
            if self.ema:
                self.ema.update(self.generator)
            elif self.ema_decay > 0 and s // d.critic_ratio + 1 >= d.ema_start:
                self.ema = Ema(self.generator, self.ema_decay)  # starts as a copy of the generator
        self.opts["critic"].zero_grad(set_to_none=True)
        self.opts["discriminator"].zero_grad(set_to_none=True)
        with self._autocast():
            flow_loss, disc_loss, lc = critic_losses(nets, context, d, self.num_chunks, rnd)
        (flow_loss if disc_loss is None else flow_loss + disc_loss).backward()
        logs.update(lc, grad_norm_c=self._update("critic", self.critic.parameters(), d.critic.grad_clip))
        if disc_loss is not None:
            D.average_grads_(self.disc, self.info)
            logs["grad_norm_d"] = self._update("discriminator", self.disc.parameters(), d.discriminator.grad_clip)
        return logs

    # ---- checkpoints ----------------------------------------------------------------------------
    def _state_file(self, step: int) -> Path:
        return self.dir / f"train_state_{step:08d}.pt"

    def save(self):
        """All ranks gather; rank 0 writes the state file, then the checkpoint that names it."""
        gen = D.full_state_dict(self.generator.model)
        critic = D.full_state_dict(self.critic.model) if self.critic is not None else None
        ema = self.ema.full_state_dict() if self.ema else None
        opts = {k: D.full_optimizer_state(o) for k, o in sorted(self.opts.items())}
        if self.info.is_main:
            state_file = self._state_file(self.step)
            atomic_write(state_file, lambda tmp: torch.save(
                {"step": self.step, "data_position": self.step * self.cfg.batch_size, "optimizers": opts,
                 "torch_rng": torch.get_rng_state()}, tmp))
            extra = {"step": self.step, "stage": self.stage, "state_file": state_file.name,
                     "world_size": self.info.world,
                     "model_config": self.mcfg.to_json(), "train_config": self.cfg.to_json()}
            if self.disc is not None:
                extra["discriminator"] = {k: v.detach().cpu().clone() for k, v in self.disc.state_dict().items()}
            save_checkpoint(self.dir / "checkpoint.pt", gen, critic, ema, extra=extra)
            for old in self.dir.glob("train_state_*.pt"):
                if old != state_file:
                    old.unlink()
        D.barrier(self.info)

    def _load_checkpoint(self) -> dict:
        path = self.dir / "checkpoint.pt"
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume to start the "
                                    f"{self.stage} stage")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("stage") != self.stage:
            raise ValueError(f"{path} is a {ckpt.get('stage')!r} checkpoint; expected {self.stage!r}")
        diff = resumable_diff(json.loads(ckpt["train_config"]), self.cfg.to_dict(), int(ckpt["step"]))
        if diff:
            raise ValueError(f"--resume with a config that changes {diff} from the one {path} was trained with; "
                             f"resume with the same config (only steps, save_every, log_every, and a learning-"
                             f"rate decay that starts at or after step {ckpt['step']}, may change)")
        return ckpt

    def _load_train_state(self, ckpt: dict):
        path = self.dir / ckpt["state_file"]
        if not path.exists():
            raise FileNotFoundError(f"checkpoint names {path.name} (optimizer state of step {ckpt['step']}) but "
                                    f"it is missing; cannot resume exactly")
        st = torch.load(path, map_location="cpu", weights_only=True)
        if st["step"] != ckpt["step"]:
            raise ValueError(f"{path.name} holds step {st['step']}, the checkpoint step {ckpt['step']}")
        for k, o in self.opts.items():
            D.load_optimizer_state(o, st["optimizers"][k])
        torch.set_rng_state(st["torch_rng"])
        self.step = int(ckpt["step"])

    # ---- the loop -----------------------------------------------------------------------------
    def _prepare_log(self) -> Path:
        """The log keeps only lines before the step we start from (a resumed run rewrites the rest)."""
        log = self.dir / "log.jsonl"
        if self.info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            lines = log.read_text().splitlines() if log.exists() else []
            kept = [ln for ln in lines if (_log_step(ln) if ln.strip() else None) is not None
                    and _log_step(ln) < self.step]  # a line half-written when a run was killed is dropped
            log.write_text("".join(ln + "\n" for ln in kept))
            cfg_json = {"model": self.mcfg.to_dict(), "train": self.cfg.to_dict(), "stage": self.stage}
            atomic_write(self.dir / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg_json, indent=2)))
        return log

    def train(self, total_steps: int) -> list[dict]:
        """Steps until `self.step == total_steps`; saves every `save_every` steps and at the end."""
        from tqdm import tqdm

        log = self._prepare_log()
        history = []
        window: dict = {}  # every key's latest value since the last log line
        bar = tqdm(total=total_steps, initial=self.step, desc=self.stage, disable=not self.progress,
                   dynamic_ncols=True)
        while self.step < total_steps:
            t0 = time.perf_counter()
            logs = self.train_step()
            logs = D.mean_across_ranks({k: float(v) for k, v in logs.items()}, self.info)
            entry = {"step": self.step, "stage": self.stage, **logs, "time_s": time.perf_counter() - t0}
            history.append(entry)
            window.update(logs)
            self.step += 1
            if self.step % self.cfg.log_every == 0 or self.step == total_steps:
                if self.info.is_main:  # the generator / discriminator values of their last update too
                    with log.open("a") as f:
                        f.write(json.dumps({**entry, **window}) + "\n")
                window = {}
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")})
            if self.step % self.cfg.save_every == 0 or self.step == total_steps:
                self.save()
        bar.close()
        return history


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    from asd_deploy.cli import add_quiet, positive_int

    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help="training recipe: a name (training/configs/NAME.json) or a "
                                                    "JSON file")
    p.add_argument("--config", default=None, help="model config preset overriding the recipe's (tiny, demo, small, "
                                                  "...); same as --set model=NAME")
    p.add_argument("--stage", choices=("teacher", "distill", "all"), help="default: the recipe's `stage`")
    p.add_argument("--out", help="output folder (default: out/train/<recipe name>)")
    p.add_argument("--max-steps", type=positive_int, help="total training steps of each stage run (default: the "
                                                          "recipe's)")
    p.add_argument("--steps", type=str, help=argparse.SUPPRESS)  # denoising steps elsewhere: refused here
    p.add_argument("--resume", action="store_true", help="continue from OUT/<stage>/checkpoint.pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set distill.alpha=0 (repeatable)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--prepare-data", action="store_true", help="only build the latent cache, then exit")
    add_quiet(p, old="--no-progress")
    return p.parse_args(argv)


def _check_vocabulary(args):
    """The words of the old CLI that now mean something else say what replaced them."""
    from asd_deploy.config import PRESETS

    if args.steps is not None:
        raise ValueError(f"--steps is the number of denoising steps in every asd-deploy tool; a training run's "
                         f"length is --max-steps (e.g. --max-steps {args.steps})")
    if args.config is not None and args.config not in PRESETS:
        raise ValueError(f"--config is a model config preset ({', '.join(sorted(PRESETS))}); "
                         f"{args.config!r} is not one. A training recipe is --recipe {args.config}")


def _main(args) -> int:
    _check_vocabulary(args)
    overrides = list(args.set) + ([f"stage={args.stage}"] if args.stage else []) + \
        ([f"model={args.config}"] if args.config else [])
    cfg = TrainConfig.load(args.recipe, overrides)
    out = Path(args.out or Path("out") / "train" / cfg.name)
    info = D.init(args.device)
    try:
        if args.prepare_data:
            data = LatentCache.for_config(cfg, out, info, progress=not args.quiet)
            if info.is_main:
                print(f"latent cache: {len(data)} samples, latents {list(data.latents.shape)}, "
                      f"context {list(data.context.shape)}")
            return 0
        for i, stage in enumerate(cfg.stages()):
            total = args.max_steps if args.max_steps is not None else getattr(cfg, stage).steps
            # `--stage all --resume`: a finished earlier stage is resumed as a no-op
            resume = args.resume or (i > 0 and (out / stage / "checkpoint.pt").exists())
            trainer = Trainer(cfg, stage, out, info, progress=not args.quiet).setup(resume=resume)
            hist = trainer.train(total)
            if info.is_main and hist:
                last = {k: round(v, 5) for k, v in hist[-1].items() if isinstance(v, float) and k.startswith("loss")}
                print(f"{stage}: step {trainer.step}/{total}, {last}; checkpoint {trainer.dir / 'checkpoint.pt'}",
                      file=sys.stderr)
            elif info.is_main:
                print(f"{stage}: already at step {trainer.step} >= --max-steps {total}; nothing to do "
                      f"(checkpoint {trainer.dir / 'checkpoint.pt'})", file=sys.stderr)
    finally:
        D.shutdown()
    return 0


def main(argv=None) -> int:
    from asd_deploy.cli import run_command

    return run_command(_main, parse_args(argv), interrupted="interrupted; the last saved checkpoint resumes with "
                                                            "--resume")


if __name__ == "__main__":
    sys.exit(main())
