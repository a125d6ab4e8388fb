"""How close to the fp32 matmul peak can one chunk step get on this machine? A bound, measured.

    python -m benchmarks.ceiling [--config medium] [--repeats 5] [--out DIR]

The latency report gives what each backend achieves. This gives what the step's own kernels
allow, timed round-robin in one run on the step's exact shapes: every linear of the step as a
oneDNN linear on a prepacked weight (what AOTInductor's frozen graph calls) and as `torch.mm`
(MKL), and its two attentions (self over cache + chunk, cross over the text) with ATen's CPU
flash attention (`scaled_dot_product_attention`, what eager, torch.compile and AOTInductor call)
and with ONNX Runtime's opset-23 `Attention` kernel. Adding the fastest linear time and the
fastest attention time, with no norm, RoPE, modulation or copy in between, gives the shortest
step these kernels can make, and so the highest fraction of the peak any backend built on them
can report. Writes benchmarks/reports/<date>-<host>/ceiling-<config>.json and .md.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from asd_deploy.config import PRESETS, ModelConfig
from benchmarks.common import machine_info, onednn_linear, report_dir, time_interleaved, write_json
from benchmarks.latency import matmul_rates_gflops, step_flops


def step_linears(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """(M, K, N) of every linear in one chunk step with at least a chunk of rows (the per-frame
    time embedding, 3 rows, is left out: its FLOPs are negligible)."""
    m = cfg.tokens_per_chunk
    per_block = [(m, cfg.dim, cfg.dim)] * 6 + [(m, cfg.dim, cfg.ffn_dim), (m, cfg.ffn_dim, cfg.dim)]
    patch = (m, cfg.in_channels * cfg.patch_volume, cfg.dim)
    head = (m, cfg.dim, cfg.out_channels * cfg.patch_volume)
    return [patch] + per_block * cfg.num_layers + [head]


def step_attentions(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(Lq, Lk) of the step's attentions, each done once per block."""
    return {"self": (cfg.tokens_per_chunk, cfg.cache_tokens + cfg.tokens_per_chunk),
            "cross": (cfg.tokens_per_chunk, cfg.text_len)}


