#!/usr/bin/env python
"""Benchmark one retina attention layer against dense causal self-attention (scripts/experiments/benchmark.py measures whole
models; this is its layer-level companion and shares its measuring code).

At each sample length T, self-attention of the same width runs forward + backward in four ways:

  retina (a)   RetinaAttention.self_attention, bounded last scale (default W=128 tokens, then 32 blocks of 4
               and 64 blocks of 16 tokens): the same number of keys per query at every T
  retina (b)   RetinaAttention.self_attention, unbounded last scale (W=128 tokens, 32 blocks of 4, then every
               older 16-token block): about W + T/16 keys per query
  sdpa-causal  MultiScaleAttention.self_attention: projections + F.scaled_dot_product_attention(is_causal=True)
  fairseq MHA  fairseq.modules.MultiheadAttention(self_attention=True) on x (T, B, C), with the float
               triu(-inf, 1) mask TransformerDecoder builds and need_weights=False (as TransformerDecoderLayer)

It prints the median fwd+bwd wall time and the MiB autograd saves for backward (each packed tensor's storage
counted once; parameters and buffers left out), the time growth per doubling of T, each retina's speed-up
over sdpa-causal, and PASS/MISS against the issue's targets for each retina configuration: its time grows at
most x2.2 per doubling of T (--max-growth), and it is >= 2x faster than sdpa-causal at T=4096 (--min-speedup).

--threads defaults to 1: the machine is small and shared, and with 2 threads every op waits for its slower
thread behind other processes' load, which makes small ops (retina has many) erratic.

  python scripts/experiments/bench_retina_attention.py
  python scripts/experiments/bench_retina_attention.py --profile 4096   # plus torch.profiler op tables of both retinas
"""
import argparse
import os
import statistics
import sys
import time
from collections import namedtuple
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from fairseq.modules import MultiheadAttention  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (the model-level benchmark; this script measures one attention layer)

from fairseq_msformer.modules import MultiScaleAttention, ScaleGrid  # noqa: E402
from fairseq_msformer.modules.retina_attention import RetinaAttention  # noqa: E402

