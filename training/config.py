"""Training configuration: one `TrainConfig` (data, teacher stage, distillation stage) and its presets.

Owns: the dataclasses, their JSON form, the named presets (the files in `training/configs/`,
named by stem: `--recipe tiny` reads `training/configs/tiny.json`) and `--set key=value`
overrides. A config file lists only what differs from the defaults here. Does not own the model
architecture: `model` names an `asd_deploy.config.ModelConfig` preset and `model_overrides`
changes its fields (e.g. a smaller geometry for CI).

Steps: `teacher.steps` and `distill.steps` are totals, so `--resume` runs up to them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from asd_deploy.config import ConfigError, ModelConfig
from asd_deploy.schedule import MAX_STEPS

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = ("teacher", "distill")
# Fields that may change between a run and its resumption without changing what is computed.
RESUMABLE_CHANGES = ("teacher.steps", "distill.steps", "save_every", "log_every", "name", "stage")
# Learning-rate schedule fields: a change may resume if it leaves every step already taken alone.
SCHEDULE_FIELDS = ("decay_start", "decay_end", "final_lr_ratio")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 10.0  # max global grad norm; 0 disables clipping
    # Warmup-free "stable then decay": lr until step decay_start, then a cosine to
    # lr * final_lr_ratio at decay_end, flat after. decay_end = 0: constant lr.
    decay_start: int = 0
    decay_end: int = 0
    final_lr_ratio: float = 0.05

    def lr_at(self, step: int) -> float:
        """The learning rate of (0-based) training step `step`."""
        if self.decay_end <= 0 or step < self.decay_start:
            return self.lr
        frac = min(1.0, (step - self.decay_start) / (self.decay_end - self.decay_start))
        return self.lr * (self.final_lr_ratio + (1 - self.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    def check(self, where: str) -> None:
        if self.decay_end and not 0 <= self.decay_start < self.decay_end:
            raise ConfigError(f"{where}: decay from step {self.decay_start} to {self.decay_end} needs "
                              f"0 <= decay_start < decay_end (decay_end = 0: constant lr)")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ConfigError(f"{where}.final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")


@dataclass
class DataConfig:
    source: str = "random"      # "random": seeded random latents/contexts (tests); "procedural": LatentCache
    num_samples: int = 64
    num_chunks: int = 3         # latent chunks per training video (frames = num_chunks * frames_per_chunk)
    seed: int = 0
    cache_dir: str | None = None  # LatentCache folder; default <out>/latents
    vae: str = "tiny"           # "tiny" (random-weight Wan-layout VAE) or a diffusers AutoencoderKLWan folder
    text_encoder: str = "default"  # "default" (the shipped grammar encoder, 384-dim), "minilm" (all-MiniLM-
    #                                L6-v2; the `[train]` extra), a grammar encoder folder or a umT5 folder
    max_objects: int = 3        # procedural videos: shapes per video
    speed_scale: float = 1.0    # procedural videos: speeds are SPEED_RANGE times this


@dataclass
class TeacherConfig:
    """Flow matching with teacher forcing: noisy chunks attend to the clean keys of earlier chunks."""
    steps: int = 1000
    optim: OptimConfig = field(default_factory=OptimConfig)
    timestep_shift: float = 3.0   # training sigmas: shift(u), u ~ U(0, 1), one per chunk (diffusion forcing)
    prompt_dropout: float = 0.1   # probability of the null (all-zero) context: enables CFG
    ema_decay: float = 0.0        # 0: no EMA (the checkpoint then holds only `generator`)
    first_chunk_weight: float = 1.0  # loss weight of chunk 0 (the one only the text conditions) against 1
    #                                  for each later chunk; 1: the plain mean over all frames
    frame_noise_prob: float = 0.0  # share of samples whose sigmas are drawn per latent frame, not per chunk
    #                                (diffusion forcing per frame: a clean-ish frame 0 beside noisy frames 1-2
    #                                leaves the motion to the text); 0: per chunk only
    init: str | None = None       # warm start: a teacher checkpoint whose weights (its EMA when it has one)
    #                               start the generator and its EMA; fresh optimizer, step 0, this schedule


@dataclass
class DistillConfig:
    """DMD (Self-Forcing rollout) + alpha * ASD, from the teacher's weights."""
    steps: int = 1000
    teacher: str | None = None    # teacher checkpoint; None: <out>/teacher/checkpoint.pt; "random": seeded random
    generator: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-6, betas=(0.0, 0.999)))
    critic: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-7, betas=(0.0, 0.999)))
    discriminator: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, betas=(0.0, 0.999)))
    critic_ratio: int = 5         # critic updates per generator update (the generator trains when step % ratio == 0)
    disc_ratio: int = 1           # the ASD discriminator trains when step % disc_ratio == 0 (its n / n+1
    # rollout pair costs more than the critic's own update; critic_ratio gives D one update per G update)
    guidance_scale: float = 3.0   # CFG of the real score (teacher)
    dmd_steps: tuple[int, ...] = (4,)  # step counts the DMD rollout draws from (Self-Forcing: 4)
    timestep_shift: float = 5.0   # critic / DMD / ASD re-noising timesteps: shift(u), clamped below
    min_timestep: float = 20.0
    max_timestep: float = 980.0
    alpha: float = 10.0           # weight of L_ASD; 0 = DMD only (the ablation; the ASD rollouts are skipped)
    asd_max_steps: int = 3        # N: n ~ U{1..N}, compared with n + 1 <= 4 steps
    asd_timestep_shift: float | None = None  # shift of the n / n+1 pair's re-noising; None: timestep_shift.
    # At shift 5 most pairs are re-noised past sigma 0.8, where a ~20% difference between n- and
    # (n+1)-step samples is mostly buried in noise. (Alone it did not let D learn; see r1_gamma.)
    disc_layer: int | None = None  # critic block whose pooled output feeds D; None: (layers - 1) // 2
    disc_layers: tuple[int, ...] = ()  # several critic blocks (features concatenated); overrides disc_layer
    disc_features: str = "pooled"  # "pooled": D reads the mean over tokens; "tokens": D scores every
    # token and averages the logits (a patch discriminator: what separates an n- from an (n+1)-step
    # sample is local detail, which a mean over tokens washes out)
    disc_hidden: int = 256
    r1_gamma: float = 1.0         # R1 on the "real" (n+1)-step features: gamma / 2 * E|grad D|^2
    r2_gamma: float = 1.0         # R2 on the "fake" n-step features
    # (training/configs/default.json uses 0.01 for both: at 1.0 the tiny head's logits stayed within
    #  0.0025 of each other and its loss at ln 2 for 5000 steps; at 0.01 it separates the pair, seen here)
    ema_decay: float = 0.99
    ema_start: int = 0            # generator updates before the EMA starts (as a copy of the generator);
    # Self-Forcing starts it at 200, so the shipped EMA holds no teacher weights
    score_layout: str = "causal"  # how the teacher and the critic see a generated video when scoring it:
    # "causal": the whole video evenly noised under the block-causal mask (Self-Forcing, whose
    # teacher is bidirectional Wan); "teacher_forcing": [clean generated chunks, noisy chunks] with
    # each noisy chunk seeing the clean earlier ones, the layout our teacher is trained on and the
    # one inference runs (a cache of clean keys); each chunk then gets its own noise level
    same_exit: bool = False       # one exit step per video (Self-Forcing) instead of one per chunk


