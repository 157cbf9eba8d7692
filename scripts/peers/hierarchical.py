"""simple-hierarchical-transformer: a bottom-up peer.

Every layer runs one block per hierarchy: the 1x stream over tokens and, for each compression factor c, a stream of
causal-convolution-compressed tokens (stride 1: as many positions as tokens) whose attention is axial over every
c-th position; after each layer all hierarchies are merged into the 1x stream. RMSNorm, token shift, rotary
positions (xpos), optional local attention windows per hierarchy.

Run through fairseq: the package's forward embeds ids with `token_emb` and ends in `to_logits`; both are replaced
by identities, so it receives our embeddings (B, T, C) and returns features. Its next-latent-prediction and
reconstruction losses (only with its own return_loss) are switched off, and their modules (and the coarse
streams' final norms, which only they read) removed.

What it cannot match: every layer runs all hierarchies, so layers per scale are equal (no 1 + 2 + 8 split); the
compressed streams keep every position (the savings are in attention span, not sequence length); no dropout.
"""
from dataclasses import dataclass, field

import torch.nn as nn
from simple_hierarchical_transformer import HierarchicalTransformer

from .common import PeerLMConfig, RecomputePrefix, ffn_multiple, head_dim, int_tuple, option_error, register_peer

UNBOUNDED = 1 << 30  # the package checks input lengths against seq_len and clamps windows to it: no limit here


@dataclass
class HierarchicalLMConfig(PeerLMConfig):
    sht_depth: int = field(default=4, metadata={"help": "layers; each runs one block per hierarchy"})
    sht_hierarchies: str = field(
        default="1,4,16", metadata={"help": "comma-separated compression factors (powers of two, 1 first: the "
                                            "stream that predicts)"})
    sht_window_sizes: str = field(
        default="", metadata={"help": "local attention window per hierarchy, comma-separated, 0 for full causal "
                                      "attention ('' = full everywhere; the package's example: '32,64,0')"})


class HierarchicalTrunk(RecomputePrefix, nn.Module):
    def __init__(self, args):
        super().__init__()
        hierarchies = int_tuple("sht_hierarchies", args.sht_hierarchies)
        if not hierarchies or hierarchies[0] != 1 or any(h & (h - 1) for h in hierarchies):
            raise option_error("sht_hierarchies", f"powers of two starting with 1, got '{args.sht_hierarchies}'")
        windows = int_tuple("sht_window_sizes", args.sht_window_sizes) or (0,) * len(hierarchies)
        if len(windows) != len(hierarchies):
            raise option_error("sht_window_sizes", f"one window per hierarchy ({len(hierarchies)})")
        if args.sht_depth < 1:
            raise option_error("sht_depth", "at least one layer")
        self.trunk = HierarchicalTransformer(
            num_tokens=1, dim=args.decoder_embed_dim, depth=args.sht_depth, seq_len=UNBOUNDED,
            dim_head=head_dim(args), heads=args.decoder_attention_heads, ff_mult=ffn_multiple(args),
            hierarchies=hierarchies, window_sizes=tuple(w or None for w in windows),
            recon_loss_weight=0.0, next_latent_loss_weight=0.0)
        self.trunk.token_emb = nn.Identity()  # (B, T, C) embeddings come in ...
        self.trunk.to_logits = nn.Identity()  # ... and features go out
        self.trunk.chunk_summarizers = nn.ModuleList()  # the next-latent losses' modules: unused here
        self.trunk.latent_dynamics = nn.ModuleList()
        for h in range(1, len(hierarchies)):  # the coarse streams' final norms feed only those losses too
            self.trunk.norms[h] = nn.Identity()
        self.layers = args.sht_depth * len(hierarchies)
        self.layout = (f"{args.sht_depth} layers x hierarchies {'/'.join(map(str, hierarchies))}"
                       + (f", windows {'/'.join(str(w or 'full') for w in windows)}" if any(windows) else ""))

    def forward(self, x, inner_states):
        return self.trunk(x)  # (B, T, C)


register_peer("peer_hierarchical", "bottom_up", "simple-hierarchical-transformer", HierarchicalLMConfig,
              HierarchicalTrunk)
