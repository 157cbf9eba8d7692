"""The fairseq decoder shared by the three families: embeddings in, (adaptive) softmax out.

A family ("body") maps token embeddings (B, T, C), T a multiple of the grid, to features (B, T, C) under the
causality rule. This class does everything fairseq expects around it (design.md §5): token embeddings
(plain or AdaptiveInput) and positions, right-padding to the grid and cutting back to the real length, the
final LayerNorm, the output projection or AdaptiveSoftmax, and the incremental-decoding hooks.
"""
import logging
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.models import FairseqIncrementalDecoder
from fairseq.modules import AdaptiveSoftmax, FairseqDropout, LayerNorm, PositionalEmbedding
from fairseq.utils import eval_str_list

from ..errors import MsformerConfigError
from ..modules import ScaleGrid
from ..modules.positions import SINUSOIDAL_MAX_POSITIONS, position_table_length
from .bottom_up import BottomUp
from .retina import Retina
from .top_down import TopDown

logger = logging.getLogger(__name__)

FAMILY_BODIES = {"bottom_up": BottomUp, "top_down": TopDown, "retina": Retina}


class MsformerDecoder(FairseqIncrementalDecoder):
    def __init__(self, args, dictionary, embed_tokens, plan):
        super().__init__(dictionary)
        dim = args.decoder_embed_dim
        # None with sinusoidal positions unless --max-target-positions was given: no limit but fairseq's own
        self.max_target_positions = args.max_target_positions
        self.learned_positions = args.decoder_learned_pos
        self.grid = ScaleGrid(plan.pool_factors, args.shift_rule)

        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if args.no_scale_embedding else dim**0.5
        self.embed_positions = (
            None
            if args.no_token_positional_embeddings
            else PositionalEmbedding(
                position_table_length(args), dim, dictionary.pad(), learned=args.decoder_learned_pos
            )
        )
        self.dropout_module = FairseqDropout(args.dropout, module_name=type(self).__name__)
        self.body = FAMILY_BODIES[args.family](args, self.grid, plan)
        self.layer_norm = LayerNorm(dim)

        self.adaptive_softmax = None
        self.output_projection = None
        if args.adaptive_softmax_cutoff:
            self.adaptive_softmax = AdaptiveSoftmax(
                len(dictionary),
                dim,
                eval_str_list(args.adaptive_softmax_cutoff, type=int),
                dropout=args.adaptive_softmax_dropout,
                adaptive_inputs=embed_tokens if args.tie_adaptive_weights else None,
                factor=args.adaptive_softmax_factor,
                tie_proj=args.tie_adaptive_proj,
            )
        else:
            self.output_projection = nn.Linear(dim, len(dictionary), bias=False)
            if args.share_decoder_input_output_embed:
                self.output_projection.weight = embed_tokens.weight
            else:
                nn.init.normal_(self.output_projection.weight, mean=0, std=dim**-0.5)

    def forward(
        self,
        prev_output_tokens,
        encoder_out=None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[torch.Tensor]]]] = None,
        features_only: bool = False,
        src_lengths=None,
        **kwargs,
    ):
        x, extra = self.extract_features(prev_output_tokens, incremental_state=incremental_state)
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        if incremental_state is not None:
            return self.extract_features_incremental(prev_output_tokens, incremental_state)
        seq_len = prev_output_tokens.size(1)  # prev_output_tokens: (B, T)
        self.check_length(seq_len)
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)  # (B, T, C)
        if self.embed_positions is not None:
            x = x + self.embed_positions(prev_output_tokens)
        x = self.dropout_module(x)

        # pad on the right to the grid; under the causality rule no real position can see the padding
        grid_pad = (-seq_len) % self.grid.grid
        if grid_pad:
            x = F.pad(x, (0, 0, 0, grid_pad))  # (B, T', C), T' a multiple of the coarsest block
        inner_states = [x]
        x = self.body(x, inner_states)
        x = self.layer_norm(x[:, :seq_len])  # (B, T, C): real positions only
        return x, {"attn": [None], "inner_states": inner_states}

    def extract_features_incremental(self, prev_output_tokens, incremental_state):
        """Generation passes the whole prefix (B, T) at every step: run only the positions not yet cached
        (one, normally) through the family's per-scale caches and return the newest position's features."""
        cache = self.get_incremental_state(incremental_state, "cache") or {}
        done = int(cache["length"][0, 0]) if "length" in cache else 0
        seq_len = prev_output_tokens.size(1)
        self.check_length(seq_len)
        if done >= seq_len:
            raise ValueError(f"incremental_state already holds {done} positions; got a prefix of {seq_len}")
        for t in range(done, seq_len):
            prefix = prev_output_tokens[:, : t + 1]
            x = self.embed_scale * self.embed_tokens(prefix[:, -1:])  # (B, 1, C)
            if self.embed_positions is not None:  # fairseq's positional modules give position t when incremental
                x = x + self.embed_positions(prefix, incremental_state={})
            x = self.body.step(self.dropout_module(x), t, cache)
        cache["length"] = prev_output_tokens.new_full((prev_output_tokens.size(0), 1), seq_len)  # (B, 1)
        self.set_incremental_state(incremental_state, "cache", cache)
        x = self.layer_norm(x)
        return x, {"attn": [None], "inner_states": [x]}

    def check_length(self, seq_len: int):
        if seq_len > self.max_positions():
            raise MsformerConfigError(
                f"--tokens-per-sample: an input of {seq_len} tokens is longer than the model's max_positions "
                f"({self.max_positions()}{', learned positions' if self.learned_positions else ''}); pass "
                f"--tokens-per-sample {self.max_positions()} or less (with --context-window: the two together)"
            )

    def output_layer(self, features):
        if self.adaptive_softmax is not None:
            return features  # the AdaptiveSoftmax projects inside get_normalized_probs / adaptive_loss
        return self.output_projection(features)

    def max_positions(self):
        """Learned positions: the length of their tables (--max-target-positions, by default the training length).
        Sinusoidal ones grow on demand (token and block positions, like fairseq's), so unless
        --max-target-positions sets a limit, fairseq-eval-lm's default 1024-token samples are scored by a model
        trained on shorter ones (transformer_lm, which takes its training length as the limit, skips them)."""
        limit = self.max_target_positions or SINUSOIDAL_MAX_POSITIONS
        if self.embed_positions is None:
            return limit
        return min(limit, self.embed_positions.max_positions)

    def reorder_incremental_state(self, incremental_state, new_order):
        """Beam search: every cached tensor is batch-first (B, ...)."""
        cache = self.get_incremental_state(incremental_state, "cache")
        if cache is not None:
            cache = {name: value.index_select(0, new_order) for name, value in cache.items()}
            self.set_incremental_state(incremental_state, "cache", cache)
