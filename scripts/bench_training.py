#!/usr/bin/env python
"""Benchmark training steps: msformer families against fairseq's transformer_lm (time and memory saved for backward).

The four LMs (same width, heads, FFN, vocabulary and total depth) are built by bench_generation.build, the way fairseq
builds them, then put in train mode (dropout 0, so deterministic; fp32, CPU). For each sample length T, on a batch of
random tokens, one training step is: decoder forward, cross-entropy loss of next-token prediction, backward.
  tokens/s   B * T / median of --repeats timed steps (after one warm-up step), the models taking turns (round-robin)
             so load from other processes falls on all of them alike;
  MiB saved  bytes of the tensors autograd saves for backward during the step, caught by
             torch.autograd.graph.saved_tensors_hooks, each storage counted once (by untyped_storage().data_ptr()),
             storages of parameters excluded (measured on the warm-up step).
"softmax+loss" is the output projection + log-softmax + loss alone (from detached features of width C), the part common
to all four models; its share is included in every model's figures.

  python scripts/bench_training.py [--lengths 512 1024 2048] [--repeats 2] [--batch-size 1] [--threads 1]
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generation import BASELINE, FAMILIES, MIB, build, fake_task, parse_args as generation_args  # noqa: E402

SOFTMAX = "softmax+loss"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048], help="sample lengths T")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per model and length (median reported)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size B")
    p.add_argument("--vocab", type=int, default=10000, help="vocabulary words (plus fairseq's 4 specials)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def saved_bytes(step, excluded):
    """Run step() and return the bytes of the distinct storages autograd saved, those in `excluded` left out."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in excluded:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def model_step(model, tokens):
    """Forward on tokens[:, :-1], cross-entropy against tokens[:, 1:], backward."""
    def step():
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])[0]
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()
    return step


def softmax_step(model, tokens, dim):
    """The common part alone: output projection + log-softmax + loss + backward, from features of width C."""
    features = torch.randn(tokens.size(0), tokens.size(1) - 1, dim, requires_grad=True)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model.decoder.output_layer(features)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()
    return step


def main(argv=None):
    opts = parse_args(argv)
    load = os.getloadavg()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model_opts = generation_args([])  # bench_generation's defaults: width, heads, FFN, depth, family layouts
    max_positions = max(opts.lengths) + 8
    task = fake_task(opts.vocab, max_positions)
    vocab = task.source_dictionary
    models, configs = {}, []
    for name in (BASELINE, *FAMILIES):
        torch.manual_seed(opts.seed)
        model, config = build(name, model_opts, task, max_positions)
        models[name] = model.train()
        configs.append(f"  {config}")
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={opts.batch_size}, "
          f"vocab={len(vocab)}, repeats={opts.repeats} (+1 warm-up) per length, fp32 CPU, train mode, dropout 0, "
          f"load avg at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\nmodels:\n" + "\n".join(configs), flush=True)

    names = [*models, SOFTMAX]
    speed, saved = {}, {}
    g = torch.Generator().manual_seed(opts.seed)
    wall = time.perf_counter()
    for length in opts.lengths:
        tokens = torch.randint(vocab.nspecial, len(vocab), (opts.batch_size, length + 1), generator=g)
        steps = {name: model_step(model, tokens) for name, model in models.items()}
        steps[SOFTMAX] = softmax_step(models[BASELINE], tokens, model_opts.dim)
        samples = {name: [] for name in names}
        for name in names:  # warm-up step, with the saved-tensor hooks
            model = models.get(name, models[BASELINE])
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            saved[name, length] = saved_bytes(steps[name], params)
        for _ in range(opts.repeats):
            for name in names:  # round-robin
                start = time.perf_counter()
                steps[name]()
                samples[name].append(time.perf_counter() - start)
        for name in names:
            speed[name, length] = opts.batch_size * length / statistics.median(samples[name])
        print(f"  T={length}: done ({time.perf_counter() - wall:.0f}s so far)", flush=True)

    header = "T".rjust(6) + " | " + " | ".join(f"{n:>23s}" for n in names)
    print(f"\ntraining step (forward + cross-entropy + backward, B={opts.batch_size}): "
          f"tokens/s (median of {opts.repeats}) | MiB saved for backward\n{header}\n" + "-" * len(header))
    for length in opts.lengths:
        print(f"{length:6d} | " + " | ".join(f"{speed[n, length]:11.0f} {saved[n, length] / MIB:11.1f}"
                                             for n in names))
    print("\nratios to transformer_lm: tokens/s (higher is faster) | MiB saved (lower is smaller)")
    for n in names[1:]:
        print(f"  {n:13s} " + "   ".join(
            f"T={L}: {speed[n, L] / speed[BASELINE, L]:5.2f}x | {saved[n, L] / saved[BASELINE, L]:4.2f}x"
            for L in opts.lengths))
    print(f"({SOFTMAX} is included in every model's figures; wall {time.perf_counter() - wall:.0f}s, "
          f"load avg at end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