MIB = benchmark.MIB
SDPA, MHA = "sdpa-causal", "fairseq MHA"
Method = namedtuple("Method", "name module run time_major")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dim", type=int, default=256, help="model width C")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="sample lengths T")
    p.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd runs per point (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed fwd+bwd runs before timing")
    p.add_argument("--window", type=int, default=128, help="retina: W, tokens read at full resolution")
    p.add_argument("--pool-factors", type=int, nargs="+", default=[4, 4], help="retina: scale grid r_1 .. r_{S-1}")
    p.add_argument("--bounded", type=int, nargs="+", default=[32, 64],
                   help="retina (a): blocks read per coarse scale, finest first")
    p.add_argument("--unbounded", type=int, nargs="+", default=[32, -1],
                   help="retina (b): blocks read per coarse scale, finest first (-1: all older blocks)")
    p.add_argument("--max-mha-length", type=int, default=4096,
                   help="skip fairseq MultiheadAttention above this T (its float T x T mask grows as T^2)")
    p.add_argument("--max-growth", type=float, default=2.2, help="target: retina time factor per doubling of T")
    p.add_argument("--min-speedup", type=float, default=2.0, help="target: retina speed-up over sdpa-causal")
    p.add_argument("--speedup-length", type=int, default=4096, help="T at which --min-speedup is checked")
    p.add_argument("--profile", type=int, nargs="*", default=None, metavar="T",
                   help="also profile both retinas (torch.profiler) at these T (no value: 4096)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.dim % a.heads:
        p.error(f"--dim {a.dim} is not divisible by --heads {a.heads}")
    for option, blocks in (("--bounded", a.bounded), ("--unbounded", a.unbounded)):
        if len(blocks) != len(a.pool_factors):
            p.error(f"{option} needs one value per coarse scale ({len(a.pool_factors)}), got {len(blocks)}")
    grid = ScaleGrid(a.pool_factors).grid
    bad = [t for t in a.lengths + (a.profile or []) if t % grid]
    if bad:
        p.error(f"lengths {bad}: retina needs multiples of the coarsest block ({grid} tokens)")
    if a.profile == []:
        a.profile = [4096]
    return a


def build_methods(a):
    margs = SimpleNamespace(decoder_embed_dim=a.dim, decoder_attention_heads=a.heads, attention_dropout=0.0,
                            pool_type="mean", decoder_learned_pos=False,
                            max_target_positions=max(a.lengths + (a.profile or [])))
    grid = ScaleGrid(a.pool_factors)
    methods = []
    for name, blocks in (("retina (a)", a.bounded), ("retina (b)", a.unbounded)):
        retina = RetinaAttention(margs, grid, a.window, blocks)
        methods.append(Method(name, retina, retina.self_attention, False))
    dense = MultiScaleAttention(a.dim, a.heads, 0.0)
    methods.append(Method(SDPA, dense, dense.self_attention, False))
    mha = MultiheadAttention(a.dim, a.heads, dropout=0.0, self_attention=True)
    masks = {}

    def fairseq_mha(x):
        t = x.size(0)
        if t not in masks:  # built once per length, as TransformerDecoder.buffered_future_mask does
            masks.clear()
            masks[t] = torch.triu(torch.full((t, t), float("-inf")), 1)
        return mha(query=x, key=x, value=x, attn_mask=masks[t], need_weights=False)[0]

    methods.append(Method(MHA, mha, fairseq_mha, True))
    return grid, methods


def describe(grid, window, blocks):
    scales = [f"all older {k}-token blocks" if n < 0 else f"{n} blocks of {k} tokens"
              for n, k in zip(blocks, grid.block_lengths[1:])]
    return f"W={window} tokens, then " + ", ".join(scales)


def make_input(method, a, t):
    torch.manual_seed(a.seed)
    shape = (t, a.batch, a.dim) if method.time_major else (a.batch, t, a.dim)
    return torch.randn(*shape, requires_grad=True)


def fwd_bwd(method, x):
    method.module.zero_grad(set_to_none=True)
    x.grad = None
    method.run(x).sum().backward()


def saved_bytes(method, x):
    """Bytes autograd keeps for backward (benchmark.saved_bytes); parameters and buffers excluded."""
    persistent = {t.untyped_storage().data_ptr() for t in [*method.module.parameters(), *method.module.buffers()]}
    method.module.zero_grad(set_to_none=True)
    return benchmark.saved_bytes(lambda: method.run(x).sum().backward(), persistent)


def keys_per_chunk(retina, t):
    """Keys each query chunk gathers, per chunk group of the module's layout (read from the module)."""
    return [group.flat_index.size(1) for group in retina.layout(t, torch.device("cpu")).groups]


def profile(method, a, t):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    x = make_input(method, a, t)
    fwd_bwd(method, x)  # warm: the layout is built and cached
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.repeats):
            fwd_bwd(method, x)
    print(f"\n{method.name} at T={t}: torch.profiler over {a.repeats} fwd+bwd, ops by self CPU time "
          f"(keys per chunk of Q={method.module.chunk}, per group: {keys_per_chunk(method.module, t)})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def print_table(header, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(" | ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)  # the same weights in every run
    grid, methods = build_methods(a)
    retinas = [m for m in methods if m.name.startswith("retina")]
    lengths = sorted(a.lengths)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load avg {os.getloadavg()[0]:.2f}; "
          f"dim {a.dim}, {a.heads} heads, batch {a.batch}; median of {a.repeats} fwd+bwd after {a.warmup} "
          f"warm-up, repeats interleaved across methods")
    for m, blocks in zip(retinas, (a.bounded, a.unbounded)):
        print(f"{m.name}: {describe(grid, a.window, blocks)}; query chunks of Q={m.module.chunk}")

    times = {m.name: {} for m in methods}
    mem = {m.name: {} for m in methods}
    for t in lengths:
        active = [m for m in methods if not (m.name == MHA and t > a.max_mha_length)]
        inputs = {m.name: make_input(m, a, t) for m in active}
        for m in active:
            mem[m.name][t] = saved_bytes(m, inputs[m.name])
            for _ in range(a.warmup):
                fwd_bwd(m, inputs[m.name])
        runs = {m.name: [] for m in active}
        for _ in range(a.repeats):  # interleaved, so that a burst of load hits every method alike
            for m in active:
                start = time.perf_counter()
                fwd_bwd(m, inputs[m.name])
                runs[m.name].append(time.perf_counter() - start)
        for m in active:
            times[m.name][t] = statistics.median(runs[m.name])
        print(f"  measured T={t}", file=sys.stderr, flush=True)

    names = [m.name for m in methods]
    print()
    print_table(["T"] + [f"{n} ms" for n in names] + [f"{n} MiB" for n in names],
                [[str(t)] + [f"{times[n][t] * 1e3:.1f}" if t in times[n] else "skipped" for n in names]
                 + [f"{mem[n][t] / MIB:.1f}" if t in mem[n] else "skipped" for n in names] for t in lengths])
    for m in retinas:
        print(f"{m.name} keys per query chunk, per chunk group: "
              + ", ".join(f"T={t} {keys_per_chunk(m.module, t)}" for t in lengths))

    print("\ntime growth when T doubles (T -> 2T):")
    growth = {n: {t: times[n][2 * t] / times[n][t] for t in lengths if t in times[n] and 2 * t in times[n]}
              for n in names}
    for n in names:
        mem_growth = [f"x{mem[n][2 * t] / mem[n][t]:.2f}" for t in lengths if t in mem[n] and 2 * t in mem[n]]
        print(f"  {n:<12s} time " + (", ".join(f"{t}->{2 * t}: x{g:.2f}" for t, g in growth[n].items()) or "n/a")
              + (f"   (saved bytes {', '.join(mem_growth)})" if mem_growth else ""))

    speedup = {}
    for n in (m.name for m in retinas):
        speedup[n] = {t: times[SDPA][t] / times[n][t] for t in lengths}
        print(f"\n{n} speed-up over {SDPA} ({SDPA} ms / {n} ms): "
              + ", ".join(f"T={t}: x{v:.2f}" for t, v in speedup[n].items()))
        print(f"{n} saved-bytes ratio vs {SDPA}: "
              + ", ".join(f"T={t}: x{mem[n][t] / mem[SDPA][t]:.2f}" for t in lengths))

    print("\ntargets:")
    for n in (m.name for m in retinas):
        for t, g in growth[n].items():
            print(f"  {'PASS' if g <= a.max_growth else 'MISS'}  {n} time {t}->{2 * t} grows x{g:.3f} "
                  f"(target <= x{a.max_growth}; {SDPA} x{growth[SDPA][t]:.2f})")
        if a.speedup_length in speedup[n]:
            v = speedup[n][a.speedup_length]
            print(f"  {'PASS' if v >= a.min_speedup else 'MISS'}  {n} speed-up over {SDPA} at "
                  f"T={a.speedup_length}: x{v:.3f} (target >= x{a.min_speedup})")
        else:
            print(f"  n/a   {n} speed-up: T={a.speedup_length} is not among --lengths")

    for t in a.profile or []:
        for m in retinas:
            profile(m, a, t)


if __name__ == "__main__":
    main()
