#!/usr/bin/env python
"""Benchmark retina attention against dense causal self-attention (issue 3, item 2).

For each sample length T, three self-attention implementations of the same width run forward + backward:

  retina      fairseq_msformer.modules.retina_attention.RetinaAttention(...).self_attention(x), x (B, T, C)
  sdpa-causal q/k/v/out projections + F.scaled_dot_product_attention(is_causal=True)
              (fairseq_msformer.modules.MultiScaleAttention.self_attention)
  fairseq MHA fairseq.modules.MultiheadAttention(self_attention=True) with the float causal mask that
              fairseq's TransformerDecoder builds (triu(-inf, 1)), x (T, B, C), need_weights=False as in
              TransformerDecoderLayer

and the script prints the median fwd+bwd wall time and the bytes saved for backward (every tensor packed by
autograd during the forward, each storage counted once by its data pointer, at its storage size; module
parameters and buffers are left out, they live anyway). Then it checks the issue's targets:
retina's time grows about linearly (x <= --max-growth per doubling of T) and retina is >= --min-speedup x
faster than fused dense causal attention at --speedup-length.

  python scripts/bench_retina_attention.py                      # default: T = 1024 .. 8192
  python scripts/bench_retina_attention.py --profile 4096       # plus a per-stage breakdown of retina at T=4096
  python scripts/bench_retina_attention.py --threads 1           # steadier on a loaded machine
  python scripts/bench_retina_attention.py --candidate 4         # plus a candidate fix (a copy in this script)
"""
import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fairseq.modules import MultiheadAttention  # noqa: E402

from fairseq_msformer.modules import MultiScaleAttention, ScaleGrid  # noqa: E402
from fairseq_msformer.modules.retina_attention import RetinaAttention, retina_bounds  # noqa: E402

