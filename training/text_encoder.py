"""`python -m training.text_encoder`: distil the default prompt encoder from all-MiniLM-L6-v2.

    python -m training.text_encoder --out asd_deploy/assets/text_encoder
        [--pool 16384] [--steps 6000] [--batch 64] [--lr 1e-3] [--dim 128] [--layers 3] [--heads 4]
        [--ff 512] [--text-len 32] [--seed 0] [--eval-prompts 512] [--quiet]

Owns: the prompts it learns from (`sample_prompts`: captions of the procedural grammar with one to
three objects, and their word prefixes, as partial prompts like "a red circle moving right"), the
vocabulary (the grammar's words and ",", ".", "the", each split into MiniLM's word pieces so the
outputs line up position by position), the distillation (a pool of `--pool` sampled prompts
encoded by MiniLM once, then MSE to its per-token last hidden states on the real tokens, in units
of each channel's spread) and the report in the output's
config.json: on `--eval-prompts` held-out sampled prompts and on 64 of `eval_prompts`, the
relative error and the worst per-token cosine. Does not own the network or its loading
(`asd_deploy.text.GrammarNet`, `GrammarTextEncoder`).

Why: MiniLM's files come from a PyPI package whose requirements pull ~205 MB (sentence-transformers,
scikit-learn, scipy) into every install; the small models here only ever read the grammar, so a
0.65-M-parameter encoder distilled on it (2.6 MB, torch only) serves them in MiniLM's place, and
training reads captions through it too (MiniLM, the `[train]` extra, is needed only to distil it
and for models trained before it); the output folder is written atomically.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from asd_deploy.checkpoint import atomic_dir
from asd_deploy.text import GRAMMAR_KIND, GrammarNet, GrammarTokenizer, MiniLMTextEncoder

from .data import BACKGROUNDS, DIRECTIONS, PALETTE, SHAPES, _sample_scene, eval_prompts, make_caption

EXTRA_WORDS = ("a", "an", "and", "moving", "on", "background", "the", ",", ".")


def vocabulary_words() -> list[str]:
    """Every word and punctuation mark of the grammar, as GrammarTokenizer splits them."""
    words = set(EXTRA_WORDS) | set(PALETTE) | set(SHAPES) | set(BACKGROUNDS)
    for d in DIRECTIONS:
        words |= set(GrammarTokenizer({}).split(d))
    return sorted(words)


def sample_prompts(rng: np.random.Generator, n: int) -> list[str]:
    """Captions with 1-3 objects (3/4 of them), else a prefix of one of at least two words."""
    out = []
    for _ in range(n):
        background, scene = _sample_scene(rng, int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])))
        caption = make_caption(background, [(c, s, DIRECTIONS[d]) for c, s, d in scene])
        if rng.random() < 0.25:
            words = caption.split()
            caption = " ".join(words[:int(rng.integers(2, len(words)))])
        out.append(caption)
    return out


def build_vocabulary(teacher: MiniLMTextEncoder) -> tuple[dict[str, list[int]], list[str]]:
    """word -> our piece ids (one per MiniLM word piece of it), and the pieces in id order."""
    pieces: list[str] = []
    words = {}
    for w in vocabulary_words():
        ids = []
        for piece in teacher.tokenizer.tokenize(w):
            if piece not in pieces:
                pieces.append(piece)
            ids.append(len(GrammarTokenizer.SPECIAL) + pieces.index(piece))
        words[w] = ids
    return words, pieces


def _batch(tok: GrammarTokenizer, prompts: list[str], L: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask, info = tok.batch(prompts, L)
    for p, (n, unknown) in zip(prompts, info):
        if unknown or n > L:
            raise ValueError(f"training prompt {p!r} is off the vocabulary ({unknown}) or longer than {L} tokens")
    return ids, mask


def _check_alignment(teacher: MiniLMTextEncoder, tok: GrammarTokenizer, prompts: list[str]) -> None:
    """Our token count must equal MiniLM's for every prompt, or the positions would not line up."""
    ours, theirs = [len(tok.ids(p)[0]) for p in prompts], teacher.count_tokens(prompts)
    bad = [(p, a, b) for p, a, b in zip(prompts, ours, theirs) if a != b]
    if bad:
        raise RuntimeError(f"the grammar tokenizer does not line up with MiniLM's: {bad[:3]}")


