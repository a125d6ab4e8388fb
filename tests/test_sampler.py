"""One sampler (`asd_deploy.generator.sample_chunks`) serves inference, the training rollout and
the teacher's guided sampler. Each is checked here against a plain, separately written loop of
what it computed before the three were merged: the same tensors within 1e-6."""
import pytest
import torch

from asd_deploy.cache import KVCache
from asd_deploy.generator import EagerStep, generate
from asd_deploy.model import build_model
from asd_deploy.schedule import Schedule, renoise, shift_sigma
from training.ablation import sample_teacher
from training.rollout import BatchNoise, TrainNet, rollout

from conftest import assert_close, rand_context


def _reference_inference(step, ctx, num_chunks, schedule, seed):
    """The inference loop, step by step: noise, denoise (x0, re-noise with fresh noise), clean pass."""
    cfg, b = step.config, ctx.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ck, cv = step.cross_kv(ctx)
    cache = KVCache(cfg, b)
    out = []
    for c in range(num_chunks):
        x = torch.randn(cfg.chunk_shape(b), generator=gen)
        sig = schedule.sigmas_for_chunk(c)
        for i in range(len(sig) - 1):
            t = torch.full((b, cfg.frames_per_chunk), 1000.0 * sig[i])
            flow, _, _ = step(x, t, ck, cv, cache.k, cache.v, cache.frame_index, cache.cache_len)
            x0 = x - sig[i] * flow
            if sig[i + 1] > 0:
                x = renoise(x0, torch.randn(x.shape, generator=gen), sig[i + 1])
        out.append(x0)
        _, k, v = step(x0, torch.zeros(b, cfg.frames_per_chunk), ck, cv, cache.k, cache.v, cache.frame_index,
                       cache.cache_len)
        cache.append(k, v)
    return torch.cat(out, 2)


def _reference_teacher(step, ctx, num_chunks, steps, guidance, seed, shift=5.0):
    """Euler with classifier-free guidance, one cache per branch (prompt, null context)."""
    cfg, b = step.config, ctx.shape[0]
    gen = torch.Generator().manual_seed(seed)
    branches = [(*step.cross_kv(c), KVCache(cfg, b)) for c in (ctx, torch.zeros_like(ctx))]
    sig = [shift_sigma(1 - i / steps, shift) for i in range(steps)] + [0.0]
    out = []
    for _ in range(num_chunks):
        x = torch.randn(cfg.chunk_shape(b), generator=gen)
        for s, s2 in zip(sig[:-1], sig[1:]):
            t = torch.full((b, cfg.frames_per_chunk), 1000.0 * s)
            vc, vu = [step(x, t, ck, cv, c.k, c.v, c.frame_index, c.cache_len)[0] for ck, cv, c in branches]
            x = x + (s2 - s) * (vu + guidance * (vc - vu))
        out.append(x)
        for ck, cv, c in branches:
            _, k, v = step(x, torch.zeros(b, cfg.frames_per_chunk), ck, cv, c.k, c.v, c.frame_index, c.cache_len)
            c.append(k, v)
    return torch.cat(out, 2)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("ffe", [False, True])
def test_inference_equals_the_reference_loop(tiny_cfg, steps, ffe):
    step, ctx = EagerStep(build_model(tiny_cfg, seed=1)), rand_context(tiny_cfg, batch=2)
    sched = Schedule(steps=steps, ffe=ffe)
    got = torch.cat(list(generate(step, ctx, num_chunks=5, schedule=sched, seed=3)), 2)  # through the window
    assert_close(got, _reference_inference(step, ctx, 5, sched, 3), 1e-6, f"{sched.describe()}")


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_training_rollout_is_the_inference_sampler(tiny_cfg, steps):
    """Without an early exit the rollout is inference with the rollout's noise; with exits each
    chunk stops at its step and yields that step's x0. Fed inference's noise order (one chunk's
    initial noise, then its re-noising draws), the rollout equals the reference loop."""
    model = build_model(tiny_cfg, seed=2)
    net, step, ctx = TrainNet(model).eval(), EagerStep(model), rand_context(tiny_cfg)

    class InferenceOrder(BatchNoise):
        """A BatchNoise whose draws replay the inference generator's order for seed 4."""
        def __init__(self):
            super().__init__(0)
            self.src = torch.Generator().manual_seed(4)
            self.first = True

        def randn(self, batch, *shape):
            if self.first:  # the rollout's up-front draw of every chunk's initial noise: defer it
                self.first = False
                return torch.zeros(batch, *shape)
            return torch.randn(batch, *shape, generator=self.src)

    # per chunk, the reference draws initial noise then steps - 1 re-noising draws; replay that
    noise = InferenceOrder()
    from training import rollout as R
    orig = R.RolloutNoise.initial
    R.RolloutNoise.initial = lambda self, c, shape: self.noise.randn(shape[0], *shape[1:])
    try:
        with torch.no_grad():
            got = rollout(net, ctx, 4, steps, noise)
    finally:
        R.RolloutNoise.initial = orig
    ref = _reference_inference(step, ctx, 4, Schedule(steps=steps), 4)
    assert_close(got, ref, 1e-6, f"rollout vs reference ({steps} steps)")
    # exits: chunk 0 stops at step 0 -> its x0 is the first step's prediction from the same noise
    if steps > 1:
        with torch.no_grad():
            early = rollout(net, ctx, 2, steps, BatchNoise(9), exit_steps=[0, steps - 1])
            one = rollout(net, ctx, 1, 1, BatchNoise(9))
        assert_close(early[:, :, :3], one, 1e-6, "exit at step 0 == 1-step chunk 0")


@pytest.mark.parametrize("steps, guidance", [(1, 1.0), (4, 3.0), (8, 2.0)])
def test_teacher_sampler_equals_two_branch_reference(tiny_cfg, steps, guidance):
    """Guidance runs both branches as one batch with one cache; the reference keeps two caches."""
    step, ctx = EagerStep(build_model(tiny_cfg, seed=5)), rand_context(tiny_cfg)
    got = sample_teacher(step, ctx, num_chunks=4, steps=steps, guidance=guidance, seed=6)
    assert_close(got, _reference_teacher(step, ctx, 4, steps, guidance, 6), 1e-5, f"teacher {steps} g={guidance}")


def test_rollout_gradient_reaches_only_the_exit_step(tiny_cfg):
    """With grad, each chunk's exit step carries gradients to the weights and the loss equals the
    no-grad rollout's; the result does not depend on grad."""
    net = TrainNet(build_model(tiny_cfg, seed=7))
    ctx = rand_context(tiny_cfg)
    with torch.no_grad():
        ref = rollout(net, ctx, 3, 2, BatchNoise(1), exit_steps=[1, 0, 1])
    x = rollout(net, ctx, 3, 2, BatchNoise(1), exit_steps=[1, 0, 1], grad=True)
    assert x.requires_grad
    assert_close(x.detach(), ref, 0, "grad vs no-grad rollout")
    x.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