MIB = 2.0**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dim", type=int, default=256, help="model width C")
    p.add_argument("--heads", type=int, default=4, help="attention heads (head dim = dim / heads)")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="sample lengths T")
    p.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd runs per point (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed fwd+bwd runs before timing")
    p.add_argument("--window", type=int, default=128, help="retina: W, tokens read at full resolution")
    p.add_argument("--blocks", type=int, nargs="+", default=[32, -1],
                   help="retina: blocks read per coarse scale, finest first (-1 = all older ones)")
    p.add_argument("--pool-factors", type=int, nargs="+", default=[4, 4], help="retina: scale grid r_1 .. r_{S-1}")
    p.add_argument("--max-mha-length", type=int, default=4096,
                   help="skip fairseq MultiheadAttention above this T (its float T x T mask grows as T^2)")
    p.add_argument("--max-growth", type=float, default=2.2, help="target: retina time factor per doubling of T")
    p.add_argument("--min-speedup", type=float, default=2.0, help="target: retina speed-up over sdpa-causal")
    p.add_argument("--speedup-length", type=int, default=4096, help="T at which --min-speedup is checked")
    p.add_argument("--profile", type=int, nargs="*", default=None, metavar="T",
                   help="also time retina's stages at these T (default when given without values: 4096)")
    p.add_argument("--candidate", type=int, default=0, metavar="G",
                   help="also time a candidate fix of retina (a copy inside this script: strided-view gathers, "
                        "chunks split into G groups with their own key counts); 0 = off")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave the default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    grid = args.pool_factors
    k_last = 1
    for r in grid:
        k_last *= r
    if len(args.blocks) != len(grid):
        p.error(f"--blocks needs one value per coarse scale ({len(grid)}), got {len(args.blocks)}")
    bad = [t for t in args.lengths if t % k_last]
    if bad:
        p.error(f"--lengths {bad}: retina needs multiples of the coarsest block ({k_last} tokens)")
    if args.profile is not None and not args.profile:
        args.profile = [4096]
    return args


# ----------------------------------------------------------------------------------------------- methods
class Method:
    """A module plus how to feed it: make_input(T) -> x, run(x) -> output."""

    def __init__(self, name, module, make_input, run):
        self.name, self.module, self.make_input, self.run = name, module, make_input, run


def build_methods(a):
    dim, heads, bsz = a.dim, a.heads, a.batch
    max_len = max(a.lengths + (a.profile or []))
    margs = SimpleNamespace(decoder_embed_dim=dim, decoder_attention_heads=heads, attention_dropout=0.0,
                            pool_type="mean", max_target_positions=max_len, decoder_learned_pos=False)
    grid = ScaleGrid(a.pool_factors, "complete")
    retina = RetinaAttention(margs, grid, a.window, a.blocks)
    dense = MultiScaleAttention(dim, heads, 0.0)
    mha = MultiheadAttention(dim, heads, dropout=0.0, self_attention=True)

    def batch_major(t):
        return torch.randn(bsz, t, dim, requires_grad=True)

    def time_major(t):
        return torch.randn(t, bsz, dim, requires_grad=True)

    masks = {}

    def fairseq_mha(x):
        t = x.size(0)
        if t not in masks:  # as TransformerDecoder.buffered_future_mask builds it
            masks.clear()
            masks[t] = torch.triu(torch.zeros(t, t).fill_(float("-inf")), 1)
        out, _ = mha(query=x, key=x, value=x, attn_mask=masks[t], need_weights=False)
        return out

    candidates = {}

    def candidate(x):
        t = x.size(1)
        if t not in candidates:
            candidates.clear()
            candidates[t] = CandidateRetina(retina, t, a.candidate)
        return candidates[t](x)

    methods = [Method("retina", retina, batch_major, retina.self_attention)]
    if a.candidate:
        methods.append(Method("retina-cand", retina, batch_major, candidate))
    methods += [
        Method("sdpa-causal", dense, batch_major, dense.self_attention),
        Method("fairseq MHA", mha, time_major, fairseq_mha),
    ]
    return grid, retina, methods


# ------------------------------------------------------------------------- candidate fix (a copy, not the package)
def strided_windows(states, start: int, step: int, count: int, chunks: int):
    """(B, N, C) -> (B, chunks, count, C) view: row c holds states[start + c*step : ... + count], out of range = 0.

    The same keys as RetinaAttention's advanced-index gather, but as an unfold/expand view: the backward is
    unfold_backward (or a sum) instead of index_put_(accumulate=True).
    """
    bsz, n, dim = states.shape
    end = start + (chunks - 1) * step + count
    lo_pad, hi_pad = max(0, -start), max(0, end - n)
    if lo_pad or hi_pad:
        states = F.pad(states, (0, 0, lo_pad, hi_pad))
    s0 = start + lo_pad
    if step == 0:
        return states[:, s0:s0 + count].unsqueeze(1).expand(bsz, chunks, count, dim)
    return states[:, s0:s0 + (chunks - 1) * step + count].unfold(1, count, step).transpose(2, 3)


class CandidateRetina:
    """RetinaAttention.self_attention (same module, same weights, same keys and mask rule) with

    * strided windows instead of ``states[:, index]`` (whose backward is a serial index_put_ accumulate on CPU),
      and one copy (the cat) instead of three (index, reshape of a transposed view, cat);
    * query chunks split into ``groups`` runs of consecutive chunks, each gathering only as many keys per
      scale as its own queries can read (an unbounded last scale otherwise pads every chunk to T / K_{S-1}).

    Falls back to the module's own forward when the layout is not strided (then prints why).
    """

    def __init__(self, retina: RetinaAttention, length: int, groups: int):
        self.retina, self.length = retina, length
        lay = retina.layout(length, torch.device("cpu"))
        chunks, q_len = lay.num_chunks, lay.chunk
        ks = retina.grid.block_lengths
        t = torch.arange(chunks * q_len)
        bounds = retina_bounds(t, ks, retina.window, retina.blocks)
        old_masks = lay.mask.split([i.size(1) for i in lay.index], dim=2)
        c = torch.arange(chunks)
        self.ok, self.scales = True, []
        masks = []
        for s, (k, idx) in enumerate(zip(ks, lay.index)):
            count = idx.size(1)
            step = int(idx[-1, 0] - idx[-2, 0]) if chunks > 1 else 0
            start = int(idx[-1, 0]) - (chunks - 1) * step
            index = start + step * c.unsqueeze(1) + torch.arange(count)  # (C, L_s), may leave [0, N_s)
            j = index.unsqueeze(1)
            q_lo = bounds[s].view(chunks, q_len, 1)
            if s == 0:
                allowed = (q_lo <= j) & (j <= t.view(chunks, q_len, 1))
            else:
                allowed = (q_lo <= j * k) & ((j + 1) * k <= bounds[s - 1].view(chunks, q_len, 1))
            if not torch.equal(allowed.sum(2), old_masks[s].sum(2)):  # same keys per query (rule is the same)
                self.ok = False
            self.scales.append((start, step, count))
            masks.append(allowed)
        if not self.ok:
            print("candidate: layout is not strided; it falls back to RetinaAttention.self_attention")
            return
        # groups of consecutive chunks, each trimmed to the keys its queries can read (per scale)
        self.groups = []
        bounds_c = [int(round(g * chunks / groups)) for g in range(groups + 1)]
        for c0, c1 in zip(bounds_c[:-1], bounds_c[1:]):
            if c1 <= c0:
                continue
            plan, gmasks = [], []
            for (start, step, count), m in zip(self.scales, masks):
                used = m[c0:c1].any(1).any(0).nonzero()  # key slots any query of the group reads
                lo, hi = (int(used.min()), int(used.max()) + 1) if len(used) else (0, 1)
                plan.append((start + c0 * step + lo, step, hi - lo))
                gmasks.append(m[c0:c1, :, lo:hi])
            self.groups.append((c0, c1, plan, torch.cat(gmasks, dim=2)))

    def __call__(self, x):
        if not self.ok or x.size(1) != self.length:
            return self.retina.self_attention(x)
        r = self.retina
        bsz, length, dim = x.shape
        heads = r.attn.num_heads
        q_len = r.layout(length, x.device).chunk
        keys, values = r.scale_keys_values(x)
        chunks = sum(c1 - c0 for c0, c1, _, _ in self.groups)
        q_all = r.attn.q_proj(F.pad(x, (0, 0, 0, chunks * q_len - length)))
        q_all = q_all.view(bsz, chunks, q_len, heads, -1).transpose(2, 3)  # (B, C, H, Q, D)
        outs = []
        for c0, c1, plan, mask in self.groups:
            n = c1 - c0

            def gather(states_per_scale):
                parts = [strided_windows(st, start, step, count, n).unflatten(3, (heads, -1)).transpose(2, 3)
                         for st, (start, step, count) in zip(states_per_scale, plan)]  # (B, n, H, L_s, D)
                return torch.cat(parts, dim=3).flatten(0, 1)  # (B*n, H, L, D)

            q = q_all[:, c0:c1].flatten(0, 1)
            out = F.scaled_dot_product_attention(q, gather(keys), gather(values),
                                                 attn_mask=mask.unsqueeze(1).expand(bsz * n, 1, -1, -1)
                                                 if bsz == 1 else mask.unsqueeze(1).repeat(bsz, 1, 1, 1))
            outs.append(out.view(bsz, n, heads, q_len, -1))
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (B, C, H, Q, D)
        out = out.transpose(2, 3).reshape(bsz, chunks * q_len, dim)[:, :length]
        return r.attn.out_proj(out)


def check_candidate(retina, cand, a, length):
    """Largest |difference| of the outputs and of the input gradients, candidate vs the module."""
    torch.manual_seed(a.seed)
    x = torch.randn(a.batch, length, a.dim, requires_grad=True)
    ref = retina.self_attention(x)
    (g_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
    out = cand(x)
    (g,) = torch.autograd.grad(out.pow(2).sum(), x)
    return float((out - ref).detach().abs().max()), float((g - g_ref).abs().max() / g_ref.abs().max())


# ------------------------------------------------------------------------------------------- measuring
def fwd_bwd(method, x):
    method.module.zero_grad(set_to_none=True)
    x.grad = None
    method.run(x).sum().backward()


def time_fwd_bwd(method, x, warmup, repeats):
    for _ in range(warmup):
        fwd_bwd(method, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fwd_bwd(method, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) if times else None


def saved_bytes(method, x):
    """Bytes autograd keeps for backward: every packed tensor's storage, once; parameters/buffers excluded."""
    persistent = {t.untyped_storage().data_ptr()
                  for t in list(method.module.parameters()) + list(method.module.buffers())}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in persistent and ptr != 0:
            storages[ptr] = max(storages.get(ptr, 0), s.nbytes())
        return t

    method.module.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = method.run(x)
    out.sum().backward()  # also frees the graph
    return sum(storages.values())


def profile_retina(retina, a, length):
    """Median time of retina's stages (forward, then the whole backward) at T = length."""
    torch.manual_seed(a.seed)
    x = torch.randn(a.batch, length, a.dim, requires_grad=True)
    self = retina
    bsz, _, dim = x.shape
    stages = {}

    def stage(name, fn):
        start = time.perf_counter()
        result = fn()
        stages.setdefault(name, []).append(time.perf_counter() - start)
        return result

    for rep in range(a.warmup + a.repeats):
        if rep == a.warmup:
            stages.clear()
        retina.zero_grad(set_to_none=True)
        layout = stage("layout (cached)", lambda: self.layout(length, x.device))
        chunks, q_len, heads = layout.num_chunks, layout.chunk, self.attn.num_heads
        keys, values = stage("k/v proj + pool + pos", lambda: self.scale_keys_values(x))

        def gather(states, index):
            picked = states[:, index.clamp(0, states.size(1) - 1).flatten()]
            picked = picked.view(bsz, chunks, index.size(1), heads, -1).transpose(2, 3)
            return picked.reshape(bsz * chunks, heads, index.size(1), -1)

        k = stage("gather+cat k", lambda: torch.cat([gather(s, i) for s, i in zip(keys, layout.index)], dim=2))
        v = stage("gather+cat v", lambda: torch.cat([gather(s, i) for s, i in zip(values, layout.index)], dim=2))

        def query():
            q = self.attn.q_proj(F.pad(x, (0, 0, 0, chunks * q_len - length)))
            return q.view(bsz * chunks, q_len, heads, -1).transpose(1, 2)

        q = stage("q proj", query)
        mask = stage("mask repeat", lambda: layout.mask.unsqueeze(1).repeat(bsz, 1, 1, 1))
        out = stage("sdpa (masked)", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        out = stage("out proj", lambda: self.attn.out_proj(out.transpose(1, 2).reshape(bsz, chunks * q_len, dim)[:, :length]))
        stage("backward (all)", lambda: out.sum().backward())
    med = {name: statistics.median(ts) * 1e3 for name, ts in stages.items()}
    total = sum(med.values())
    lay = retina.layout(length, x.device)
    widths = [idx.size(1) for idx in lay.index]
    print(f"\nretina stages at T={length}: {lay.num_chunks} query chunks of Q={lay.chunk}, "
          f"L={sum(widths)} keys per chunk ({' + '.join(map(str, widths))} per scale), "
          f"mask {tuple(lay.mask.shape)} with {lay.mask.float().mean().item():.0%} allowed")
    for name, ms in med.items():
        print(f"  {name:<24s} {ms:8.2f} ms  {ms / total:5.1%}")
    print(f"  {'sum':<24s} {total:8.2f} ms")

    # the same SDPA shapes with and without the mask, forward + backward, to see what the mask costs
    qs = q.detach().requires_grad_()
    ks, vs = k.detach().requires_grad_(), v.detach().requires_grad_()
    for label, kwargs in (("sdpa fwd+bwd, bool mask", {"attn_mask": mask}),
                          ("sdpa fwd+bwd, float mask", {"attn_mask": torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))}),
                          ("sdpa fwd+bwd, no mask", {})):
        ts = []
        for rep in range(a.warmup + a.repeats):
            start = time.perf_counter()
            F.scaled_dot_product_attention(qs, ks, vs, **kwargs).sum().backward()
            ts.append(time.perf_counter() - start)
        print(f"  {label:<28s} {statistics.median(ts[a.warmup:]) * 1e3:8.2f} ms  (same (B*C, H, Q, L) shapes)")


# ----------------------------------------------------------------------------------------------- main
def fmt_ms(v):
    return "skipped" if v is None else f"{v * 1e3:.1f}"


def fmt_mib(v):
    return "skipped" if v is None else f"{v / MIB:.1f}"


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    grid, retina, methods = build_methods(a)
    lengths = sorted(a.lengths)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; dim {a.dim}, {a.heads} heads of "
          f"{a.dim // a.heads}, batch {a.batch}; median of {a.repeats} fwd+bwd after {a.warmup} warm-up, repeats interleaved across methods")
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if torch.get_num_threads() > 1 and load >= cpus - 0.5:
        print(f"note: load average {load:.1f} on {cpus} CPUs: other processes compete for the cores and every "
              f"multi-threaded op then waits for its slowest thread; op-heavy code (retina) suffers most. "
              f"--threads 1 gives steadier numbers.")
    print(f"retina: grid pool factors {a.pool_factors} (block lengths {grid.block_lengths}), window W={a.window} "
          f"tokens, blocks {a.blocks} (" + ", ".join(
              f"scale {s}: {'all older' if n < 0 else n} blocks of {k} tokens"
              for s, (n, k) in enumerate(zip(a.blocks, grid.block_lengths[1:]), start=1)) +
          f"), query chunk Q={retina.chunk}")
    if a.candidate:
        print(f"retina-cand: a copy of RetinaAttention.self_attention in this script (strided-view gathers, "
              f"{a.candidate} chunk group(s)), same weights; check vs the module:")
        for t in sorted(a.lengths):
            d_out, d_grad = check_candidate(retina, CandidateRetina(retina, t, a.candidate), a, t)
            print(f"  T={t}: max |out diff| {d_out:.1e}, max input-grad diff / max grad {d_grad:.1e}")

    times = {m.name: {} for m in methods}
    mem = {m.name: {} for m in methods}
    for t in lengths:
        active, inputs = [], {}
        for m in methods:
            if m.name == "fairseq MHA" and t > a.max_mha_length:
                times[m.name][t] = mem[m.name][t] = None
                continue
            torch.manual_seed(a.seed)
            inputs[m.name] = m.make_input(t)
            mem[m.name][t] = saved_bytes(m, inputs[m.name])
            time_fwd_bwd(m, inputs[m.name], a.warmup, 0)
            active.append(m)
        # repeats interleaved across methods, so that a burst of load on the machine hits all of them alike
        runs = {m.name: [] for m in active}
        for _ in range(a.repeats):
            for m in active:
                runs[m.name].append(time_fwd_bwd(m, inputs[m.name], 0, 1))
        for m in active:
            times[m.name][t] = statistics.median(runs[m.name])
        del inputs
        print(f"  measured T={t}", file=sys.stderr, flush=True)

    names = [m.name for m in methods]
    header = ["T"] + [f"{n} ms" for n in names] + [f"{n} MiB" for n in names]
    rows = [[str(t)] + [fmt_ms(times[n][t]) for n in names] + [fmt_mib(mem[n][t]) for n in names] for t in lengths]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = " | ".join
    print()
    print(line(h.rjust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(line(c.rjust(w) for c, w in zip(r, widths)))

    print("\ntime growth when T doubles (T -> 2T):")
    growth = {}
    for n in names:
        parts = []
        for t in lengths:
            if 2 * t in times[n] and times[n][t] is not None and times[n][2 * t] is not None:
                g = times[n][2 * t] / times[n][t]
                growth.setdefault(n, {})[t] = g
                parts.append(f"{t}->{2 * t}: x{g:.2f}")
        mem_parts = [f"x{mem[n][2 * t] / mem[n][t]:.2f}" for t in lengths
                     if 2 * t in mem[n] and mem[n][t] and mem[n][2 * t]]
        print(f"  {n:<12s} time " + (", ".join(parts) or "n/a") +
              (f"   (saved bytes " + ", ".join(mem_parts) + ")" if mem_parts else ""))

    retinas = [n for n in names if n.startswith("retina")]
    speedup = {}
    for n in retinas:
        print(f"\n{n} speed-up over fused dense causal (sdpa-causal ms / {n} ms):")
        speedup[n] = {t: times["sdpa-causal"][t] / times[n][t] for t in lengths}
        print("  " + ", ".join(f"T={t}: x{v:.2f}" for t, v in speedup[n].items()))
        print(f"{n} saved-bytes ratio vs sdpa-causal: " +
              ", ".join(f"T={t}: x{mem[n][t] / mem['sdpa-causal'][t]:.2f}" for t in lengths))

    print("\ntargets:")
    for n in retinas:
        for t, g in sorted(growth.get(n, {}).items()):
            print(f"  {'PASS' if g <= a.max_growth else 'MISS'}  {n} time {t}->{2 * t} grows x{g:.3f} "
                  f"(target <= x{a.max_growth}; sdpa-causal x{growth['sdpa-causal'][t]:.2f})")
        if a.speedup_length in speedup[n]:
            v = speedup[n][a.speedup_length]
            print(f"  {'PASS' if v >= a.min_speedup else 'MISS'}  {n} speed-up over sdpa-causal at "
                  f"T={a.speedup_length}: x{v:.3f} (target >= x{a.min_speedup})")
        else:
            print(f"  n/a   {n} speed-up target: T={a.speedup_length} not among --lengths")

    for t in a.profile or []:
        profile_retina(retina, a, t)


if __name__ == "__main__":
    main()