@dataclass
class TrainConfig:
    name: str = "custom"
    model: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    stage: str = "teacher"        # "teacher", "distill" or "all" (teacher then distill)
    batch_size: int = 2           # global: split evenly over ranks
    seed: int = 0
    amp: str | None = None        # None (fp32) or "bf16" (autocast; GPU)
    log_every: int = 1
    save_every: int = 100
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        self.validate()

    def validate(self):
        def bad(msg):
            raise ConfigError(f"training config {self.name!r}: {msg}")
        if self.stage not in STAGES + ("all",):
            bad(f"stage={self.stage!r}; valid: {list(STAGES) + ['all']}")
        if self.batch_size < 1:
            bad(f"batch_size={self.batch_size} must be >= 1")
        if self.amp not in (None, "bf16"):
            bad(f"amp={self.amp!r}; valid: null (fp32) or 'bf16'")
        if self.data.source not in ("random", "procedural"):
            bad(f"data.source={self.data.source!r}; valid: 'random', 'procedural'")
        d = self.distill
        if not 1 <= d.asd_max_steps <= MAX_STEPS - 1:
            bad(f"distill.asd_max_steps={d.asd_max_steps}: n + 1 must be a valid step count, so N is in "
                f"1..{MAX_STEPS - 1}")
        if not d.dmd_steps or any(not 1 <= s <= MAX_STEPS for s in d.dmd_steps):
            bad(f"distill.dmd_steps={list(d.dmd_steps)}: each in 1..{MAX_STEPS}")
        if d.asd_timestep_shift is not None and not d.asd_timestep_shift > 0:
            bad(f"distill.asd_timestep_shift={d.asd_timestep_shift} must be > 0 (or null: timestep_shift)")
        if d.critic_ratio < 1 or d.disc_ratio < 1:
            bad(f"distill.critic_ratio={d.critic_ratio} and disc_ratio={d.disc_ratio} must be >= 1")
        mcfg = self.model_config()
        n = mcfg.num_train_timesteps
        if not 0 <= d.min_timestep < d.max_timestep <= n:
            bad(f"distill timesteps [{d.min_timestep}, {d.max_timestep}] must satisfy 0 <= min < max <= {n} "
                f"(the model's num_train_timesteps)")
        if not 0 <= self.teacher.frame_noise_prob <= 1:
            bad(f"teacher.frame_noise_prob={self.teacher.frame_noise_prob} must be in [0, 1]")
        if not self.teacher.first_chunk_weight > 0:
            bad(f"teacher.first_chunk_weight={self.teacher.first_chunk_weight} must be > 0 (1: every chunk alike)")
        for what, decay in (("teacher", self.teacher.ema_decay), ("distill", d.ema_decay)):
            if not 0 <= decay < 1:
                bad(f"{what}.ema_decay={decay} must be in [0, 1)")
        for layer in ((d.disc_layer,) if d.disc_layer is not None else ()) + tuple(d.disc_layers):
            if not 0 <= layer < mcfg.num_layers:
                bad(f"distill disc layer {layer}; the model has {mcfg.num_layers} blocks (0..{mcfg.num_layers - 1})")
        if d.disc_features not in ("pooled", "tokens"):
            bad(f"distill.disc_features={d.disc_features!r}; valid: 'pooled', 'tokens'")
        if d.score_layout not in ("causal", "teacher_forcing"):
            bad(f"distill.score_layout={d.score_layout!r}; valid: 'causal', 'teacher_forcing'")
        if d.ema_start < 0:
            bad(f"distill.ema_start={d.ema_start} must be >= 0")
        for where, o in (("teacher.optim", self.teacher.optim), ("distill.generator", d.generator),
                         ("distill.critic", d.critic), ("distill.discriminator", d.discriminator)):
            o.check(f"training config {self.name!r}: {where}")

    # ---- derived ---------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        return ModelConfig.preset(self.model, **self.model_overrides)

    def stages(self) -> tuple[str, ...]:
        return STAGES if self.stage == "all" else (self.stage,)

    def disc_layers(self) -> tuple[int, ...]:
        """The critic blocks whose outputs feed the discriminator."""
        d = self.distill
        if d.disc_layers:
            return tuple(d.disc_layers)
        return (d.disc_layer if d.disc_layer is not None else (self.model_config().num_layers - 1) // 2,)

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists: the JSON form

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _build(cls, d, "")

    @classmethod
    def load(cls, name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
        """A preset name (training/configs/NAME.json) or a JSON file, then `key.sub=value` overrides."""
        path = Path(name_or_path)
        if not path.suffix and not path.exists():
            path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ConfigError(f"no training config {name_or_path!r}: not a file, and not a preset; valid "
                              f"presets: {presets()}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        d.setdefault("name", path.stem)
        for item in overrides:
            _apply_override(d, item)
        return cls.from_dict(d)


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _build(cls, d: dict, where: str):
    """Nested dataclass from a dict; unknown keys are errors that list the valid ones."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be an object; got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown keys {[where + k for k in unknown]}; valid keys here: {sorted(fields)}")
    kw = {}
    for k, v in d.items():
        sub = _NESTED.get((cls, k))
        if sub is not None:
            kw[k] = _build(sub, v, f"{where}{k}.")
        elif isinstance(v, list) and k not in ("model_overrides",):
            kw[k] = tuple(v)
        else:
            _check_type(fields[k], v, where + k)
            kw[k] = v
    return cls(**kw)


def _check_type(f: dataclasses.Field, v, key: str) -> None:
    """A scalar field takes a value of its default's type (an int where a float is expected is fine)."""
    want = type(f.default) if isinstance(f.default, (bool, int, float, str)) else None
    if want is None:
        return
    ok = (isinstance(v, bool) if want is bool else
          isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else
          isinstance(v, int) and not isinstance(v, bool) if want is int else isinstance(v, want))
    if not ok:
        raise ConfigError(f"{key} = {v!r} is a {type(v).__name__}; expected a {want.__name__} "
                          f"(e.g. {f.default!r})")


_NESTED = {(TrainConfig, "data"): DataConfig, (TrainConfig, "teacher"): TeacherConfig,
           (TrainConfig, "distill"): DistillConfig, (TeacherConfig, "optim"): OptimConfig,
           (DistillConfig, "generator"): OptimConfig, (DistillConfig, "critic"): OptimConfig,
           (DistillConfig, "discriminator"): OptimConfig}


def _apply_override(d: dict, item: str):
    """`distill.alpha=0`, `model_overrides={"height": 32}`: the value is JSON (bare words are strings)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. distill.alpha=0)")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    *parents, last = key.strip().split(".")
    node = d
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    node[last] = value


def optim_configs(d: dict) -> dict[str, OptimConfig]:
    """The optimizer configs of a config dict (as `TrainConfig.to_dict` writes it; missing keys take
    their defaults), by dotted prefix."""
    out = {}
    for sec, cls in (("teacher", TeacherConfig), ("distill", DistillConfig)):
        for k in ("optim",) if sec == "teacher" else ("generator", "critic", "discriminator"):
            base = dataclasses.asdict(getattr(cls(), k))
            given = {f: v for f, v in d.get(sec, {}).get(k, {}).items() if f in base}
            out[f"{sec}.{k}"] = _build(OptimConfig, {**base, **given}, f"{sec}.{k}.")
    return out


def resumable_diff(saved: dict, new: dict, step: int) -> list[str]:
    """Keys that differ between the config a checkpoint was trained with and `new` and that would
    change what the first `step` steps computed: not totals or logging, and not a learning-rate
    schedule that gives each of those steps the same rate."""
    diff = [k for k in config_diff(saved, new) if k not in RESUMABLE_CHANGES]
    old_o, new_o = optim_configs(saved), optim_configs(new)
    kept = []
    for k in diff:
        prefix, _, last = k.rpartition(".")
        if last in SCHEDULE_FIELDS and prefix in new_o:
            a, b = old_o[prefix], new_o[prefix]
            if all(a.lr_at(s) == b.lr_at(s) for s in _schedule_probe(a, b, step)):
                continue
        kept.append(k)
    return kept


def _schedule_probe(a: OptimConfig, b: OptimConfig, step: int) -> range:
    """Steps < `step` at which two schedules may differ (both are constant before their decay)."""
    first = min(x.decay_start if x.decay_end else step for x in (a, b))
    return range(first, step)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "model_overrides":
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
