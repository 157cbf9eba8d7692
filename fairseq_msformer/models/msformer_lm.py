"""Registration: the msformer_lm model and its architecture presets (--arch)."""
import contextlib
import logging
from dataclasses import MISSING, fields

from fairseq.models import FairseqLanguageModel, register_model, register_model_architecture
from fairseq.models.transformer import Embedding
from fairseq.modules import AdaptiveInput
from fairseq.utils import eval_str_list, safe_getattr
from omegaconf import OmegaConf, open_dict

from ..errors import MsformerConfigError
from .config import MsformerLMConfig, check_config
from .decoder import MsformerDecoder

logger = logging.getLogger(__name__)


@register_model("msformer_lm", dataclass=MsformerLMConfig)
class MsformerLanguageModel(FairseqLanguageModel):
    """Multi-scale Transformer LM (Subramanian et al. 2020): bottom-up, top-down or retina decoder."""

    @classmethod
    def build_model(cls, args, task):
        fill_missing_options(args)
        if safe_getattr(args, "tokens_per_sample", None) is None:
            args.tokens_per_sample = task.args.tokens_per_sample
        tokens_per_sample = args.tokens_per_sample
        if safe_getattr(args, "max_target_positions", None) is None and args.decoder_learned_pos:
            args.max_target_positions = tokens_per_sample  # learned tables cover the training length
        dictionary = task.source_dictionary
        plan = check_config(args, len(dictionary), tokens_per_sample)

        embed_tokens = build_embed_tokens(args, dictionary)
        decoder = MsformerDecoder(args, task.target_dictionary, embed_tokens, plan)
        check_sample_length(decoder, task)
        logger.info(describe_scales(args, decoder.grid, plan, tokens_per_sample))
        return cls(decoder)


def fill_missing_options(args):
    """A checkpoint saved before an option existed lacks it (fairseq rebuilds a preset's model from the saved config
    and the preset alone, without the dataclass): give it the option's default, which is how that model ran."""
    is_config = OmegaConf.is_config(args)
    with open_dict(args) if is_config else contextlib.nullcontext():
        for option in fields(MsformerLMConfig):
            present = option.name in args if is_config else hasattr(args, option.name)
            if not present and option.name != "_name":
                default = option.default if option.default is not MISSING else option.default_factory()
                setattr(args, option.name, None if str(default).startswith("${") else default)


def build_embed_tokens(args, dictionary):
    """fairseq's AdaptiveInput (--adaptive-input) or a plain Embedding, of width --decoder-embed-dim (also used by the
    outside implementations run through fairseq in scripts/peers, so that only their trunks differ)."""
    if args.adaptive_input:
        return AdaptiveInput(
            len(dictionary),
            dictionary.pad(),
            args.decoder_embed_dim,
            args.adaptive_input_factor,
            args.decoder_embed_dim,
            eval_str_list(args.adaptive_input_cutoff, type=int),
            0,  # quant-noise
            8,
        )
    return Embedding(len(dictionary), args.decoder_embed_dim, dictionary.pad())


def check_sample_length(decoder, task):
    """fairseq-eval-lm, -generate and -interactive set the task up from their own command line, with
    --tokens-per-sample 1024 unless told (design.md §6): a model with learned positions (or a max_target_positions
    limit) for fewer tokens stops here with one line, instead of eval-lm silently skipping every sample or a forward
    pass failing later."""
    wanted = safe_getattr(safe_getattr(task, "args", None), "tokens_per_sample", None)
    limit = decoder.max_positions()
    if wanted is not None and wanted > limit:
        if decoder.learned_positions:
            kind, lift = "learned positions cover", ""
        else:  # sinusoidal positions would grow: the limit was set at training (or recorded by an older version)
            kind = "max_target_positions is"
            lift = ", or lift the limit: --model-overrides \"{'max_target_positions': None}\""
        raise MsformerConfigError(
            f"--tokens-per-sample: {wanted} tokens per sample, but this model's {kind} {limit}; "
            f"pass --tokens-per-sample {limit} or less (--context-window is taken out of it){lift}"
        )


