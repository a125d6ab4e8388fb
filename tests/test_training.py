"""Training: teacher forcing and rollout semantics, gradient flow of every loss, learning, resume.

All at the `micro` preset (the tiny model at 32x32 pixels: 4 tokens per latent frame), fp32, CPU.
"""
import dataclasses
import json

import pytest
import torch

from asd_deploy.cache import KVCache
from asd_deploy.checkpoint import load_checkpoint
from asd_deploy.config import ConfigError, ModelConfig
from asd_deploy.generator import EagerStep, generate
from asd_deploy.model import build_model
from asd_deploy.schedule import Schedule
from training import losses as L
from training.config import TrainConfig, presets
from training.rollout import (BatchNoise, StepRandom, TrainNet, rollout, teacher_forcing_inputs,
                              teacher_forcing_mask)
from training.train import LatentCache, Trainer, main

from conftest import assert_close


def micro(**overrides) -> TrainConfig:
    return TrainConfig.load("micro", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def cfg():
    return micro()


@pytest.fixture(scope="module")
def mcfg(cfg):
    return cfg.model_config()


def _latents(mcfg, batch, chunks, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, mcfg.in_channels, chunks * mcfg.frames_per_chunk, mcfg.latent_height,
                       mcfg.latent_width, generator=g)


def _ctx(mcfg, batch, seed=0):
    return torch.randn(batch, mcfg.text_len, mcfg.text_dim, generator=torch.Generator().manual_seed(seed))


def _nets(cfg, alpha=None):
    """Generator and critic start from the teacher's weights, as in distillation."""
    mcfg = cfg.model_config()
    init = build_model(mcfg, seed=3).state_dict()

    def net(trainable):
        m = build_model(mcfg, seed=0)
        m.load_state_dict(init)
        return TrainNet(m).train(trainable).requires_grad_(trainable)

    disc = L.DiscHead(mcfg.dim * len(cfg.disc_layers()), cfg.distill.disc_hidden, cfg.distill.asd_max_steps, seed=1)
    return L.DistillNets(net(True), net(True), net(False), disc, cfg.disc_layers())


def _grads(module):
    return {k: p.grad for k, p in module.named_parameters()}


def _assert_no_grads(module, what):
    got = [k for k, g in _grads(module).items() if g is not None]
    assert not got, f"{what} must get no gradients; got some on {got[:5]}"


def _assert_all_grads(module, what):
    missing = [k for k, g in _grads(module).items() if g is None or not g.abs().sum() > 0]
    assert not missing, f"{what}: parameters without a non-zero gradient: {missing[:8]}"


# ---- semantics ---------------------------------------------------------------------------------


def test_explicit_positions_path_equals_forward_train(mcfg):
    net = TrainNet(build_model(mcfg, seed=1))
    x, t, ctx = _latents(mcfg, 2, 2, 0), torch.rand(2, 6) * 1000, _ctx(mcfg, 2)
    from asd_deploy.cache import attention_mask
    ref = net.model.forward_train(x, t, ctx)
    got = net(x, t, ctx, attention_mask(mcfg, 6), torch.arange(6))
    assert torch.equal(got, ref)


def test_teacher_forcing_equals_denoising_against_a_clean_cache():
    """Noisy chunk c in the [clean, noisy] sequence gets exactly the flow that inference computes
    for it against a cache of the clean chunks' keys, over 5 chunks: past tiny's 3-chunk window,
    so the sink / eviction semantics are checked too."""
    mcfg = ModelConfig.preset("tiny", height=32, width=32)
    net = TrainNet(build_model(mcfg, seed=2))
    n, fpc = 5, mcfg.frames_per_chunk
    clean, noisy = _latents(mcfg, 2, n, 1), _latents(mcfg, 2, n, 2)
    t_frames = (torch.rand(2, n) * 1000).repeat_interleave(fpc, 1)
    ctx = _ctx(mcfg, 2)
    with torch.no_grad():
        seq, t, pos = teacher_forcing_inputs(clean, noisy, t_frames)
        tf = net(seq, t, ctx, teacher_forcing_mask(mcfg, n), pos)[:, :, n * fpc:]
        ck, cv = net.cross_kv(ctx)
        cache = KVCache(mcfg, 2)
        for c in range(n):
            sl = slice(c * fpc, (c + 1) * fpc)
            flow, _, _ = net.step(noisy[:, :, sl], t_frames[:, sl], ck, cv, cache.k, cache.v, cache.frame_index,
                                  cache.cache_len)
            assert_close(tf[:, :, sl], flow, 1e-5, f"chunk {c}")
            assert_close(net.score(noisy, t_frames, ctx, clean)[:, :, sl], flow, 1e-5, f"score, chunk {c}")
            _, k, v = net.step(clean[:, :, sl], torch.zeros(2, fpc), ck, cv, cache.k, cache.v, cache.frame_index,
                               cache.cache_len)
            cache.append(k, v)


def test_one_step_rollout_is_the_inference_loop(mcfg):
    """The student's training rollout generates what `asd_deploy.generator.generate` does."""
    net = TrainNet(build_model(mcfg, seed=4))
    ctx = _ctx(mcfg, 1)
    with torch.no_grad():
        got = rollout(net, ctx, 3, 1, BatchNoise(seed=7))
    ref = torch.cat(list(generate(EagerStep(net.model), ctx, num_chunks=3, schedule=Schedule(steps=1), seed=7)), 2)
    assert_close(got, ref, 1e-5, "1-step rollout vs generate")


def test_rollout_noise_is_rank_independent(mcfg):
    """Rank r of a 2-way split draws rows [r] of the 2-sample draw: sample noise never depends on the split."""
    full = BatchNoise(5).randn(2, 3)
    assert torch.equal(torch.cat([BatchNoise(5, r, 2).randn(1, 3) for r in range(2)]), full)
    assert BatchNoise(5, 0, 2).randint(0, 9) == BatchNoise(5, 1, 2).randint(0, 9)


# ---- loss pieces ---------------------------------------------------------------------------------


def test_dmd_loss_gradient_is_the_normalized_score_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 2, 2, generator=g).requires_grad_()
    fake, real = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    loss, _ = L.dmd_loss(x, fake, real)
    loss.backward()
    want = (fake - real) / (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True) / x.numel()
    assert_close(x.grad, want, 1e-7, "dDMD/dx")


