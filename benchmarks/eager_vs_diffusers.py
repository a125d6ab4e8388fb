"""Eager chunk-step latency of our causal DiT against diffusers' WanTransformer3DModel.

Same config, same weights (converted by `to_diffusers`), one chunk of 3 latent frames, fp32 on
this machine's CPU, measured side by side in one run. Three rows per config:
  - diffusers: bidirectional forward on the chunk (no cache);
  - ours forward_train: the same work (one chunk, its own keys only);
  - ours forward_step: the deployed step, one chunk against a full static cache (more keys).

    python -m benchmarks.eager_vs_diffusers [--configs tiny,small,medium] [--repeats 5]
"""
from __future__ import annotations

import argparse

import torch

from asd_deploy.cache import KVCache
from asd_deploy.checkpoint import to_diffusers_model
from asd_deploy.config import ModelConfig
from asd_deploy.model import build_model
from benchmarks.common import machine_info, report_dir, time_interleaved, write_json


def bench_config(name: str, repeats: int) -> dict:
    cfg = ModelConfig.preset(name)
    model = build_model(cfg, seed=0)
    ref = to_diffusers_model(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.chunk_shape(1), generator=g)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    t = torch.full((1, cfg.frames_per_chunk), 500.0)
    cache = KVCache(cfg)
    cache.cache_len.fill_(cfg.cache_tokens)  # a full cache: the steady-state step
    with torch.no_grad():
        ck, cv = model.cross_kv(ctx)
        rows = time_interleaved({
            "diffusers": lambda: ref(x, t[:, 0], ctx, return_dict=False),
            "ours_forward_train": lambda: model.forward_train(x, t, ctx),
            "ours_forward_step_full_cache": lambda: model.forward_step(x, t, ck, cv, cache.k, cache.v,
                                                                       cache.frame_index, cache.cache_len),
        }, repeats)
    base = rows["diffusers"]["median"]
    for r in rows.values():
        r["speedup_vs_diffusers"] = base / r["median"]
    return {"config": name, "tokens_per_chunk": cfg.tokens_per_chunk, "cache_tokens": cfg.cache_tokens,
            "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,small,medium")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    results = {"machine": machine_info(), "results": [bench_config(c, args.repeats) for c in args.configs.split(",")]}
    out = report_dir() / "eager_vs_diffusers.json"
    write_json(out, results)
    print(f"machine: {results['machine']['cpu']} ({results['machine']['cores']} cores), torch {torch.__version__}")
    print(f"{'config':8s} {'row':30s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'vs diffusers':>12s}")
    for r in results["results"]:
        for k, v in r["rows"].items():
            print(f"{r['config']:8s} {k:30s} {1e3 * v['median']:10.2f} {1e3 * v['min']:8.2f} "
                  f"{1e3 * v['max']:8.2f} {v['speedup_vs_diffusers']:11.2f}x")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