def evaluate(net: GrammarNet, teacher: MiniLMTextEncoder, tok: GrammarTokenizer, prompts: list[str], L: int) -> dict:
    """Relative error ||s - t|| / ||t|| over the real tokens and the worst per-token cosine."""
    ids, mask = _batch(tok, prompts, L)
    with torch.no_grad():
        s = net.eval()(ids, mask) * mask[..., None]
    t = teacher.encode(prompts)
    real = mask.bool()
    cos = torch.nn.functional.cosine_similarity(s[real], t[real], dim=-1)
    return {"prompts": len(prompts), "relative_error": float((s - t).norm() / t.norm()),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def distil(out: Path, steps: int = 6000, batch: int = 64, lr: float = 1e-3, dim: int = 128, layers: int = 3,
           heads: int = 4, ff: int = 512, text_len: int = 32, seed: int = 0, n_eval: int = 512, pool: int = 16384,
           log=print) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    teacher = MiniLMTextEncoder(text_len=text_len)
    words, pieces = build_vocabulary(teacher)
    tok = GrammarTokenizer(words)
    held_out = sample_prompts(np.random.default_rng([seed, 2]), n_eval)
    _check_alignment(teacher, tok, held_out + eval_prompts(64))
    t0 = time.perf_counter()
    prompts = sample_prompts(rng, pool)
    ids, mask = _batch(tok, prompts, text_len)
    targets = torch.cat([teacher.encode(prompts[i:i + 256]).half() for i in range(0, pool, 256)])  # [N, L, D]
    log(f"pool: {pool} prompts ({len(set(prompts))} distinct) encoded by MiniLM in {time.perf_counter() - t0:.0f} s")
    # the per-channel spread of the targets sets the loss units (and the output scale, as buffers)
    real = mask[:2048].bool()
    net = GrammarNet(len(GrammarTokenizer.SPECIAL) + len(pieces), text_len, dim, layers, heads, ff, teacher.text_dim)
    net.out_mean.copy_(targets[:2048][real].float().mean(0))
    net.out_std.copy_(targets[:2048][real].float().std(0).clamp_min(1e-3))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        pick = torch.randint(pool, (batch,), generator=g)
        target, m = targets[pick].float(), mask[pick][..., None].float()
        pred = net.train()(ids[pick], mask[pick])
        loss = (((pred - target) / net.out_std) ** 2 * m).sum() / (m.sum() * teacher.text_dim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            log(f"step {step}/{steps}: loss {loss.item():.5f} ({time.perf_counter() - t0:.0f} s)")
    report = {"held_out": evaluate(net, teacher, tok, held_out, text_len),
              "eval_prompts": evaluate(net, teacher, tok, eval_prompts(64), text_len),
              "pool": pool, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
              "seconds": round(time.perf_counter() - t0, 1)}
    meta = {"kind": GRAMMAR_KIND, "distilled_from": "all-MiniLM-L6-v2", "text_dim": teacher.text_dim,
            "positions": text_len, "dim": dim, "layers": layers, "heads": heads, "ff": ff, "pieces": len(pieces),
            "piece_names": pieces, "words": words, "report": report}

    def fill(tmp: Path):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            f.chmod(0o644)
    atomic_dir(out, fill)
    log(f"wrote {out}: held-out relative error {report['held_out']['relative_error']:.4f}, worst token cosine "
        f"{report['held_out']['cosine_min']:.4f}")
    return report


def main(argv=None) -> int:
    from asd_deploy.cli import positive_int, run_command

    p = argparse.ArgumentParser(prog="python -m training.text_encoder", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/text_encoder", help="output folder (the shipped one: "
                                                            "asd_deploy/assets/text_encoder)")
    p.add_argument("--pool", type=positive_int, default=16384, help="prompts encoded by MiniLM once, trained on")
    p.add_argument("--steps", type=positive_int, default=6000)
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=positive_int, default=128)
    p.add_argument("--layers", type=positive_int, default=3)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--ff", type=positive_int, default=512)
    p.add_argument("--text-len", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-prompts", type=positive_int, default=512, help="held-out captions in the report")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.dim % a.heads:
        p.error(f"--dim {a.dim} must be a multiple of --heads {a.heads}")

    def run(a):
        distil(Path(a.out), a.steps, a.batch, a.lr, a.dim, a.layers, a.heads, a.ff, a.text_len, a.seed,
               a.eval_prompts, a.pool, log=(lambda m: None) if a.quiet else print)
        return 0
    return run_command(run, a)


if __name__ == "__main__":
    raise SystemExit(main())