def test_rpgan_signs():
    """D wants real (n+1 steps) above fake (n steps); G wants its fake logit up."""
    d_fake = torch.zeros(3, requires_grad=True)
    d_real = torch.zeros(3, requires_grad=True)
    L.rpgan_d_loss(d_fake, d_real).backward()
    assert (d_fake.grad > 0).all() and (d_real.grad < 0).all()  # descent lowers D(fake), raises D(real)
    d_fake.grad = None
    L.rpgan_g_loss(d_fake, d_real.detach()).backward()
    assert (d_fake.grad < 0).all()  # descent raises D(fake)
    assert float(L.rpgan_d_loss(torch.tensor([-5.0]), torch.tensor([5.0]))) < 1e-4


def test_critic_timesteps_are_shifted_and_clamped(cfg):
    d = cfg.distill
    s = L.sample_sigmas(BatchNoise(0), 20000, shift=d.timestep_shift, min_t=d.min_timestep, max_t=d.max_timestep)
    assert s.min() == 0.02 and s.max() == 0.98
    assert 0.75 < float(s.median()) < 0.9  # shift 5 moves the median of U(0, 1) to 5/6


# ---- gradient flow ---------------------------------------------------------------------------------


def test_generator_loss_reaches_only_the_generator(cfg):
    nets = _nets(cfg)
    loss, logs = L.generator_loss(nets, _ctx(cfg.model_config(), 2), cfg.distill, 3, StepRandom(0, 0))
    loss.backward()
    assert "loss_asd" in logs and "loss_dmd" in logs
    _assert_all_grads(nets.generator, "generator")
    _assert_no_grads(nets.critic, "critic")
    _assert_no_grads(nets.teacher, "frozen teacher")
    _assert_no_grads(nets.disc, "discriminator")


@pytest.mark.parametrize("layout, features, layers", [("causal", "pooled", ()), ("teacher_forcing", "tokens", (0, 1))])
def test_asd_surrogate_gradient_equals_backprop_through_the_critic(cfg, layout, features, layers):
    """<x_n, dL_G/dx_n> gives the generator exactly the gradient of L_G backpropagated through
    critic and D (which that direct path would also, wrongly, accumulate into them); in either
    scoring layout, pooled or per-token D, one block or several."""
    from training.losses import _clean, add_noise, asd_pair, rpgan_g_loss, _score_timesteps
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, score_layout=layout,
                                                               disc_features=features, disc_layers=layers))
    ctx, d = _ctx(cfg.model_config(), 2), cfg.distill
    fpc, tokens = cfg.model_config().frames_per_chunk, features == "tokens"

    def feats(nets, x, t, clean):
        return nets.critic.features(x, t, ctx, nets.disc_layers, tokens=tokens, clean=clean)

    def direct(nets):
        noise = StepRandom(0, 0).stream("x")
        n, x_n, x_n1 = asd_pair(nets.generator, ctx, 3, d, noise, grad=True)
        sigma, eps, t = _score_timesteps(noise, x_n, d, fpc, n=1000)
        h_f = feats(nets, add_noise(x_n, eps, sigma), t, _clean(x_n, d))
        h_r = feats(nets, add_noise(x_n1, eps, sigma), t, _clean(x_n1, d)).detach()
        return rpgan_g_loss(nets.disc(h_f, n), nets.disc(h_r, n))

    def surrogate(nets):
        noise = StepRandom(0, 0).stream("x")
        n, x_n, x_n1 = asd_pair(nets.generator, ctx, 3, d, noise, grad=True)
        sigma, eps, t = _score_timesteps(noise, x_n, d, fpc, n=1000)
        leaf = x_n.detach().requires_grad_()
        h_f = feats(nets, add_noise(leaf, eps, sigma), t, _clean(leaf, d))
        with torch.no_grad():
            h_r = feats(nets, add_noise(x_n1, eps, sigma), t, _clean(x_n1, d))
        (g,) = torch.autograd.grad(rpgan_g_loss(nets.disc(h_f, n), nets.disc(h_r, n)), leaf)
        return (x_n * g).sum()

    a, b = _nets(cfg), _nets(cfg)
    direct(a).backward()
    surrogate(b).backward()
    for (k, p), q in zip(a.generator.named_parameters(), b.generator.parameters()):
        assert_close(q.grad, p.grad, 1e-6 * max(1.0, float(p.grad.abs().max())), f"grad of {k}")
    _assert_no_grads(b.critic, "critic (surrogate path)")


