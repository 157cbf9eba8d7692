"""local-attention: a retina peer with one scale only, a sliding window (LocalTransformer without its own
embedding and output layer, as the package allows: num_tokens=None).

Pre-norm blocks, rotary positions, GEGLU FFN (inner size 2/3 of ff_mult x width, the parameters of a 4x FFN), and
by default the package's 4 hyper-connection residual streams.

What it cannot match: no coarse scales (it reads nothing beyond the window); the GEGLU FFN differs from ours (ReLU);
no decoding cache without the package's own embedding, so generation recomputes the prefix.
"""
from dataclasses import dataclass, field

import torch.nn as nn
from local_attention import LocalTransformer

from .common import PeerLMConfig, RecomputePrefix, ffn_multiple, head_dim, option_error, register_peer


@dataclass
class LocalLMConfig(PeerLMConfig):
    local_layers: int = field(default=4, metadata={"help": "layers"})
    local_window: int = field(default=64, metadata={"help": "tokens each position reads back (sliding window)"})
    local_residual_streams: int = field(
        default=1, metadata={"help": "hyper-connection residual streams (the package's default is 4; 1 is a plain "
                                     "residual, like ours)"})


class LocalTrunk(RecomputePrefix, nn.Module):
    def __init__(self, args):
        super().__init__()
        if args.local_window < 1 or args.local_layers < 1:
            raise option_error("local_window", "window and --local-layers must be >= 1")
        self.trunk = LocalTransformer(
            num_tokens=None, max_seq_len=args.tokens_per_sample, dim=args.decoder_embed_dim, depth=args.local_layers,
            causal=True, local_attn_window_size=args.local_window, dim_head=head_dim(args),
            heads=args.decoder_attention_heads, ff_mult=ffn_multiple(args), attn_dropout=args.attention_dropout,
            ff_dropout=args.dropout, num_residual_streams=args.local_residual_streams)
        self.layers = args.local_layers
        self.layout = f"{args.local_layers} layers, window {args.local_window}" + (
            f", {args.local_residual_streams} residual streams" if args.local_residual_streams > 1 else "")

    def forward(self, x, inner_states):
        return self.trunk(x)  # (B, T, C)


register_peer("peer_local", "retina", "local-attention", LocalLMConfig, LocalTrunk)
