"""What scripts/analysis/analyze_memories.py and scripts/analysis/analyze_attention.py share: loading a checkpoint (msformer_lm or
fairseq's transformer_lm) the way fairseq does, listing its layers scale by scale, sampling token sequences from a
split, projecting vectors onto the vocabulary through the output embedding, and drawing heatmaps.

A "layer" is one pre-norm Transformer layer (attention + FFN): an msformer TransformerBlock (at token level or at a
coarse scale, the bottom-up aggregation layer, or a retina layer) or a fairseq TransformerDecoderLayer. Every
element a layer runs on has a *ready position*, the last token its state may depend on (modules/scales.py): a token
is ready at itself, block j of scale s at ScaleGrid.ready(s). Triggers and attention distances are measured there.
"""
import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def fail(message: str):
    """Stop with one line on stderr, as the project's other tools do."""
    sys.exit(f"{os.path.basename(sys.argv[0]) or 'analysis'}: error: {message}")


def add_common_args(parser: argparse.ArgumentParser, split: str, sequences: int):
    parser.add_argument("checkpoint", help="a checkpoint written by fairseq-train (msformer_lm or transformer_lm)")
    parser.add_argument("data", help="the binarized corpus the model was trained on (e.g. data-bin/pydoc)")
    parser.add_argument("--out", help="folder for the report and figures (default: docs/analysis/<name>)")
    parser.add_argument("--name", help="model name in titles and the default --out (default: the checkpoint's folder)")
    parser.add_argument("--split", default=split, help="which split to sample sequences from (default: %(default)s)")
    parser.add_argument("--sequences", type=int, default=sequences, help="how many sequences to sample (default: %(default)s)")
    parser.add_argument("--length", type=int, help="tokens per sequence (default: the model's --tokens-per-sample)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="which sequences are sampled (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, 0: torch's default (default: %(default)s)")


def finish_common_args(opts):
    if not os.path.isfile(opts.checkpoint):
        fail(f"no checkpoint at {opts.checkpoint}")
    if not os.path.isfile(os.path.join(opts.data, "dict.txt")):
        fail(f"{opts.data} is not a binarized corpus (no dict.txt there)")
    if opts.sequences < 1 or opts.batch_size < 1:
        fail("--sequences and --batch-size must be >= 1")
    opts.name = opts.name or os.path.basename(os.path.dirname(os.path.abspath(opts.checkpoint)))
    opts.out = opts.out or os.path.join(REPO, "docs", "analysis", opts.name)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    return opts


# ---------------------------------------------------------------- the model
def load_checkpoint(checkpoint: str, data: str):
    """-> (model in eval mode, task), through fairseq's own loader with the data path overridden."""
    for name in ("fairseq", "fairseq_msformer", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import fairseq_msformer  # noqa: F401  (registers msformer_lm and the task the checkpoints name)
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data})
    return models[0].eval(), task


def is_msformer(model) -> bool:
    return hasattr(model.decoder, "body")


def family(model) -> str:
    from fairseq_msformer.models.bottom_up import BottomUp
    from fairseq_msformer.models.top_down import TopDown

    if not is_msformer(model):
        return "transformer_lm"
    body = model.decoder.body
    return "bottom_up" if isinstance(body, BottomUp) else "top_down" if isinstance(body, TopDown) else "retina"


def block_lengths(model) -> List[int]:
    """K_0 .. K_{S-1} (tokens per element of each scale); [1] for transformer_lm."""
    return model.decoder.grid.block_lengths if is_msformer(model) else [1]


def ready_positions(model, scale: int, n: int) -> torch.Tensor:
    """(n,) the last token position each of the first n elements of `scale` may depend on."""
    return model.decoder.grid.ready(scale, n) if is_msformer(model) else torch.arange(n)


@dataclass
class Layer:
    name: str     # "03 /16": forward order, then where it runs ("tokens", "/K", "aggregation")
    scale: int    # its queries' scale (0: tokens)
    module: torch.nn.Module  # TransformerBlock or fairseq TransformerDecoderLayer
    kind: str     # "self" (causal, one scale), "aggregation" (tokens + blocks), "retina", "fairseq"


def model_layers(model) -> List[Layer]:
    """Every layer of the model in the order the forward pass runs them."""
    kinds = {"transformer_lm": "fairseq", "retina": "retina"}
    fam = family(model)
    lengths = block_lengths(model)
    placed = []  # (scale, module, kind, where)

    def stack(scale, modules, kind="self"):
        placed.extend((scale, m, kind, "tokens" if scale == 0 else f"/{lengths[scale]}") for m in modules)

    if fam in ("transformer_lm", "retina"):
        stack(0, model.decoder.layers if fam == "transformer_lm" else model.decoder.body.layers, kinds[fam])
    elif fam == "bottom_up":
        body = model.decoder.body
        stack(0, body.token_layers_before.layers)
        for s, scale_stack in enumerate(body.scales, start=1):
            stack(s, scale_stack.layers)
        # with --bottom-up-combine residual the aggregation layer is a plain token layer (reads tokens only)
        placed.append((0, body.aggregate, "aggregation" if body.attend_blocks else "self", "aggregation"))
        stack(0, body.token_layers.layers)
    else:  # top_down: coarsest scale first
        for s in reversed(range(len(model.decoder.body.stacks))):
            stack(s, model.decoder.body.stacks[s].layers)
    return [Layer(f"{i:02d} {where}", scale, module, kind) for i, (scale, module, kind, where) in enumerate(placed)]


def vocabulary_scores(model, vectors: torch.Tensor) -> torch.Tensor:
    """(N, C) vectors -> (N, V) scores of every word, read through the output embedding as Geva et al. read value
    vectors (v . E, no final LayerNorm).

    With an adaptive softmax there is no single E: a head word scores head_w . v, a word of tail cluster c scores
    head_c . v + tail_w . (P_c v) (the cluster's logit plus the word's logit within it, P_c the cluster projection):
    the log-probability the adaptive softmax would give the word if v were the final state, without the per-cluster
    normalisers. That is linear in v, like v . E, so a vector's ranking does not depend on its norm.
    """
    decoder = model.decoder
    project_out = getattr(decoder, "project_out_dim", None)  # fairseq transformer_lm with a smaller output dim
    if project_out is not None:
        vectors = project_out(vectors)
    softmax = getattr(decoder, "adaptive_softmax", None)
    if softmax is None:
        return decoder.output_projection(vectors)  # (N, V)
    head = softmax.head(vectors)  # (N, cutoff_0 + clusters): head words, then one logit per tail cluster
    cutoff = softmax.cutoff
    parts = [head[:, : cutoff[0]]]
    for c, tail in enumerate(softmax.tail):
        parts.append(head[:, cutoff[0] + c, None] + tail(vectors))  # (N, cutoff[c+1] - cutoff[c])
    return torch.cat(parts, dim=1)  # (N, V)


# ---------------------------------------------------------------- the data
def sample_sequences(task, split: str, count: int, length: int, seed: int):
    """-> (dataset indices, tokens (N, length), next tokens (N, length)): `count` samples of the split, drawn at
    random among those at least `length` long (fairseq's language-modeling samples: source and target)."""
    task.load_dataset(split)
    dataset = task.dataset(split)
    eligible = [i for i in range(len(dataset)) if dataset.sizes[i] >= length]
    if not eligible:
        fail(f"no sample of {split} holds {length} tokens")
    generator = torch.Generator().manual_seed(seed)
    picked = sorted(eligible[i] for i in torch.randperm(len(eligible), generator=generator)[:count].tolist())
    tokens = torch.stack([dataset[i]["source"][:length] for i in picked])  # (N, T)
    targets = torch.stack([dataset[i]["target"][:length] for i in picked])
    return picked, tokens, targets


def model_length(model, task, length=None) -> int:
    """Tokens per analysed sequence: the training length by default, a multiple of the model's coarsest block."""
    length = length or task.args.tokens_per_sample
    grid = block_lengths(model)[-1]
    if length % grid:
        fail(f"--length {length} is not a multiple of the model's coarsest block ({grid})")
    return length


def load_and_sample(opts):
    """The start both analyses share: the checkpoint and `opts.sequences` samples of `opts.split` at the analysed
    length -> (model, task, dataset indices, tokens (N, T), next tokens (N, T)); sets opts.length, opts.sequences."""
    progress(f"loading {opts.checkpoint}")
    model, task = load_checkpoint(opts.checkpoint, opts.data)
    opts.length = model_length(model, task, opts.length)
    indices, tokens, targets = sample_sequences(task, opts.split, opts.sequences, opts.length, opts.seed)
    opts.sequences = len(tokens)
    return model, task, indices, tokens, targets


def words(dictionary, ids) -> List[str]:
    return [dictionary[int(i)] for i in ids]


# ---------------------------------------------------------------- figures
def heatmap(ax, matrix, row_labels, col_labels, title, fmt="{:.2f}", vmax=1.0):
    """One annotated heatmap (rows: layers, bottom layer first at the top)."""
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    for i in range(len(row_labels)):
        for j in range(len(col_labels)):
            value = matrix[i][j]
            if value != value:  # NaN: an empty cell
                continue
            ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=6.5,
                    color="white" if value < 0.6 * vmax else "black")
    return image


def progress(message: str):
    print(message, flush=True)