def test_asd_term_changes_the_generator_gradient(cfg):
    ctx = _ctx(cfg.model_config(), 2)
    grads = []
    for alpha in (0.0, 10.0):
        nets = _nets(cfg)
        d = micro(distill={**cfg.to_dict()["distill"], "alpha": alpha}).distill
        L.generator_loss(nets, ctx, d, 3, StepRandom(0, 0))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in nets.generator.parameters()]))
    assert (grads[1] - grads[0]).abs().max() > 1e-6 * grads[0].abs().max()


def test_critic_flow_loss_reaches_only_the_critic_and_disc_loss_only_the_head(cfg):
    ctx = _ctx(cfg.model_config(), 2)
    nets = _nets(cfg)
    flow, disc, logs = L.critic_losses(nets, ctx, cfg.distill, 3, StepRandom(0, 1))
    flow.backward(retain_graph=True)
    _assert_all_grads(nets.critic, "critic (flow loss)")
    for m, what in ((nets.generator, "generator"), (nets.teacher, "teacher"), (nets.disc, "discriminator")):
        _assert_no_grads(m, f"{what} (critic flow loss)")
    nets.critic.zero_grad(set_to_none=True)
    disc.backward()
    _assert_all_grads(nets.disc, "discriminator head")
    for m, what in ((nets.critic, "critic backbone"), (nets.generator, "generator"), (nets.teacher, "teacher")):
        _assert_no_grads(m, f"{what} (discriminator loss)")
    assert logs["r1"] > 0 and logs["r2"] > 0


def test_dmd_only_ablation_skips_asd(cfg):
    nets = _nets(cfg)
    d = micro(distill={**cfg.to_dict()["distill"], "alpha": 0.0}).distill
    ctx = _ctx(cfg.model_config(), 2)
    flow, disc, _ = L.critic_losses(nets, ctx, d, 3, StepRandom(0, 0))
    loss, logs = L.generator_loss(nets, ctx, d, 3, StepRandom(0, 0))
    assert disc is None and "loss_asd" not in logs
    loss.backward()
    _assert_all_grads(nets.generator, "generator (DMD only)")
    _assert_no_grads(nets.disc, "discriminator (DMD only)")


def test_teacher_loss_reaches_all_teacher_weights(cfg, mcfg):
    net = TrainNet(build_model(mcfg, seed=0)).train()
    loss, _ = L.teacher_loss(net, _latents(mcfg, 2, 3, 0), _ctx(mcfg, 2), cfg.teacher, StepRandom(0, 0))
    loss.backward()
    _assert_all_grads(net, "teacher (training)")


def test_first_chunk_weight_weighs_chunk_0_in_the_teacher_loss(cfg, mcfg):
    """teacher.first_chunk_weight w: the loss is (w * chunk 0's MSE + each later chunk's) / (w + n - 1)
    per frame; w = 1 is the plain mean, bit for bit."""
    fpc = mcfg.frames_per_chunk
    g = torch.Generator().manual_seed(3)
    pred, x0, eps = (torch.randn(2, 4, 3 * fpc, 2, 3, generator=g) for _ in range(3))
    per_frame = (pred - (eps - x0)).square().mean(dim=(0, 1, 3, 4))
    assert torch.equal(L.flow_matching_loss(pred, x0, eps, fpc, 1.0), L.flow_matching_loss(pred, x0, eps))
    w = torch.tensor([3.0] * fpc + [1.0] * 2 * fpc)
    assert_close(L.flow_matching_loss(pred, x0, eps, fpc, 3.0), (w * per_frame).sum() / w.sum(), 1e-6, "weighted")
    net = TrainNet(build_model(mcfg, seed=0)).train()
    lat, ctx = _latents(mcfg, 2, 3, 0), _ctx(mcfg, 2)
    plain, _ = L.teacher_loss(net, lat, ctx, cfg.teacher, StepRandom(0, 0))
    heavy, _ = L.teacher_loss(net, lat, ctx, dataclasses.replace(cfg.teacher, first_chunk_weight=3.0), StepRandom(0, 0))
    assert not torch.equal(plain, heavy)
    with pytest.raises(ConfigError, match="first_chunk_weight"):
        TrainConfig.load("micro", ["teacher.first_chunk_weight=0"])


