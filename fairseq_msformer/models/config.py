"""Options of the msformer_lm model, and the checks that stop a bad combination before training starts."""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from fairseq import utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from ..errors import MsformerConfigError
from ..modules import POOL_TYPES, SHIFT_RULES, ScaleGrid

FAMILIES = ("bottom_up", "top_down", "retina")


@dataclass
class MsformerLMConfig(FairseqDataclass):
    family: ChoiceEnum(FAMILIES) = field(
        default="bottom_up", metadata={"help": "multi-scale architecture family (set by the --arch presets)"}
    )
    # --- the scales ---
    pool_factors: str = field(
        default="4,4",
        metadata={"help": "comma-separated pooling factors r_1,..,r_{S-1}, each >= 2; scale s has blocks of "
                          "K_s = r_1*..*r_s tokens, and inputs are padded internally to a multiple of K_{S-1}"},
    )
    scale_layers: str = field(
        default="4,4",
        metadata={"help": "bottom-up and top-down: comma-separated number of Transformer layers run at each coarse "
                          "scale (one entry per pooling factor, each >= 1); retina runs no coarse layers and ignores it"},
    )
    token_layers: int = field(
        default=2,
        metadata={"help": "token-level layers feeding the softmax (after the aggregation layer in bottom-up; "
                          "the finest stage of top-down)"},
    )
    token_layers_before_pooling: int = field(
        default=0,
        metadata={"help": "bottom-up only: token-level layers before the first pooling (the paper is described "
                          "with none; Hourglass found some essential)"},
    )
    pool_type: ChoiceEnum(POOL_TYPES) = field(
        default="mean", metadata={"help": "how r elements become one block: mean, max or linear (concat+project)"}
    )
    shift_rule: ChoiceEnum(SHIFT_RULES) = field(
        default="complete",
        metadata={"help": "causality rule: 'complete' reads a block once all its tokens are past; 'hourglass' "
                          "shifts right by r-1 before pooling (fresher blocks, also leak-free)"},
    )
    bottom_up_combine: ChoiceEnum(["attention", "residual", "both"]) = field(
        default="attention",
        metadata={"help": "bottom-up only: how the coarse scales reach the tokens: 'attention' (the aggregation "
                          "layer attends over tokens and every ready block, the paper's description), 'residual' "
                          "(Hourglass: each scale's newest ready block is upsampled, projected and added to the "
                          "token stream; the aggregation layer is then a plain token layer), or 'both'"},
    )
    top_down_combine: ChoiceEnum(["add", "concat"]) = field(
        default="add",
        metadata={"help": "top-down only: add the upsampled coarse states to the finer scale's pooled "
                          "embeddings, or concatenate and project"},
    )
    retina_windows: str = field(
        default="64,256,-1",
        metadata={"help": "retina only: how far back (in tokens) each scale reads, finest first: the first value "
                          "is the full-resolution window W, then one horizon per coarse scale, increasing; -1 as "
                          "the last value reads all older blocks. One group for all layers, or one group per "
                          "layer separated by ';' (e.g. '32,128,-1;32,128,-1;128,512,-1;128,512,-1')"},
    )
    retina_bucketed_window: bool = field(
        default=False,
        metadata={"help": "retina only: the full-resolution window starts one W-token bucket before the query's "
                          "own (W = the first --retina-windows value, a multiple of the first pooling factor), as in "
                          "local-attention with one bucket of look-back: a query reads its last W+1 .. 2W tokens "
                          "(instead of W .. W+K_1-1) and every query of a bucket reads the same older blocks"},
    )
    retina_gate: bool = field(
        default=False,
        metadata={"help": "retina only: read each scale with its own softmax and mix the scales' outputs with "
                          "per-head sigmoid gates computed from the query's input (NSA's gated branches); default: "
                          "one softmax over the keys of every scale"},
    )
    retina_select: int = field(
        default=0,
        metadata={"help": "retina only: (with --retina-gate) each query also reads, at full resolution, this many "
                          "blocks of the coarsest scale that lie wholly before its window, those whose pooled keys "
                          "its query scores highest (NSA's selected blocks: one more gated branch); 0: none"},
    )
    no_retina_recompute: bool = field(
        default=False,
        metadata={"help": "retina only: keep for backward what training otherwise computes again there: each "
                          "query chunk's gathered keys/values and attention (one softmax: faster, ~2x the attention's "
                          "activation memory), or with --retina-gate the scales' softmax weights (gathered keys are "
                          "gathered again either way: ~1.1x the model's)"},
    )
    # --- layer sizes ---
    decoder_embed_dim: int = field(default=512, metadata={"help": "model width at every scale"})
    decoder_ffn_embed_dim: int = field(default=2048, metadata={"help": "feed-forward inner dimension"})
    decoder_attention_heads: int = field(default=8, metadata={"help": "attention heads"})
    activation_fn: ChoiceEnum(utils.get_available_activation_fns()) = field(
        default="relu", metadata={"help": "activation function of the feed-forward sublayers"}
    )
    ffn_glu: bool = field(
        default=False,
        metadata={"help": "gated feed-forward sublayers (GLU variants, Shazeer 2020): fc1 makes two halves of "
                          "2/3 of --decoder-ffn-embed-dim each (the same parameters as the plain FFN) and act(one "
                          "half) gates the other: GEGLU with --activation-fn gelu, as local-attention's FFN"},
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings and residual branches"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on attention weights"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after the FFN activation"})
    # --- embeddings and softmax (fairseq's transformer_lm options of the same names) ---
    decoder_learned_pos: bool = field(
        default=False, metadata={"help": "learned positions (token and block) instead of sinusoidal ones"}
    )
    no_token_positional_embeddings: bool = field(
        default=False, metadata={"help": "no token-level positions (coarse scales keep theirs)"}
    )
    no_scale_positions: bool = field(
        default=False,
        metadata={"help": "no position vectors at the coarse scales (added to pooled blocks; for retina, to the "
                          "pooled keys): with --rotary-positions the blocks are still placed by their ready "
                          "positions, without it they carry no position at all"},
    )
    rotary_positions: bool = field(
        default=False,
        metadata={"help": "rotary positions (RoFormer; x-transformers' default) in every attention layer: queries "
                          "and keys rotated by their ready positions in tokens (a block sits at the last token it "
                          "may depend on), on --rotary-fraction of each head's dimensions; the absolute "
                          "positions are still added unless --no-token-positional-embeddings"},
    )
    rotary_fraction: float = field(
        default=0.5,
        metadata={"help": "with --rotary-positions: the fraction of each head's dimensions rotated, in (0, 1] "
                          "(0.5: x-transformers' default; 1: all, as local-attention and MEGABYTE)"},
    )
    no_scale_embedding: bool = field(default=False, metadata={"help": "do not scale embeddings by sqrt(dim)"})
    share_decoder_input_output_embed: bool = field(
        default=False, metadata={"help": "tie input and output embeddings (without adaptive input)"}
    )
    adaptive_input: bool = field(default=False, metadata={"help": "use fairseq's AdaptiveInput embeddings"})
    adaptive_input_factor: float = field(default=4, metadata={"help": "adaptive input band size factor"})
    adaptive_input_cutoff: Optional[str] = field(
        default=None, metadata={"help": "comma-separated adaptive input cutoffs, below the vocabulary size"}
    )
    adaptive_softmax_cutoff: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated adaptive softmax cutoffs (use with --criterion adaptive_loss)"},
    )
    adaptive_softmax_dropout: float = field(default=0, metadata={"help": "dropout in adaptive softmax tails"})
    adaptive_softmax_factor: float = field(default=4, metadata={"help": "adaptive softmax band size factor"})
    tie_adaptive_weights: bool = field(
        default=False, metadata={"help": "tie adaptive input and adaptive softmax band weights"}
    )
    tie_adaptive_proj: bool = field(
        default=False, metadata={"help": "also tie the adaptive input/softmax projections"}
    )
    # --- from the task ---
    max_target_positions: Optional[int] = II("task.max_target_positions")
    tokens_per_sample: int = II("task.tokens_per_sample")


