"""x-transformers: a second, modern vanilla decoder (the peer of fairseq's transformer_lm).

x_transformers.Decoder (its attention layers only; ours embed and project): pre-norm blocks with fused attention
(attn_flash: PyTorch's scaled_dot_product_attention, as ours; the package's default is its einsum path),
rotary positions by default, GELU FFN, and the package's key/value cache for incremental decoding. Its final norm is
off: our decoder's LayerNorm ends the trunk, as in every model here. Dropout is placed as ours (and fairseq's):
--dropout on every attention and FFN output before the residual add (the package's sublayer_dropout),
--activation-dropout after the FFN activation (its ff_dropout), --attention-dropout on attention weights.
"""
from dataclasses import dataclass, field

import torch.nn as nn
from x_transformers import Decoder
from x_transformers.autoregressive_wrapper import modify_cached_kv

from .common import PeerLMConfig, ffn_multiple, head_dim, option_error, register_peer


@dataclass
class XTransformersLMConfig(PeerLMConfig):
    xt_layers: int = field(default=4, metadata={"help": "layers"})
    xt_no_rotary: bool = field(default=False, metadata={"help": "no rotary positions in attention (rotary is the "
                                                                "package's recommended setting; ours add sinusoidal "
                                                                "positions to the embeddings as well)"})
    xt_no_flash: bool = field(default=False, metadata={"help": "the package's einsum attention instead of fused "
                                                              "scaled_dot_product_attention (attn_flash, on here)"})


class XTransformersTrunk(nn.Module):
    has_cache = True

    def __init__(self, args):
        super().__init__()
        if args.xt_layers < 1:
            raise option_error("xt_layers", "at least one layer")
        self.trunk = Decoder(
            dim=args.decoder_embed_dim, depth=args.xt_layers, heads=args.decoder_attention_heads,
            attn_dim_head=head_dim(args), ff_mult=ffn_multiple(args), attn_dropout=args.attention_dropout,
            ff_dropout=args.activation_dropout, attn_sublayer_dropout=args.dropout,
            ff_sublayer_dropout=args.dropout,
            rotary_pos_emb=not args.xt_no_rotary, attn_flash=not args.xt_no_flash,
            pre_norm_has_final_norm=False)
        self.layers = args.xt_layers
        self.layout = f"{args.xt_layers} layers" + ("" if args.xt_no_rotary else ", rotary")

    def forward(self, x, inner_states):
        return self.trunk(x)  # (B, T, C)

    def step(self, x, t, cache):
        """The package's cache: keys/values of every earlier position (LayerIntermediates), the newest in x."""
        out, cache["xt"] = self.trunk(x, cache=cache.get("xt"), return_hiddens=True)
        return out[:, -1:]

    @staticmethod
    def reorder_cache(value, new_order):
        modify_cached_kv(value, lambda t: t.index_select(0, new_order))
        return value


register_peer("peer_xtransformers", "vanilla", "x-transformers", XTransformersLMConfig, XTransformersTrunk)