def test_frame_noise_prob_draws_sigmas_per_frame_for_that_share(cfg, mcfg, monkeypatch):
    """teacher.frame_noise_prob p: a p share of the samples get one sigma per latent frame (not one per
    chunk); p = 0 draws nothing more, so the loss is the old one bit for bit."""
    fpc, seen = mcfg.frames_per_chunk, []
    real = L.add_noise
    monkeypatch.setattr(L, "add_noise", lambda x0, eps, sigma: seen.append(sigma) or real(x0, eps, sigma))
    net = TrainNet(build_model(mcfg, seed=0)).train()
    lat, ctx = _latents(mcfg, 64, 3, 0), _ctx(mcfg, 64)
    plain, _ = L.teacher_loss(net, lat, ctx, cfg.teacher, StepRandom(0, 0))
    mixed, _ = L.teacher_loss(net, lat, ctx, dataclasses.replace(cfg.teacher, frame_noise_prob=0.5), StepRandom(0, 0))
    every, _ = L.teacher_loss(net, lat, ctx, dataclasses.replace(cfg.teacher, frame_noise_prob=1.0), StepRandom(0, 0))
    per_chunk = lambda s: (s.view(s.shape[0], -1, fpc) == s.view(s.shape[0], -1, fpc)[..., :1]).all(dim=(1, 2))
    assert per_chunk(seen[0]).all() and not torch.equal(plain, mixed)
    assert 16 < int((~per_chunk(seen[1])).sum()) < 48      # about half of 64 samples per frame
    assert not per_chunk(seen[2]).any()
    with pytest.raises(ConfigError, match="frame_noise_prob"):
        TrainConfig.load("micro", ["teacher.frame_noise_prob=1.5"])


# ---- learning ----------------------------------------------------------------------------------------


def test_critic_flow_loss_decreases_on_fixed_data(cfg, mcfg):
    nets = _nets(cfg)
    with torch.no_grad():
        x = rollout(nets.generator, _ctx(mcfg, 2), 3, 2, BatchNoise(0))
    noise = BatchNoise(1)
    sigma, eps, t = L._score_timesteps(noise, x, cfg.distill, mcfg.frames_per_chunk, n=mcfg.num_train_timesteps)
    x_t, ctx = L.add_noise(x, eps, sigma), _ctx(mcfg, 2)
    opt = torch.optim.Adam(nets.critic.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = L.flow_matching_loss(nets.critic(x_t, t, ctx), x, eps)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], f"critic flow loss did not fall: {losses}"


def test_teacher_loss_decreases_on_fixed_data(cfg, mcfg):
    net = TrainNet(build_model(mcfg, seed=0)).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    lat, ctx = _latents(mcfg, 2, 3, 0), _ctx(mcfg, 2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss, _ = L.teacher_loss(net, lat, ctx, cfg.teacher, StepRandom(0, 0))  # same noise every step
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], f"teacher loss did not fall: {losses}"


# ---- trainer: checkpoints, resume, CLI ------------------------------------------------------------


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_checkpoint(a, b):
    for key in ("generator", "critic", "generator_ema", "discriminator"):
        assert (key in a) == (key in b), key
        if key in a:
            for k in a[key]:
                assert torch.equal(a[key][k], b[key][k]), f"{key}/{k} differs"
    assert a["step"] == b["step"]


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_resume_continues_identically(tmp_path, stage):
    """4 steps straight vs 2 steps, then `--resume` to 4: same parameters, optimizer effects, EMA,
    discriminator and losses (the generator trains at steps 0 and 2: critic_ratio 2)."""
    args = ["--recipe", "micro", "--stage", stage, "--quiet", "--set", 'distill.teacher="random"',
            "--set", "teacher.ema_decay=0.9"]
    main(args + ["--out", str(tmp_path / "a"), "--max-steps", "4"])
    main(args + ["--out", str(tmp_path / "b"), "--max-steps", "2"])
    main(args + ["--out", str(tmp_path / "b"), "--max-steps", "4", "--resume"])
    a, b = tmp_path / "a" / stage, tmp_path / "b" / stage
    _assert_same_checkpoint(_ckpt(a / "checkpoint.pt"), _ckpt(b / "checkpoint.pt"))
    la, lb = _log(a / "log.jsonl"), _log(b / "log.jsonl")
    assert [e["step"] for e in lb] == [0, 1, 2, 3]
    for ea, eb in zip(la, lb):
        assert {k: v for k, v in ea.items() if k != "time_s"} == {k: v for k, v in eb.items() if k != "time_s"}
    assert sorted(p.name for p in b.glob("train_state_*.pt")) == ["train_state_00000004.pt"]


