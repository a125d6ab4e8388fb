"""The training objectives: teacher flow matching, DMD, the critic's flow matching, ASD (RpGAN + R1/R2).

Owns: the primitive losses, `DiscHead` (the ASD discriminator: an MLP on the critic's pooled
features, one logit per step count n) and the three objectives a training step assembles:
  - `teacher_loss`     -> the teacher (diffusion forcing with teacher forcing);
  - `critic_losses`    -> (critic flow loss -> the critic; discriminator loss -> `DiscHead` only);
  - `generator_loss`   -> the generator only: L_DMD + alpha * L_ASD.
Each returns loss tensors without calling backward; `train.py` steps the optimizers.
Does not own: rollouts and the network wrapper (`rollout.py`), optimizers (`train.py`).

Conventions (asd_deploy.schedule): x_t = (1 - s) x0 + s eps, flow v = eps - x0, t = n s with n the model
config's `num_train_timesteps` (1000 for Wan).

ASD signs. RpGAN: D maximises f(D(real) - D(fake)), G maximises f(D(fake) - D(real)), with
f(u) = -log(1 + exp(-u)) = -softplus(-u). Here "real" is the student's (n+1)-step output and
"fake" its n-step output, so
    L_D = softplus(D_n(x_n) - D_n(x_{n+1})) + r1/2 E|dD/dh(x_{n+1})|^2 + r2/2 E|dD/dh(x_n)|^2
    L_G = softplus(D_n(x_{n+1}) - D_n(x_n))
L_G reaches the generator through x_n only: x_{n+1} is the target the n-step output is pulled
toward (pulling it toward x_n would spend the extra step). D's input h is the critic's pooled
block feature; the critic backbone is never updated by these losses, so the gradient penalties
(R3GAN's R1/R2) are taken with respect to h. The generator's gradient through the critic is
taken with `torch.autograd.grad` onto a detached copy of x_n and applied as the surrogate
`<x_n, dL_G/dx_n>`: the critic and D accumulate nothing during a generator step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from asd_deploy.schedule import shift_sigma

from .config import DistillConfig, TeacherConfig
from .rollout import BatchNoise, StepRandom, TrainNet, rollout, teacher_forcing_inputs, teacher_forcing_mask

# ---------------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------------


def sample_sigmas(noise: BatchNoise, batch: int, *shape, shift: float, min_t: float = 0.0,
                  max_t: float | None = None, num_train_timesteps: int = 1000) -> torch.Tensor:
    """[batch, *shape] sigmas: u ~ U(0, 1), shifted (shift_sigma), timestep clamped to [min_t, max_t]."""
    u = noise.rand(batch, *shape)
    n = float(num_train_timesteps)  # timesteps are n * sigma; max_t defaults to n
    return (n * shift_sigma(u, shift)).clamp(min_t, n if max_t is None else max_t) / n


def _bcast(sigma: torch.Tensor) -> torch.Tensor:
    """[B] per sample or [B, F] per frame -> broadcastable to [B, C, F, H, W]."""
    return sigma.view(sigma.shape[0], 1, -1, 1, 1)


def add_noise(x0, eps, sigma):
    s = _bcast(sigma)
    return (1 - s) * x0 + s * eps


def flow_matching_loss(pred_flow, x0, eps, first_frames: int = 0, first_weight: float = 1.0) -> torch.Tensor:
    """MSE to the flow eps - x0 over [B, C, F, H, W]; with `first_weight` != 1 the first
    `first_frames` frames weigh that much against 1 for each later frame (a weighted mean)."""
    if first_weight == 1.0 or first_frames == 0:
        return F.mse_loss(pred_flow.float(), (eps - x0).float())
    per_frame = (pred_flow.float() - (eps - x0).float()).square().mean(dim=(0, 1, 3, 4))  # [F]
    w = torch.ones_like(per_frame)
    w[:first_frames] = first_weight
    return (w * per_frame).sum() / w.sum()


@torch.no_grad()
def dmd_target_grad(x, fake_x0, real_x0) -> torch.Tensor:
    """DMD's per-element direction (fake_x0 - real_x0) / mean|x - real_x0| (normalised per sample)."""
    normalizer = (x - real_x0).abs().float().mean(dim=(1, 2, 3, 4), keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0).float() / normalizer)


