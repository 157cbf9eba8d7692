"""What every peer shares: fairseq's embeddings and output layer (our MsformerDecoder's), and the registration.

A peer's trunk (the package's layers between the embedding and the output layer) becomes the `body` of our
MsformerDecoder, so token embeddings (plain or AdaptiveInput), sinusoidal positions, embedding dropout, the final
LayerNorm, the output projection or AdaptiveSoftmax and the incremental-decoding loop are ours, built by the same
code: the only difference from our models is the trunk.

A trunk is an nn.Module built as Trunk(args) with
  forward(x, inner_states) -> features     x: (B, T, C) embeddings, features (B, T, C), causal
  step(x, t, cache) -> features (B, 1, C)   x: (B, 1, C) the embedding of position t; cache: a dict kept between steps
  layers, layout                            attention+FFN blocks it runs, and a one-line description
RecomputePrefix gives step() to a package without a decoding cache: it keeps the prefix's embeddings and runs the
whole trunk again at every step (what its own generate() does).
"""
import argparse
import dataclasses
import importlib.metadata
from typing import Dict, Type

import torch
import torch.nn as nn
from fairseq.dataclass import FairseqDataclass
from fairseq.models import FairseqLanguageModel, register_model
from fairseq.utils import safe_getattr

from fairseq_msformer.errors import MsformerConfigError
from fairseq_msformer.models import decoder as msformer_decoder
from fairseq_msformer.models.config import MsformerLMConfig, ScalePlan
from fairseq_msformer.models.msformer_lm import build_embed_tokens, check_sample_length

# Our options for the parts every model shares (sizes, dropout, embeddings, softmax, task lengths): the same names,
# defaults and help as msformer_lm's, taken from its dataclass.
SHARED_OPTIONS = (
    "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads", "dropout", "attention_dropout",
    "activation_dropout",
    "decoder_learned_pos", "no_token_positional_embeddings", "no_scale_embedding",
    "share_decoder_input_output_embed", "adaptive_input", "adaptive_input_factor", "adaptive_input_cutoff",
    "adaptive_softmax_cutoff", "adaptive_softmax_dropout", "adaptive_softmax_factor", "tie_adaptive_weights",
    "tie_adaptive_proj", "max_target_positions", "tokens_per_sample",
)
PeerLMConfig = dataclasses.make_dataclass(
    "PeerLMConfig",
    [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
     for f in dataclasses.fields(MsformerLMConfig) if f.name in SHARED_OPTIONS],
    bases=(FairseqDataclass,),
)

# fairseq model name -> (family it is a peer of, PyPI package)
PEERS: Dict[str, tuple] = {}


def package_version(package: str) -> str:
    """'package==version' as installed (the results name the implementation this way)."""
    return f"{package}=={importlib.metadata.version(package)}"


def option_error(option: str, message: str):
    return MsformerConfigError(f"--{option.replace('_', '-')}: {message}")


def int_tuple(option: str, value) -> tuple:
    try:
        return tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise option_error(option, f"expected comma-separated integers, got '{value}'") from None


def ffn_multiple(args, integer: bool = False):
    """--decoder-ffn-embed-dim as the multiple of the width that the packages take (ff_mult)."""
    mult = args.decoder_ffn_embed_dim / args.decoder_embed_dim
    if integer and mult != int(mult):
        raise option_error("decoder_ffn_embed_dim", f"this package takes the FFN size as an integer multiple of the "
                                                    f"width ({args.decoder_embed_dim}); got {args.decoder_ffn_embed_dim}")
    return int(mult) if integer else mult


def head_dim(args) -> int:
    if args.decoder_attention_heads < 1 or args.decoder_embed_dim % args.decoder_attention_heads:
        raise option_error("decoder_attention_heads", f"{args.decoder_attention_heads} heads do not divide "
                                                      f"--decoder-embed-dim {args.decoder_embed_dim}")
    return args.decoder_embed_dim // args.decoder_attention_heads


class RecomputePrefix:
    """step() for a package without a decoding cache: keep the embeddings so far (B, t+1, C) in the cache and run
    the whole trunk on them; the newest position's features are the step's."""

    has_cache = False

    def step(self, x: torch.Tensor, t: int, cache: dict) -> torch.Tensor:
        prefix = torch.cat([cache["prefix"], x], dim=1) if "prefix" in cache else x  # (B, t+1, C)
        cache["prefix"] = prefix
        return self.forward(prefix, [])[:, -1:]


class PeerDecoder(msformer_decoder.MsformerDecoder):
    """Our decoder with a peer's trunk as its body (no multi-scale grid: the peers pad for themselves)."""

    def __init__(self, args, dictionary, embed_tokens, trunk_cls):
        msformer_decoder.FAMILY_BODIES[args.family] = lambda a, grid, plan: trunk_cls(a)
        super().__init__(args, dictionary, embed_tokens, ScalePlan([], [], []))

    def reorder_incremental_state(self, incremental_state, new_order):
        """Beam search: tensors are batch-first; a package's own cache object is reordered by its trunk."""
        cache = self.get_incremental_state(incremental_state, "cache")
        if cache is not None:
            cache = {name: value.index_select(0, new_order) if torch.is_tensor(value)
                     else self.body.reorder_cache(value, new_order) for name, value in cache.items()}
            self.set_incremental_state(incremental_state, "cache", cache)


def decoder_args(args, name: str) -> argparse.Namespace:
    """The model's options as a plain Namespace (fairseq hands build_model a struct DictConfig, which takes no new
    keys), with what our decoder expects of a body: its family name and a causality rule for its (1-scale) grid."""
    keys = args.keys() if hasattr(args, "keys") else vars(args).keys()
    options = {k: safe_getattr(args, k) for k in keys if not k.startswith("_")}
    return argparse.Namespace(**options, family=name, shift_rule="complete")


def register_peer(name: str, family: str, package: str, config: Type, trunk_cls, decoder_cls=PeerDecoder):
    """Register fairseq model `name` (--arch name): fairseq's embeddings and output layer around trunk_cls."""

    class PeerLanguageModel(FairseqLanguageModel):
        peer_family, peer_package = family, package

        @classmethod
        def build_model(cls, args, task):
            if safe_getattr(args, "tokens_per_sample", None) is None:
                args.tokens_per_sample = task.args.tokens_per_sample
            if safe_getattr(args, "max_target_positions", None) is None and args.decoder_learned_pos:
                args.max_target_positions = args.tokens_per_sample
            head_dim(args)
            if args.adaptive_input and not args.adaptive_input_cutoff:
                raise option_error("adaptive_input_cutoff", "required with --adaptive-input")
            dictionary = task.source_dictionary
            options = decoder_args(args, name)
            embed_tokens = build_embed_tokens(options, dictionary)
            decoder = decoder_cls(options, task.target_dictionary, embed_tokens, trunk_cls)
            check_sample_length(decoder, task)
            return cls(decoder)

    PeerLanguageModel.__name__ = PeerLanguageModel.__qualname__ = f"{trunk_cls.__name__}LanguageModel"
    register_model(name, dataclass=config)(PeerLanguageModel)
    PEERS[name] = (family, package)
    return PeerLanguageModel