def test_teacher_warm_start_takes_the_ema_weights_and_a_fresh_schedule(tmp_path):
    """teacher.init: a new run starts its generator and EMA from the given teacher's EMA weights
    at step 0 with a fresh optimizer, and trains from there (not from random weights)."""
    args = ["--recipe", "micro", "--stage", "teacher", "--quiet", "--set", "teacher.ema_decay=0.9"]
    main(args + ["--out", str(tmp_path / "a"), "--max-steps", "3"])
    first = _ckpt(tmp_path / "a" / "teacher" / "checkpoint.pt")
    init = str(tmp_path / "a" / "teacher" / "checkpoint.pt")
    main(args + ["--out", str(tmp_path / "b"), "--max-steps", "1", "--set", f"teacher.init={json.dumps(init)}",
                 "--set", "teacher.optim.lr=0"])
    warm = _ckpt(tmp_path / "b" / "teacher" / "checkpoint.pt")
    assert warm["step"] == 1
    assert not torch.equal(first["generator"][next(iter(first["generator"]))],
                           first["generator_ema"][next(iter(first["generator"]))])  # the two differ: the test sees which
    for k, v in first["generator_ema"].items():  # lr 0: the warm-started weights unchanged, both copies
        assert torch.equal(warm["generator"][k], v), k
        assert torch.equal(warm["generator_ema"][k], v), k
    assert _log(tmp_path / "b" / "teacher" / "log.jsonl")[0]["step"] == 0


def test_log_lines_carry_the_generator_and_discriminator_values(tmp_path):
    """With log_every 4 and the generator / D updated every 2nd / 3rd step, no logged step is one
    of their updates; each line still carries their latest values from its window (none from an
    earlier window), so a run's DMD, ASD and D losses can be read from its log."""
    main(["--recipe", "micro", "--stage", "distill", "--quiet", "--set", 'distill.teacher="random"',
          "--set", "log_every=4", "--set", "distill.disc_ratio=3", "--out", str(tmp_path), "--max-steps", "8"])
    log = _log(tmp_path / "distill" / "log.jsonl")
    assert [e["step"] for e in log] == [3, 7]
    for e in log:
        assert {"loss_critic", "loss_dmd", "loss_asd", "loss_disc"} <= set(e)
    assert log[0]["loss_dmd"] != log[1]["loss_dmd"]  # step 2's, then step 6's generator update


def test_distill_options_resume_identically_and_delay_the_ema(tmp_path):
    """The teacher-forcing score layout, a per-token D on two blocks, one exit per video and an
    EMA that starts at the 2nd generator update: resumable exactly; the EMA is absent before it
    starts (the checkpoint then serves the generator) and present after."""
    args = ["--recipe", "micro", "--stage", "distill", "--quiet", "--set", 'distill.teacher="random"',
            "--set", "distill.ema_start=2", "--set", 'distill.score_layout="teacher_forcing"',
            "--set", 'distill.disc_features="tokens"', "--set", "distill.disc_layers=[0, 1]",
            "--set", "distill.same_exit=true"]
    main(args + ["--out", str(tmp_path / "a"), "--max-steps", "4"])
    main(args + ["--out", str(tmp_path / "b"), "--max-steps", "2"])
    assert "generator_ema" not in _ckpt(tmp_path / "b" / "distill" / "checkpoint.pt")  # 1 update so far
    main(args + ["--out", str(tmp_path / "b"), "--max-steps", "4", "--resume"])
    a, b = _ckpt(tmp_path / "a" / "distill" / "checkpoint.pt"), _ckpt(tmp_path / "b" / "distill" / "checkpoint.pt")
    _assert_same_checkpoint(a, b)
    # started at the 2nd update (step 2) as a copy, never updated since: equal to the generator then
    assert "generator_ema" in a


@pytest.mark.parametrize("same", [False, True])
def test_exit_steps_per_chunk_or_per_video(monkeypatch, same):
    seen = []
    monkeypatch.setattr(L, "rollout", lambda net, ctx, n, steps, noise, exits, grad: seen.append(exits))
    d = TrainConfig.load("micro", [f"distill.same_exit={str(same).lower()}"]).distill
    for seed in range(20):
        L.dmd_rollout(None, None, 3, d, BatchNoise(seed), grad=False)
    uniform = [len(set(e)) == 1 for e in seen]
    assert all(uniform) if same else not all(uniform), seen


def _cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_to_overwrite(tmp_path, capsys):
    args = ["--recipe", "micro", "--stage", "teacher", "--quiet", "--out", str(tmp_path), "--max-steps", "1"]
    assert _cli(capsys, *args)[0] == 0
    code, err = _cli(capsys, *args)
    assert code == 2 and "exists; pass --resume" in err
    code, err = _cli(capsys, *args, "--resume", "--set", "teacher.optim.lr=0.5")
    assert code == 2 and "teacher.optim.lr" in err


