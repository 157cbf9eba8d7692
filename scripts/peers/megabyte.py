"""megabyte-pytorch (MEGABYTE, Yu et al. 2023): a top-down peer.

A global transformer over patches (each patch's token embeddings concatenated and projected) conditions a local
transformer within each patch (nested for more stages), with start tokens and token shift; RMSNorm pre-norm blocks,
GELU FFN, rotary positions optional (rel_pos).

MEGABYTE embeds token ids itself, separately per stage, so it cannot take our embeddings as the other peers do: it
runs whole, from token ids, through the same decoder. What it shares with ours is the embedding table (fairseq's
AdaptiveInput or Embedding, placed inside every stage's embedding in place of the package's own nn.Embedding) and
the output layer (its to_logits replaced by identity, then our LayerNorm and AdaptiveSoftmax/projection). Without
our sinusoidal positions, sqrt(dim) scaling and embedding dropout (the package has none of them), and no decoding
cache: generation recomputes the prefix.
"""
from dataclasses import dataclass, field

import torch.nn as nn
from MEGABYTE_pytorch import MEGABYTE

from fairseq_msformer.modules.positions import SINUSOIDAL_MAX_POSITIONS

from .common import PeerDecoder, PeerLMConfig, ffn_multiple, head_dim, int_tuple, option_error, register_peer


@dataclass
class MegabyteLMConfig(PeerLMConfig):
    megabyte_layers: str = field(
        default="8,2,2", metadata={"help": "layers per stage, global (coarsest) first: '8,2,2' = 8 over 16-token "
                                           "patches, 2 over 4-token patches, 2 over tokens (our top-down's 12)"})
    megabyte_patch_sizes: str = field(
        default="4,4", metadata={"help": "positions per patch of each stage after the global one ('4,4': the global "
                                         "stage sees 16-token patches, the middle one 4-token patches)"})
    megabyte_no_rotary: bool = field(
        default=False, metadata={"help": "no rotary positions (the package's rel_pos, off in its own defaults but on "
                                         "here: without it only causal masks and token shift give order)"})


class MegabyteTrunk(nn.Module):
    """MEGABYTE over token ids (B, T) -> features (B, T, C); the decoder below hands it ids, not embeddings."""

    has_cache = False

    def __init__(self, args):
        super().__init__()
        layers = int_tuple("megabyte_layers", args.megabyte_layers)
        patches = int_tuple("megabyte_patch_sizes", args.megabyte_patch_sizes)
        if len(layers) != len(patches) + 1 or any(n < 1 for n in layers) or any(p < 2 for p in patches):
            raise option_error("megabyte_layers", f"one count >= 1 per stage ({len(patches) + 1} for patch sizes "
                                                  f"'{args.megabyte_patch_sizes}', each >= 2), got '{args.megabyte_layers}'")
        patch_tokens = 1
        for p in patches:
            patch_tokens *= p
        self.trunk = MEGABYTE(
            num_tokens=1, dim=args.decoder_embed_dim, depth=layers,
            max_seq_len=(SINUSOIDAL_MAX_POSITIONS // patch_tokens, *patches), dim_head=head_dim(args),
            heads=args.decoder_attention_heads, attn_dropout=args.attention_dropout, ff_dropout=args.dropout,
            ff_mult=ffn_multiple(args, integer=True), rel_pos=not args.megabyte_no_rotary)
        self.trunk.to_logits = nn.Identity()  # features out; our output layer follows
        self.layers = sum(layers)
        blocks = [patch_tokens]
        for p in patches:
            blocks.append(blocks[-1] // p)
        self.layout = " + ".join(f"{n} at /{k}" if k > 1 else f"{n} token" for n, k in zip(layers, blocks))

    def share_embedding(self, embed_tokens, pad):
        """Put fairseq's embedding table into every stage (the package builds an nn.Embedding per stage)."""
        self.trunk.pad_id = pad
        self.trunk.token_embs[0] = embed_tokens
        for stage in self.trunk.token_embs[1:]:
            stage[0] = embed_tokens  # Sequential(Embedding, concat patch, LayerNorm, Linear, LayerNorm)

    def forward(self, tokens, inner_states=None):
        return self.trunk(tokens)  # (B, T) ids -> (B, T, C); the package pads to whole patches and cuts back


class MegabyteDecoder(PeerDecoder):
    def __init__(self, args, dictionary, embed_tokens, trunk_cls):
        super().__init__(args, dictionary, embed_tokens, trunk_cls)
        self.body.share_embedding(embed_tokens, dictionary.pad())
        self.embed_positions = None  # MEGABYTE adds no absolute positions

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        """The whole prefix every time (no cache): with incremental_state, the newest position's features."""
        self.check_length(prev_output_tokens.size(1))
        x = self.layer_norm(self.body(prev_output_tokens))  # (B, T, C)
        if incremental_state is not None:
            x = x[:, -1:]
        return x, {"attn": [None], "inner_states": [x]}


register_peer("peer_megabyte", "top_down", "megabyte-pytorch", MegabyteLMConfig, MegabyteTrunk, MegabyteDecoder)