def describe_scales(args, grid, plan, tokens_per_sample):
    """One log line: the positions and layers each scale runs for one sample."""
    parts = []
    for s, k in enumerate(grid.block_lengths):
        n = -(-tokens_per_sample // k)
        if args.family == "retina":
            read = sorted({(w if s == 0 else blocks[s - 1]) for w, blocks in plan.retina_layers})
            what = ("tokens" + (" bucketed (W+1..2W)" if getattr(args, "retina_bucketed_window", False) else "")
                    if s == 0 else "blocks")
            parts.append(f"scale {s}: {k}-token blocks, read {'/'.join(map(str, read))} {what}")
        else:
            layers = args.token_layers if s == 0 else plan.scale_layers[s - 1]
            parts.append(f"scale {s}: {n} x {k}-token blocks, {layers} layers")
    return f"msformer {args.family} ({args.shift_rule} rule, {args.pool_type} pooling): " + "; ".join(parts)


# ---------------------------------------------------------------- architecture presets
# Pattern of fairseq's transformer_lm: explicit CLI flags win, then the preset, then the dataclass default.
# `--arch msformer_lm` itself (registered with the model) takes --family and every option from the CLI.


def _family(args, family):
    args.family = family


def _defaults(args, **values):
    for name, value in values.items():
        setattr(args, name, safe_getattr(args, name, value))


@register_model_architecture("msformer_lm", "msformer_lm_bottom_up")
def msformer_lm_bottom_up(args):
    _family(args, "bottom_up")


@register_model_architecture("msformer_lm", "msformer_lm_top_down")
def msformer_lm_top_down(args):
    _family(args, "top_down")


@register_model_architecture("msformer_lm", "msformer_lm_retina")
def msformer_lm_retina(args):
    _family(args, "retina")


def _tiny(args):
    """Small enough to train in minutes on a CPU (the demo and the tests)."""
    _defaults(
        args, decoder_embed_dim=64, decoder_ffn_embed_dim=256, decoder_attention_heads=4, pool_factors="4,4",
        scale_layers="1,1", token_layers=1, dropout=0.1,
    )
    # tie input and output embeddings, unless adaptive ones are asked for (--tie-adaptive-weights ties those)
    adaptive = safe_getattr(args, "adaptive_input", False) or safe_getattr(args, "adaptive_softmax_cutoff", None)
    _defaults(args, share_decoder_input_output_embed=not adaptive)


@register_model_architecture("msformer_lm", "msformer_lm_bottom_up_tiny")
def msformer_lm_bottom_up_tiny(args):
    _tiny(args)
    msformer_lm_bottom_up(args)


@register_model_architecture("msformer_lm", "msformer_lm_top_down_tiny")
def msformer_lm_top_down_tiny(args):
    _tiny(args)
    msformer_lm_top_down(args)


@register_model_architecture("msformer_lm", "msformer_lm_retina_tiny")
def msformer_lm_retina_tiny(args):
    _defaults(args, token_layers=2, retina_windows="16,48,-1")
    _tiny(args)
    msformer_lm_retina(args)


def _wiki103(args):
    """The scale of fairseq's transformer_lm_wiki103 (Baevski & Auli): adaptive input and softmax, tied."""
    _defaults(
        args, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096, decoder_attention_heads=8,
        dropout=0.3, attention_dropout=0.1, activation_dropout=0.1,
        adaptive_input=True, adaptive_input_factor=4, adaptive_input_cutoff="20000,60000",
        adaptive_softmax_cutoff="20000,60000", adaptive_softmax_dropout=0.2, adaptive_softmax_factor=4,
        tie_adaptive_weights=True, tie_adaptive_proj=True,
    )


@register_model_architecture("msformer_lm", "msformer_lm_bottom_up_wiki103")
def msformer_lm_bottom_up_wiki103(args):
    # 4 + 6 coarse layers + aggregation + 6 token layers; residual upsampling and linear pooling as in the
    # paper preset (the ablation's winners)
    _defaults(args, pool_factors="4,4", scale_layers="4,6", token_layers=6, token_layers_before_pooling=0,
              bottom_up_combine="residual", pool_type="linear", shift_rule="hourglass")
    _wiki103(args)
    msformer_lm_bottom_up(args)


@register_model_architecture("msformer_lm", "msformer_lm_top_down_wiki103")
def msformer_lm_top_down_wiki103(args):
    _defaults(args, pool_factors="4,4", scale_layers="4,6", token_layers=6)
    _wiki103(args)
    msformer_lm_top_down(args)


@register_model_architecture("msformer_lm", "msformer_lm_retina_wiki103")
def msformer_lm_retina_wiki103(args):
    # 16 token-level layers: short range in the lower half, long range on top (Rae & Razavi 2020)
    low, high = "64,256,-1", "256,1024,-1"
    _defaults(args, pool_factors="4,4", token_layers=16, retina_windows=";".join([low] * 8 + [high] * 8))
    _wiki103(args)
    msformer_lm_retina(args)


def _paper(args):
    """Paper-scale models (30 layers, most at coarse scales) at the width of a mid-sized LM.

    The layouts were chosen by the bytes they save for backward against a 14-layer transformer_lm at T = 2048
    (README): at most 0.70x; scripts/experiments/benchmark.py measures 0.64x / 0.63x and 2.28x / 2.34x its training speed.
    """
    _defaults(
        args, decoder_embed_dim=512, decoder_ffn_embed_dim=2048, decoder_attention_heads=8, dropout=0.1,
        pool_factors="4,4",
    )


@register_model_architecture("msformer_lm", "msformer_lm_bottom_up_paper")
def msformer_lm_bottom_up_paper(args):
    # 30 layers: 12 at /4 + 14 at /16 + aggregation + 3 token layers (4 of them at token level). Residual
    # upsampling and linear pooling won the ablation (README); the hourglass shift tied the complete rule there.
    _defaults(args, token_layers_before_pooling=0, scale_layers="12,14", token_layers=3,
              bottom_up_combine="residual", pool_type="linear", shift_rule="hourglass")
    _paper(args)
    msformer_lm_bottom_up(args)


@register_model_architecture("msformer_lm", "msformer_lm_top_down_paper")
def msformer_lm_top_down_paper(args):
    # 30 layers: 14 at /16 + 12 at /4 + 4 token layers
    _defaults(args, scale_layers="12,14", token_layers=4, shift_rule="hourglass")
    _paper(args)
    msformer_lm_top_down(args)