def test_lr_schedule_is_stable_then_cosine_to_its_floor():
    from training.config import OptimConfig
    const = OptimConfig(lr=1e-3)
    assert {const.lr_at(s) for s in (0, 10, 10 ** 6)} == {1e-3}
    o = OptimConfig(lr=1e-3, decay_start=10, decay_end=30, final_lr_ratio=0.1)
    assert o.lr_at(0) == o.lr_at(10) == 1e-3
    assert o.lr_at(20) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert o.lr_at(30) == o.lr_at(500) == pytest.approx(1e-4)
    rates = [o.lr_at(s) for s in range(10, 31)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    for bad in (["teacher.optim.decay_start=30", "teacher.optim.decay_end=10"],
                ["teacher.optim.decay_end=10", "teacher.optim.final_lr_ratio=2"]):
        with pytest.raises(ConfigError, match="teacher.optim"):
            TrainConfig.load("micro", bad)


def test_a_decay_added_after_the_resume_step_resumes_exactly(tmp_path, capsys):
    """2 steps at constant lr, then --resume with a decay from step 2: equal to 4 steps with that
    decay from the start (the optimizer really runs at the scheduled rate: the logs show it). A decay
    that would have changed steps already taken is refused."""
    args = ["--recipe", "micro", "--stage", "teacher", "--quiet"]
    decay = ["--set", "teacher.optim.decay_start=2", "--set", "teacher.optim.decay_end=4"]
    main(args + decay + ["--out", str(tmp_path / "a"), "--max-steps", "4"])
    main(args + ["--out", str(tmp_path / "b"), "--max-steps", "2"])
    code, err = _cli(capsys, *args, "--set", "teacher.optim.decay_start=0", "--set", "teacher.optim.decay_end=4",
                     "--out", str(tmp_path / "b"), "--max-steps", "4", "--resume")
    assert code == 2 and "teacher.optim.decay_end" in err
    main(args + decay + ["--out", str(tmp_path / "b"), "--max-steps", "4", "--resume"])
    a, b = tmp_path / "a" / "teacher", tmp_path / "b" / "teacher"
    _assert_same_checkpoint(_ckpt(a / "checkpoint.pt"), _ckpt(b / "checkpoint.pt"))
    lr = TrainConfig.load("micro").teacher.optim.lr
    assert [e["lr"] for e in _log(b / "log.jsonl")] == pytest.approx([lr, lr, lr, lr * (0.05 + 0.95 * 0.5)])
    main(args + ["--out", str(tmp_path / "c"), "--max-steps", "4"])  # constant lr: another model
    ga, gc = _ckpt(a / "checkpoint.pt")["generator"], _ckpt(tmp_path / "c" / "teacher" / "checkpoint.pt")["generator"]
    assert any(not torch.equal(ga[k], gc[k]) for k in ga)


def test_resume_survives_a_half_written_log_line(tmp_path, capsys):
    """A run killed while appending to log.jsonl leaves a partial last line; --resume drops it."""
    args = ["--recipe", "micro", "--stage", "teacher", "--quiet", "--out", str(tmp_path)]
    assert _cli(capsys, *args, "--max-steps", "2")[0] == 0
    log = tmp_path / "teacher" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 2, "stage": "teach')
    code, err = _cli(capsys, *args, "--max-steps", "3", "--resume")
    assert code == 0, err
    assert [e["step"] for e in _log(log)] == [0, 1, 2]


@pytest.mark.parametrize("extra,needle", [
    (["--max-steps", "-5"], "argument --max-steps: expected a positive integer; got -5"),
    (["--max-steps", "0"], "expected a positive integer; got 0"),
])
def test_cli_usage_errors(tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        main(["--recipe", "micro", "--out", str(tmp_path), *extra])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "teacher").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--recipe", "nope"], "no training config 'nope'"),
    (["--recipe", "micro", "--steps", "5"], "length is --max-steps (e.g. --max-steps 5)"),
    (["--recipe", "micro", "--config", "micro"], "A training recipe is --recipe micro"),
    (["--recipe", "micro", "--set", "batch_size=many"], "batch_size"),
    (["--recipe", "micro", "--set", "distill.max_timestep=5000"], "<= 1000 (the model's num_train_timesteps)"),
    (["--recipe", "micro", "--stage", "distill", "--set", "distill.teacher=/nonexistent.pt"], "/nonexistent.pt"),
    (["--recipe", "micro", "--stage", "teacher", "--set", 'teacher.init="/nonexistent.pt"'], "teacher.init=/nonexistent.pt"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, extra, needle):
    code, err = _cli(capsys, *extra, "--out", str(tmp_path), "--quiet")
    assert code == 2 and err.startswith("error: ") and needle in err, err


def test_cli_old_spelling_of_quiet_still_works(tmp_path, capsys):
    code, err = _cli(capsys, "--recipe", "micro", "--stage", "teacher", "--no-progress", "--max-steps", "1",
                     "--out", str(tmp_path))
    assert code == 0 and "note: --no-progress is deprecated; use --quiet" in err


def test_checkpoints_load_as_self_forcing_files(tmp_path, cfg):
    """The distillation checkpoint is what export and the runtime read: generator_ema by default."""
    cfg2 = micro(distill={**cfg.to_dict()["distill"], "teacher": "random"}, stage="distill")
    tr = Trainer(cfg2, "distill", tmp_path, progress=False).setup()
    tr.train(1)
    path = tmp_path / "distill" / "checkpoint.pt"
    raw = _ckpt(path)
    assert all(k.startswith("model.") for k in raw["generator"]) and {"critic", "generator_ema"} <= set(raw)
    mcfg = ModelConfig.from_dict(json.loads(raw["model_config"]))
    for prefer, src in (("generator_ema", tr.ema.shadow), ("generator", dict(tr.generator.model.named_parameters()))):
        model = load_checkpoint(path, mcfg, prefer=prefer)
        for k, v in model.state_dict().items():
            assert torch.equal(v, src[k].detach()), f"{prefer}/{k}"


def test_presets_and_config_errors():
    assert {"micro", "tiny", "tiny-dmd", "small", "small-dmd"} <= set(presets())
    for name in presets():
        TrainConfig.load(name)
    assert TrainConfig.load("tiny-dmd").distill.alpha == 0
    assert TrainConfig.load("micro", ["distill.alpha=0", "data.num_samples=3"]).data.num_samples == 3
    with pytest.raises(ConfigError, match="valid keys here"):
        TrainConfig.load("micro", ["distill.alfa=0"])
    with pytest.raises(ConfigError, match="asd_max_steps"):
        TrainConfig.load("micro", ["distill.asd_max_steps=4"])
    with pytest.raises(ConfigError, match="valid presets"):
        TrainConfig.load("no-such-preset")
    with pytest.raises(ConfigError, match="asd_timestep_shift=0 must be > 0"):
        TrainConfig.load("micro", ["distill.asd_timestep_shift=0"])


def test_asd_pair_renoising_has_its_own_shift():
    """`distill.asd_timestep_shift` changes only the ASD pair's re-noising sigmas; the critic / DMD
    sigmas keep `timestep_shift`; None falls back to it."""
    d = TrainConfig.load("micro", ["distill.timestep_shift=5", "distill.asd_timestep_shift=1"]).distill
    x = torch.zeros(4000, 1, 1, 1, 1)
    dmd, _, _ = L._score_timesteps(BatchNoise(3), x, d, 1, n=1000)
    asd, _, _ = L._score_timesteps(BatchNoise(3), x, d, 1, asd=True, n=1000)
    assert dmd.median() > 0.75 and 0.4 < asd.median() < 0.6  # shift 5 vs shift 1 (uniform) medians
    fallback = TrainConfig.load("micro", ["distill.timestep_shift=5"]).distill
    assert torch.equal(L._score_timesteps(BatchNoise(3), x, fallback, 1, asd=True, n=1000)[0], dmd)


def test_random_latent_cache_batches(cfg):
    from training.distributed import DistInfo
    data = LatentCache.random(cfg)
    assert data.latents.shape == (8, 16, 9, 4, 4) and data.context.shape == (8, 32, 384)
    lat, ctx = data.batch(0, 4, 0, DistInfo())
    halves = [data.batch(0, 4, 0, DistInfo(rank=r, world=2)) for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), lat) and torch.equal(torch.cat([h[1] for h in halves]), ctx)
    seen = torch.cat([data.batch(s, 4, 0, DistInfo())[0] for s in range(2)])  # one epoch: every sample once
    assert len({tuple(x.flatten()[:4].tolist()) for x in seen}) == 8


