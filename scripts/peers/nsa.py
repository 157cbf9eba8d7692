"""native-sparse-attention-pytorch (NSA, Yuan et al. 2025): a retina peer.

Every layer's attention has three branches, gated per head: compressed blocks (keys/values of each block pooled by
a learned network: the coarse scale), the top-n blocks selected by the compressed attention scores, read at full
resolution, and a sliding window; RMSNorm pre-norm blocks, rotary positions, GELU FFN. The package's Transformer is
used with its token embedding, final norm and logits replaced by identities (ours come around it). It keeps a
decoding cache (keys/values, compressed blocks and the running block), which incremental decoding uses.

Matched to our retina (W = 64, /4 blocks to 256 tokens, /16 blocks beyond): window 64, compressed blocks of 16
tokens every 16, 4 selected blocks of 16 tokens. What it cannot match: no dropout; compression is learned (ours
pools by the mean) and there is one coarse scale, not two.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from native_sparse_attention_pytorch.transformer import Transformer
from torch.utils._pytree import tree_map

from .common import PeerLMConfig, ffn_multiple, head_dim, option_error, register_peer


@dataclass
class SparseLMConfig(PeerLMConfig):
    nsa_layers: int = field(default=4, metadata={"help": "layers"})
    nsa_sliding_window: int = field(default=64, metadata={"help": "sliding-window branch: tokens read back"})
    nsa_compress_block: int = field(default=16, metadata={"help": "tokens per compressed block"})
    nsa_compress_stride: int = field(default=16, metadata={"help": "tokens between compressed blocks' starts"})
    nsa_selection_block: int = field(default=16, metadata={"help": "tokens per selected (full resolution) block"})
    nsa_selected_blocks: int = field(default=4, metadata={"help": "blocks each query selects"})


class SparseTrunk(nn.Module):
    has_cache = True

    def __init__(self, args):
        super().__init__()
        for option in ("nsa_layers", "nsa_sliding_window", "nsa_compress_block", "nsa_compress_stride",
                       "nsa_selection_block", "nsa_selected_blocks"):
            if getattr(args, option) < 1:
                raise option_error(option, "must be >= 1")
        self.trunk = Transformer(
            num_tokens=1, dim=args.decoder_embed_dim, depth=args.nsa_layers, dim_head=head_dim(args),
            heads=args.decoder_attention_heads, ff_expansion_factor=ffn_multiple(args), use_sparse_attn=True,
            causal=True, sparse_attn_kwargs=dict(
                sliding_window_size=args.nsa_sliding_window, compress_block_size=args.nsa_compress_block,
                compress_block_sliding_stride=args.nsa_compress_stride,
                selection_block_size=args.nsa_selection_block, num_selected_blocks=args.nsa_selected_blocks))
        self.trunk.token_emb = nn.Identity()  # it is handed our embeddings (B, T, C) ...
        self.trunk.norm = nn.Identity()  # ... and our decoder's LayerNorm ends the trunk
        self.trunk.to_logits = nn.Identity()
        self.layers = args.nsa_layers
        self.layout = (f"{args.nsa_layers} layers: window {args.nsa_sliding_window}, compressed {args.nsa_compress_block}"
                       f"/{args.nsa_compress_stride}, {args.nsa_selected_blocks} x {args.nsa_selection_block} selected")

    def forward(self, x, inner_states):
        return self.trunk(x)  # (B, T, C)

    def step(self, x, t, cache):
        """The package's cached inference: it takes the newest position (B, 1, C) and its per-layer caches."""
        out, cache["nsa"] = self.trunk(x, cache=cache.get("nsa"), return_cache=True)
        return out[:, -1:]

    @staticmethod
    def reorder_cache(value, new_order):
        return tree_map(lambda t: t.index_select(0, new_order) if torch.is_tensor(t) else t, value)


register_peer("peer_nsa", "retina", "native-sparse-attention-pytorch", SparseLMConfig, SparseTrunk)