def ort_attention(heads: int, lq: int, lk: int, head_dim: int):
    """A one-node opset-23 `Attention` session on [1, H, L, D] inputs, or None without ORT."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    shape = lambda n: [1, heads, n, head_dim]  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Attention", ["Q", "K", "V"], ["Y"])], "attention",
        [helper.make_tensor_value_info("Q", TensorProto.FLOAT, shape(lq)),
         helper.make_tensor_value_info("K", TensorProto.FLOAT, shape(lk)),
         helper.make_tensor_value_info("V", TensorProto.FLOAT, shape(lk))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape(lq))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the ORT backend: no spinning
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def measure(cfg: ModelConfig, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kernels: dict[str, dict] = {}  # name -> {"fn", "count", "flops", "kind", "impl", "shape"}

    for (m, k, n), count in sorted(Counter(step_linears(cfg)).items()):
        x, w = rnd(m, k), rnd(n, k)
        flops = 2 * m * k * n
        kernels[f"linear {m}x{k}x{n} onednn"] = dict(fn=onednn_linear(x, w), count=count, flops=flops,
                                                   kind="linear", impl="onednn", shape=f"{m}x{k}x{n}")
        wt = w.t().contiguous()
        kernels[f"linear {m}x{k}x{n} torch.mm"] = dict(fn=lambda x=x, w=wt: x @ w, count=count, flops=flops,
                                                     kind="linear", impl="torch.mm", shape=f"{m}x{k}x{n}")
    h, d = cfg.num_heads, cfg.head_dim
    for name, (lq, lk) in step_attentions(cfg).items():
        q, k, v = rnd(1, h, lq, d), rnd(1, h, lk, d), rnd(1, h, lk, d)
        flops = 4 * h * lq * lk * d
        kernels[f"attention {name} {lq}x{lk} aten-sdpa"] = dict(
            fn=lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), count=cfg.num_layers, flops=flops,
            kind="attention", impl="aten-sdpa", shape=name)
        sess = ort_attention(h, lq, lk, d)
        if sess is not None:
            feed = {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy()}
            ref = F.scaled_dot_product_attention(q, k, v)
            err = (torch.from_numpy(sess.run(None, feed)[0]) - ref).abs().max().item()
            if err > 1e-4:
                raise RuntimeError(f"ORT Attention disagrees with SDPA at {name} (max abs error {err:.2e})")
            kernels[f"attention {name} {lq}x{lk} ort"] = dict(
                fn=lambda s=sess, f=feed: s.run(None, f), count=cfg.num_layers, flops=flops,
                kind="attention", impl="ort", shape=name)

    # round-robin in blocks of 5 calls: drift hits all alike, and ORT is not timed while torch's
    # OpenMP workers still spin from the kernel before (nor the other way round)
    t = time_interleaved({n: kn["fn"] for n, kn in kernels.items()}, repeats=repeats, warmup=2, block=5)
    return {n: {"kind": kn["kind"], "impl": kn["impl"], "shape": kn["shape"], "count_per_step": kn["count"],
                "gflop": kn["flops"] / 1e9,
                "median_s": t[n]["median"], "min_s": t[n]["min"], "gflops": kn["flops"] / t[n]["median"] / 1e9}
            for n, kn in kernels.items()}


def ceiling(rows: dict, flops_step: float, peak: float) -> dict:
    """Per kind (linear, attention) and library: seconds per step; then the bound: for every
    kernel shape its fastest library, summed (a backend may mix libraries shape by shape)."""
    per_impl: dict[str, float] = {}
    fastest: dict[tuple[str, str], tuple[float, str]] = {}
    for r in rows.values():
        s = r["count_per_step"] * r["median_s"]
        per_impl[f"{r['kind']} {r['impl']}"] = per_impl.get(f"{r['kind']} {r['impl']}", 0.0) + s
        key = (r["kind"], r["shape"])
        fastest[key] = min(fastest.get(key, (float("inf"), "")), (s, r["impl"]))
    best = {kind: sum(s for (k, _), (s, _) in fastest.items() if k == kind) for kind in ("linear", "attention")}
    seconds = sum(best.values())
    return {"per_step_s": per_impl, "best_s": best,
            "fastest_impl": {f"{k} {shape}": impl for (k, shape), (_, impl) in fastest.items()},
            "kernels_only_step_s": seconds, "kernels_only_gflops": flops_step / seconds / 1e9,
            "kernels_only_pct_of_peak": 100 * flops_step / seconds / 1e9 / peak}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="medium", choices=sorted(PRESETS))
    ap.add_argument("--repeats", type=int, default=5, help="round-robin turns (5 timed calls each)")
    ap.add_argument("--out", default=None, help="report folder (default benchmarks/reports/<date>-<host>)")
    args = ap.parse_args(argv)
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch build has no oneDNN: the ceiling is measured with its linears")
    cfg = PRESETS[args.config]
    rates = matmul_rates_gflops()
    peak = max(rates.values())
    flops = step_flops(cfg)
    rows = measure(cfg, args.repeats)
    res = {"config": cfg.name, "machine": machine_info(), "matmul_rates_gflops": rates, "matmul_peak_gflops": peak,
           "step_gflop": flops / 1e9, "kernels": rows, "ceiling": ceiling(rows, flops, peak),
           "command": "python -m benchmarks.ceiling " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(args.out) if args.out else report_dir()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"ceiling-{cfg.name}.json", res)
    c, m = res["ceiling"], res["machine"]
    lines = [f"# Step ceiling ({cfg.name}): the step's own kernels, nothing between them", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
             f"onnxruntime {m['onnxruntime']}. Command: `{res['command']}`", "",
             f"fp32 matmul peak: {peak:.1f} GFLOP/s (" + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
             + f"). One step: {flops / 1e9:.3f} GFLOP.", "",
             "| kernel | per step | GFLOP each | median (ms) | GFLOP/s | % of peak |", "|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['count_per_step']} | {r['gflop']:.4f} | {1e3 * r['median_s']:.3f} | "
                     f"{r['gflops']:.1f} | {100 * r['gflops'] / peak:.0f}% |")
    lines += ["", "| part of the step | time per step (ms) |", "|---|---|"]
    lines += [f"| {k} | {1e3 * s:.2f} |" for k, s in c["per_step_s"].items()]
    b = c["best_s"]
    lines += ["", f"Each kernel shape with its fastest library: linears {1e3 * b['linear']:.2f} ms + attention "
              f"{1e3 * b['attention']:.2f} ms = {1e3 * c['kernels_only_step_s']:.2f} ms per step: "
              f"{c['kernels_only_gflops']:.1f} GFLOP/s, **{c['kernels_only_pct_of_peak']:.0f}% of the peak**, "
              "the most a backend built on these kernels can reach (it also runs norms, RoPE, modulation and copies)."]
    (out / f"ceiling-{cfg.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out / f'ceiling-{cfg.name}.md'}")
    return res


if __name__ == "__main__":
    main()