def test_procedural_latent_cache(tmp_path):
    """Procedural videos -> VAE latents + prompt embeddings on disk, built once ."""
    from training.distributed import DistInfo
    cfg = micro(data={"source": "procedural", "num_samples": 3, "num_chunks": 1, "cache_dir": str(tmp_path / "c")})
    data = LatentCache.for_config(cfg, tmp_path, DistInfo(), progress=False)
    m = cfg.model_config()
    assert data.latents.shape == (3, m.in_channels, 3, m.latent_height, m.latent_width)
    assert data.context.shape == (3, m.text_len, m.text_dim) and len(data.captions) == 3
    assert torch.isfinite(data.latents).all() and data.context.abs().sum() > 0
    again = LatentCache.load(tmp_path / "c", LatentCache.key(cfg))  # no rebuild
    assert torch.equal(again.latents, data.latents)
    other = micro(data={"source": "procedural", "num_samples": 4, "num_chunks": 1, "cache_dir": str(tmp_path / "c")})
    with pytest.raises(ValueError, match="num_samples"):
        LatentCache.load(tmp_path / "c", LatentCache.key(other))
    # data.speed_scale enters the key only when set, so caches built before it still load
    assert "speed_scale" not in LatentCache.key(cfg)
    fast = micro(data={"source": "procedural", "num_samples": 3, "num_chunks": 1, "cache_dir": str(tmp_path / "c"),
                       "speed_scale": 2.0})
    with pytest.raises(ValueError, match="speed_scale"):
        LatentCache.load(tmp_path / "c", LatentCache.key(fast))
    # MiniLM's caches keep the key they had when "default" named MiniLM; the grammar encoder, which
    # took the name, gets its own, so an old cache is never read as the grammar encoder's
    enc = {n: LatentCache.key(micro(data={"source": "procedural", "text_encoder": n}))["text_encoder"]
           for n in ("minilm", "default")}
    assert enc == {"minilm": "default", "default": "grammar"}
    minilm = micro(data={"source": "procedural", "num_samples": 3, "num_chunks": 1, "cache_dir": str(tmp_path / "c"),
                         "text_encoder": "minilm"})
    with pytest.raises(ValueError, match="text_encoder"):
        LatentCache.load(tmp_path / "c", LatentCache.key(minilm))