def int_list(option: str, value) -> List[int]:
    """'4,4' -> [4, 4], or a one-line error naming the option."""
    if value is None or str(value).strip() == "":
        return []
    try:
        return [int(v) for v in str(value).split(",") if v.strip() != ""]
    except ValueError:
        raise MsformerConfigError(f"{option}: expected comma-separated integers, got '{value}'") from None


@dataclass
class ScalePlan:
    """The parsed, validated scale options a family body is built from."""

    pool_factors: List[int]
    scale_layers: List[int]  # layers per coarse scale (bottom-up, top-down)
    retina_layers: List[Tuple[int, List[int]]]  # retina: per layer (window W, blocks per coarse scale; -1 = all)


def retina_plan(args, factors: List[int], tokens_per_sample: int) -> List[Tuple[int, List[int]]]:
    """'--retina-windows' horizons -> per layer (W, [n_1, .., n_{S-1}] blocks), or a one-line error."""
    option = "--retina-windows"
    groups = [g for g in str(args.retina_windows).split(";") if g.strip()]
    if len(groups) not in (1, args.token_layers):
        raise MsformerConfigError(
            f"{option}: give one group of windows for all layers or one per layer ({args.token_layers}), "
            f"got {len(groups)}"
        )
    block_lengths = ScaleGrid(factors).block_lengths
    layers = []
    for group in groups:
        horizons = int_list(option, group)
        if len(horizons) != len(block_lengths):
            raise MsformerConfigError(
                f"{option}: '{group}' needs one window per scale ({len(block_lengths)}: tokens, then each "
                f"pooling factor)"
            )
        if any(h == 0 or h < -1 for h in horizons) or -1 in horizons[:-1]:
            raise MsformerConfigError(
                f"{option}: '{group}' has an empty scale: windows must be >= 1 (-1, 'all older', only last)"
            )
        if horizons[0] > tokens_per_sample:
            raise MsformerConfigError(
                f"{option}: window {horizons[0]} is larger than a sample (--tokens-per-sample {tokens_per_sample})"
            )
        blocks = []
        for s in range(1, len(horizons)):
            if horizons[s] == -1:
                blocks.append(-1)
                continue
            if horizons[s] <= horizons[s - 1]:
                raise MsformerConfigError(f"{option}: '{group}' is unordered: horizons must increase with the scale")
            span = horizons[s] - horizons[s - 1]
            if span < block_lengths[s]:
                raise MsformerConfigError(
                    f"{option}: '{group}' overlaps: scale {s} reaches only {span} tokens past scale {s - 1}, "
                    f"less than one of its {block_lengths[s]}-token blocks"
                )
            blocks.append(-(-span // block_lengths[s]))
        if getattr(args, "retina_bucketed_window", False) and horizons[0] % block_lengths[1]:
            raise MsformerConfigError(
                f"--retina-bucketed-window: window {horizons[0]} is not a multiple of the first pooling factor "
                f"({block_lengths[1]}): the buckets must end on block boundaries"
            )
        layers.append((horizons[0], blocks))
    return layers * args.token_layers if len(groups) == 1 else layers


def check_config(args, vocab_size: int, tokens_per_sample: int) -> ScalePlan:
    """Validate model options together with the task; returns the parsed ScalePlan.

    Every message starts with the option to change, so that the CLI's one-line error says what to do.
    """
    factors = int_list("--pool-factors", args.pool_factors)
    if not factors:
        raise MsformerConfigError("--pool-factors: at least one coarse scale (one pooling factor) is required")
    if any(r < 2 for r in factors):
        raise MsformerConfigError(f"--pool-factors: every pooling factor must be >= 2, got '{args.pool_factors}'")
    coarsest = ScaleGrid(factors).grid
    if coarsest > tokens_per_sample:
        raise MsformerConfigError(
            f"--pool-factors: the coarsest block ({coarsest} tokens = {'*'.join(map(str, factors))}) is longer "
            f"than a sample (--tokens-per-sample {tokens_per_sample})"
        )
    if args.pool_type not in POOL_TYPES:
        raise MsformerConfigError(f"--pool-type: unknown pooling type '{args.pool_type}', choose from {POOL_TYPES}")
    if args.shift_rule not in SHIFT_RULES:
        raise MsformerConfigError(f"--shift-rule: unknown rule '{args.shift_rule}', choose from {SHIFT_RULES}")

    scale_layers = int_list("--scale-layers", args.scale_layers)
    if args.family != "retina":
        if len(scale_layers) != len(factors):
            raise MsformerConfigError(
                f"--scale-layers: needs one layer count per pooling factor ({len(factors)}), got '{args.scale_layers}'"
            )
        if any(n < 1 for n in scale_layers):
            raise MsformerConfigError(f"--scale-layers: every coarse scale needs >= 1 layer, got '{args.scale_layers}'")
    for option in ("token_layers", "token_layers_before_pooling"):
        if getattr(args, option) < 0:
            raise MsformerConfigError(f"--{option.replace('_', '-')}: must be >= 0")
    if not 0 < args.rotary_fraction <= 1:
        raise MsformerConfigError(f"--rotary-fraction: must be in (0, 1], got {args.rotary_fraction}")
    if args.decoder_attention_heads < 1:
        raise MsformerConfigError(f"--decoder-attention-heads: must be >= 1, got {args.decoder_attention_heads}")
    if args.decoder_embed_dim % args.decoder_attention_heads != 0:
        raise MsformerConfigError(
            f"--decoder-attention-heads: {args.decoder_attention_heads} heads do not divide "
            f"--decoder-embed-dim {args.decoder_embed_dim}"
        )
    max_positions = args.max_target_positions or tokens_per_sample
    if max_positions < tokens_per_sample:
        raise MsformerConfigError(
            f"--max-target-positions: {max_positions} is below --tokens-per-sample {tokens_per_sample}"
        )

    for option in ("adaptive_input_cutoff", "adaptive_softmax_cutoff"):
        cutoffs = int_list("--" + option.replace("_", "-"), getattr(args, option))
        flag = "--" + option.replace("_", "-")
        if cutoffs and (any(b <= a for a, b in zip(cutoffs, cutoffs[1:])) or cutoffs[0] <= 0):
            raise MsformerConfigError(f"{flag}: cutoffs must be positive and increasing, got '{getattr(args, option)}'")
        if cutoffs and cutoffs[-1] > vocab_size:
            raise MsformerConfigError(
                f"{flag}: cutoff {cutoffs[-1]} is above the vocabulary size ({vocab_size} types)"
            )
        factor = getattr(args, option.replace("cutoff", "factor"))
        tail_bands = len(cutoffs) if cutoffs and cutoffs[-1] < vocab_size else max(len(cutoffs) - 1, 0)
        if args.decoder_embed_dim // factor**tail_bands < 1:  # fairseq: band i has dim // factor**i dimensions
            raise MsformerConfigError(
                f"{flag.replace('cutoff', 'factor')}: {factor} shrinks the last adaptive band of "
                f"--decoder-embed-dim {args.decoder_embed_dim} to zero dimensions"
            )
    if args.adaptive_input and not args.adaptive_input_cutoff:
        raise MsformerConfigError("--adaptive-input-cutoff: required with --adaptive-input")
    if args.share_decoder_input_output_embed and (args.adaptive_input or args.adaptive_softmax_cutoff):
        raise MsformerConfigError(
            "--share-decoder-input-output-embed: not with adaptive input/softmax; use --tie-adaptive-weights"
        )
    if args.tie_adaptive_weights:
        if not (args.adaptive_input and args.adaptive_softmax_cutoff):
            raise MsformerConfigError(
                "--tie-adaptive-weights: needs --adaptive-input and --adaptive-softmax-cutoff"
            )
        if args.adaptive_input_cutoff != args.adaptive_softmax_cutoff or (
            args.adaptive_input_factor != args.adaptive_softmax_factor
        ):
            raise MsformerConfigError(
                "--tie-adaptive-weights: adaptive input and softmax need the same cutoffs and factors"
            )
    if args.family == "retina":
        if args.token_layers < 1:
            raise MsformerConfigError("--token-layers: retina needs at least one (token-level) layer")
        if args.shift_rule != "complete":
            raise MsformerConfigError("--shift-rule: retina reads complete blocks only; use 'complete'")
        retina_layers = retina_plan(args, factors, tokens_per_sample)
        if args.retina_select < 0:
            raise MsformerConfigError(f"--retina-select: must be >= 0, got {args.retina_select}")
        if args.retina_select and not args.retina_gate:
            raise MsformerConfigError("--retina-select: the selected blocks are a gated branch; add --retina-gate")
    else:
        retina_layers = []
    return ScalePlan(factors, scale_layers, retina_layers)