def dmd_loss(x, fake_x0, real_x0) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD's generator loss: grad = (fake_x0 - real_x0) / mean|x - real_x0| (per sample),
    loss = 0.5 * mse(x, (x - grad).detach()), whose gradient w.r.t. x is grad / numel."""
    grad = dmd_target_grad(x, fake_x0, real_x0)
    return 0.5 * F.mse_loss(x.float(), (x.float() - grad).detach()), grad.abs().mean()


def rpgan_d_loss(d_fake, d_real):
    return F.softplus(d_fake - d_real).mean()


def rpgan_g_loss(d_fake, d_real):
    return F.softplus(d_real - d_fake).mean()


def gradient_penalty(d_out: torch.Tensor, d_in: torch.Tensor) -> torch.Tensor:
    """E_b |d d_out[b] / d d_in[b]|^2 (samples independent), differentiable (create_graph)."""
    (g,) = torch.autograd.grad(d_out.sum(), d_in, create_graph=True)
    return g.float().square().sum(dim=tuple(range(1, g.ndim))).mean()


class DiscHead(nn.Module):
    """ASD discriminator: D_n(h) for n = 1..N -> [B]. h: pooled critic features [B, dim], or
    per-token features [B, T, dim] (each token scored, the logits averaged: a patch discriminator)."""

    def __init__(self, dim: int, hidden: int, num_steps: int, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # no output bias: the relativistic loss sees only D(x_n) - D(x_{n+1}), so it would get no gradient
            self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(),
                                     nn.Linear(hidden, num_steps, bias=False))

    def forward(self, h: torch.Tensor, n: int) -> torch.Tensor:
        logits = self.net(h.float())[..., n - 1]
        return logits.mean(dim=1) if logits.ndim == 2 else logits


# ---------------------------------------------------------------------------------------------
# teacher
# ---------------------------------------------------------------------------------------------


def teacher_loss(net: TrainNet, latents: torch.Tensor, context: torch.Tensor, cfg: TeacherConfig,
                 rnd: StepRandom) -> tuple[torch.Tensor, dict]:
    """Flow matching with per-chunk timesteps (diffusion forcing; per frame for a
    `cfg.frame_noise_prob` share of the samples) under teacher forcing: the sequence [clean chunks,
    noisy chunks], each noisy chunk seeing the clean earlier ones.
    latents [B, C, F, H, W] (clean, normalized), context [B, text_len, text_dim]."""
    mcfg = net.config
    b, frames = latents.shape[0], latents.shape[2]
    fpc = mcfg.frames_per_chunk
    if frames % fpc:
        raise ValueError(f"training latents need whole chunks of {fpc} frames; got F={frames}")
    noise = rnd.stream("teacher")
    sigma = sample_sigmas(noise, b, frames // fpc, shift=cfg.timestep_shift,
                          num_train_timesteps=mcfg.num_train_timesteps).repeat_interleave(fpc, 1)
    if cfg.frame_noise_prob > 0:  # drawn only then: a run without it keeps its random stream
        per_frame = sample_sigmas(noise, b, frames, shift=cfg.timestep_shift,
                                  num_train_timesteps=mcfg.num_train_timesteps)
        sigma = torch.where((noise.rand(b) < cfg.frame_noise_prob)[:, None], per_frame, sigma)
    eps = noise.randn(b, *latents.shape[1:])
    x_t = add_noise(latents, eps, sigma)
    drop = noise.rand(b) < cfg.prompt_dropout  # [B] -> the null context (CFG)
    ctx = torch.where(drop[:, None, None], torch.zeros_like(context), context)
    seq, t, positions = teacher_forcing_inputs(latents, x_t, mcfg.num_train_timesteps * sigma)
    mask = teacher_forcing_mask(mcfg, frames // fpc, latents.device)
    pred = net(seq, t, ctx, mask, positions)[:, :, frames:]
    loss = flow_matching_loss(pred, latents, eps, fpc, cfg.first_chunk_weight)
    return loss, {"loss": loss.detach(), "sigma": sigma.mean(), "dropped": drop.float().mean()}


# ---------------------------------------------------------------------------------------------
# distillation
# ---------------------------------------------------------------------------------------------


@dataclass
class DistillNets:
    generator: TrainNet
    critic: TrainNet        # the fake score; its backbone also feeds the discriminator
    teacher: TrainNet       # the real score, frozen
    disc: DiscHead
    disc_layers: tuple[int, ...]


def dmd_rollout(gen: TrainNet, context, num_chunks: int, cfg: DistillConfig, noise: BatchNoise, grad: bool):
    """Self-Forcing's training rollout: a step count from `cfg.dmd_steps`, an exit step per chunk
    (or one per video with `cfg.same_exit`; the same on all ranks); the exit step carries
    gradients when `grad`."""
    steps = cfg.dmd_steps[noise.randint(0, len(cfg.dmd_steps) - 1)]
    if cfg.same_exit:
        exits = [noise.randint(0, steps - 1)] * num_chunks
    else:
        exits = [noise.randint(0, steps - 1) for _ in range(num_chunks)]
    x = rollout(gen, context, num_chunks, steps, noise.child(), exits, grad)
    return x, {"dmd_steps": steps, "dmd_exit": sum(exits) / len(exits)}


def asd_pair(gen: TrainNet, context, num_chunks: int, cfg: DistillConfig, noise: BatchNoise, grad: bool):
    """n ~ U{1..N}; the student's n-step and (n+1)-step videos from the same initial noise.
    x_n carries gradients (its last step in every chunk) when `grad`; x_{n+1} never does."""
    n = noise.randint(1, cfg.asd_max_steps)
    seed = noise.seed()
    x_n = rollout(gen, context, num_chunks, n, noise.child(seed), grad=grad)
    with torch.no_grad():
        x_n1 = rollout(gen, context, num_chunks, n + 1, noise.child(seed))
    return n, x_n, x_n1


def _score_timesteps(noise: BatchNoise, x: torch.Tensor, cfg: DistillConfig, fpc: int, asd: bool = False, *,
                     n: int):
    """sigma (uniform, shifted, clamped), eps like x, and t [B, F] for the network. sigma is per
    sample [B] in the causal layout, per chunk [B, F] (repeated over a chunk's frames) in the
    teacher-forcing layout, where chunks are scored independently. `asd`: the re-noising of the
    n / n+1 pair, with its own shift (`cfg.asd_timestep_shift`). `n`: the model's num_train_timesteps
    (t = n * sigma)."""
    b, frames = x.shape[0], x.shape[2]
    shift = cfg.asd_timestep_shift if asd and cfg.asd_timestep_shift is not None else cfg.timestep_shift
    per_chunk = (frames // fpc,) if cfg.score_layout == "teacher_forcing" else ()
    sigma = sample_sigmas(noise, b, *per_chunk, shift=shift, min_t=cfg.min_timestep, max_t=cfg.max_timestep,
                          num_train_timesteps=n)
    if per_chunk:
        sigma = sigma.repeat_interleave(fpc, 1)
    eps = noise.randn(b, *x.shape[1:])
    t = (n * sigma)[:, None].expand(b, frames) if sigma.ndim == 1 else n * sigma
    return sigma, eps, t.contiguous()


def _clean(x: torch.Tensor, cfg: DistillConfig):
    """The clean context of the teacher-forcing layout (None in the causal layout)."""
    return x if cfg.score_layout == "teacher_forcing" else None


def _features(nets: DistillNets, x_t, t, context, cfg: DistillConfig, clean):
    return nets.critic.features(x_t, t, context, nets.disc_layers, tokens=cfg.disc_features == "tokens",
                                clean=clean)


def critic_losses(nets: DistillNets, context, cfg: DistillConfig, num_chunks: int, rnd: StepRandom):
    """(critic flow loss, discriminator loss or None, logs). Generator samples are drawn without
    grad; D reads critic features computed without grad, so each loss reaches one module."""
    noise = rnd.stream("critic")
    fpc, n_train = nets.generator.config.frames_per_chunk, nets.generator.config.num_train_timesteps
    with torch.no_grad():
        x, _ = dmd_rollout(nets.generator, context, num_chunks, cfg, noise, grad=False)
    sigma, eps, t = _score_timesteps(noise, x, cfg, fpc, n=n_train)
    pred = nets.critic.score(add_noise(x, eps, sigma), t, context, _clean(x, cfg))
    flow_loss = flow_matching_loss(pred, x, eps)
    logs = {"loss_critic": flow_loss.detach()}
    if cfg.alpha <= 0 or rnd.step % cfg.disc_ratio:
        return flow_loss, None, logs
    n, x_n, x_n1 = asd_pair(nets.generator, context, num_chunks, cfg, noise, grad=False)
    sigma, eps, t = _score_timesteps(noise, x_n, cfg, fpc, asd=True, n=n_train)
    with torch.no_grad():
        h_fake = _features(nets, add_noise(x_n, eps, sigma), t, context, cfg, _clean(x_n, cfg))
        h_real = _features(nets, add_noise(x_n1, eps, sigma), t, context, cfg, _clean(x_n1, cfg))
    h_fake.requires_grad_(True)
    h_real.requires_grad_(True)
    d_fake, d_real = nets.disc(h_fake, n), nets.disc(h_real, n)
    adv = rpgan_d_loss(d_fake, d_real)
    r1, r2 = gradient_penalty(d_real, h_real), gradient_penalty(d_fake, h_fake)
    disc_loss = adv + 0.5 * cfg.r1_gamma * r1 + 0.5 * cfg.r2_gamma * r2
    logs.update(loss_disc=adv.detach(), r1=r1.detach(), r2=r2.detach(), d_real=d_real.detach().mean(),
                d_fake=d_fake.detach().mean(), asd_n_critic=n)
    return flow_loss, disc_loss, logs


def generator_loss(nets: DistillNets, context, cfg: DistillConfig, num_chunks: int, rnd: StepRandom):
    """L_DMD + alpha * L_ASD for the generator; (loss, logs)."""
    noise = rnd.stream("generator")
    fpc, n_train = nets.generator.config.frames_per_chunk, nets.generator.config.num_train_timesteps
    x, logs = dmd_rollout(nets.generator, context, num_chunks, cfg, noise, grad=True)
    sigma, eps, t = _score_timesteps(noise, x, cfg, fpc, n=n_train)
    s = _bcast(sigma)
    with torch.no_grad():
        xd = x.detach()
        x_t = add_noise(xd, eps, sigma)
        clean = _clean(xd, cfg)
        fake_x0 = x_t - s * nets.critic.score(x_t, t, context, clean).float()
        both = nets.teacher.score(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                  torch.cat([context, torch.zeros_like(context)]),
                                  None if clean is None else torch.cat([clean, clean])).float()
        cond, uncond = both.chunk(2)
        real_x0 = x_t - s * (uncond + cfg.guidance_scale * (cond - uncond))
    l_dmd, grad_mag = dmd_loss(x, fake_x0, real_x0)
    loss = l_dmd
    logs = {**logs, "loss_dmd": l_dmd.detach(), "dmd_grad": grad_mag}
    if cfg.alpha > 0:
        n, x_n, x_n1 = asd_pair(nets.generator, context, num_chunks, cfg, noise, grad=True)
        sigma, eps, t = _score_timesteps(noise, x_n, cfg, fpc, asd=True, n=n_train)
        leaf = x_n.detach().requires_grad_(True)
        h_fake = _features(nets, add_noise(leaf, eps, sigma), t, context, cfg, _clean(leaf, cfg))
        with torch.no_grad():
            h_real = _features(nets, add_noise(x_n1, eps, sigma), t, context, cfg, _clean(x_n1, cfg))
        l_asd = rpgan_g_loss(nets.disc(h_fake, n), nets.disc(h_real, n))
        (g,) = torch.autograd.grad(l_asd, leaf)  # reaches x_n only: no critic / D parameter grads
        loss = loss + cfg.alpha * (x_n.float() * g.float()).sum()
        # Each term's gradient on one sample, as a mean square over its elements (alpha does not
        # transfer across model sizes: DMD is divided by the element count, ASD is a batch mean).
        # Per sample and a mean, so the log is the same whatever the number of ranks; the ratio of
        # the two norms is sqrt(asd_grad_ms / dmd_grad_ms).
        b, per_sample = x.shape[0], x[0].numel()
        dmd_g = dmd_target_grad(x, fake_x0, real_x0) / per_sample
        logs.update(loss_asd=l_asd.detach(), asd_n=n, asd_grad_ms=(cfg.alpha * b * g.float()).square().mean(),
                    dmd_grad_ms=dmd_g.square().mean())
    return loss, logs