def test_disc_ratio_trains_the_discriminator_every_nth_step(cfg):
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, disc_ratio=2, alpha=1.0))
    nets, ctx = _nets(cfg), _ctx(cfg.model_config(), 2)
    got = [L.critic_losses(nets, ctx, cfg.distill, 3, StepRandom(0, s))[1] is not None for s in range(4)]
    assert got == [True, False, True, False]


def test_network_timesteps_follow_the_model_config():
    """`num_train_timesteps` sets the timestep scale everywhere a network is called: the score
    timesteps, the teacher's inputs and the rollout (t = n * sigma, clamped in timestep units)."""
    from training.rollout import rollout

    d = TrainConfig.load("micro", ["distill.min_timestep=20", "distill.max_timestep=480"]).distill
    x = torch.zeros(256, 1, 2, 1, 1)
    sigma, _, t = L._score_timesteps(BatchNoise(3), x, d, 1, n=500)
    assert torch.equal(t, (500 * sigma)[:, None].expand(256, 2)) and t.max() <= 480 and t.min() >= 20
    cfg = TrainConfig.load("micro", ["model_overrides={\"num_train_timesteps\": 500}", "distill.max_timestep=480"])
    mcfg = cfg.model_config()
    seen = []

    class Spy(torch.nn.Module):
        config = mcfg

        def cross_kv(self, ctx):
            return torch.zeros(mcfg.cross_shape(ctx.shape[0])), torch.zeros(mcfg.cross_shape(ctx.shape[0]))

        def step(self, x, t, *rest):
            seen.append(t[0, 0].item())
            k = torch.zeros(mcfg.num_layers, x.shape[0], mcfg.tokens_per_chunk, mcfg.num_heads, mcfg.head_dim)
            return torch.zeros_like(x), k, k
    rollout(Spy(), torch.zeros(1, mcfg.text_len, mcfg.text_dim), 1, 2, BatchNoise(0))
    from asd_deploy.schedule import denoising_sigmas
    assert seen[:2] == pytest.approx([500 * s for s in denoising_sigmas(2)])


def test_ablation_scores_at_the_speed_the_teacher_learnt(tmp_path):
    """The real-video rows and the scorer use data.speed_scale of the teacher's run config.json
    (else the students', which must agree; 1 without any), in the layout training.train writes
    (`train.data`; test_recipe checks it against a config the trainer wrote)."""
    from training.ablation import data_speed_scale

    def run(name, speed):
        (tmp_path / name).mkdir()
        data = {} if speed is None else {"speed_scale": speed}
        (tmp_path / name / "config.json").write_text(json.dumps({"model": {}, "train": {"data": data}}))
        return tmp_path / name / "checkpoint.pt"

    t2, s1, s1b, s2, bare = run("t2", 2.0), run("s1", None), run("s1b", 1.0), run("s2", 2.0), tmp_path / "x.pt"
    assert data_speed_scale(t2, [s1]) == 2.0          # the teacher's wins
    assert data_speed_scale(None, [s2]) == 2.0
    assert data_speed_scale(None, [s1, s1b]) == 1.0   # absent means 1
    assert data_speed_scale(bare, []) == 1.0
    with pytest.raises(ValueError, match="different speeds"):
        data_speed_scale(None, [s1, s2])


def test_every_training_cli_answers_bad_input_in_one_line(tmp_path, capsys):
    """No training tool prints a traceback for a bad argument, file or folder."""
    import training.ablation
    import training.package
    import training.toybench
    import training.vae

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases = [
        (training.vae.main, ["--out", str(tmp_path / "v"), "--clip-frames", "2"], "clip_frames=2"),
        (training.vae.main, ["--out", str(tmp_path / "v"), "--arch", "huge"], "arch='huge'"),
        (training.ablation.main, ["--teacher", str(tmp_path / "junk.pt"), "--vae", str(tmp_path)],
         "has no config.json"),
        (training.package.main, ["--checkpoint", str(tmp_path / "none.pt"), "--vae", str(tmp_path), "--out",
                                 str(tmp_path / "m")], "config.json not found"),
        (training.toybench.main, ["--checkpoint", str(tmp_path / "junk.pt"), "--config", "tiny"], "cannot read"),
    ]
    for fn, args, needle in cases:
        assert fn(args) == 2, (fn.__module__, args)
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err, (fn.__module__, err)
    for args, needle in [(["--steps", "100"], "length is --max-steps (e.g. --max-steps 100)"),
                         (["--max-steps", "-5"], "expected a positive integer"),
                         (["--seed", "-1"], "expected an integer in [0, 2**63)"),
                         (["--speed-scale", "0"], "--speed-scale must be in (0, 4]"),
                         (["--compare", str(tmp_path)], "are not VAE folders (no config.json)")]:
        with pytest.raises(SystemExit) as e:
            training.vae.main(args)
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "v").exists() and not (tmp_path / "m").exists()
