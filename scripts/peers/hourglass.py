"""hourglass-transformer-pytorch (Hourglass, Nawrot et al. 2021): a bottom-up peer.

Token layers, then shortened (pooled) stages with the hourglass shift by factor-1, then upsampling added to the
residual and token layers again; nested stages for several factors. Its own choices that ours lacks: attention
resampling (a pooled position attends over its block's tokens and back; the package's default) and linear
up/down-sampling ('linear') next to mean-pool/repeat ('naive').

What it cannot match: no dropout inside the package's layers (only our embedding dropout applies); the FFN is
always 4x the width (GELU); attention projections have no bias on q/k/v. Positions: ours (sinusoidal, added to the
embeddings), as the package's LM adds its own absolute ones.
"""
from dataclasses import dataclass, field

import torch.nn as nn
import torch.nn.functional as F
from hourglass_transformer_pytorch.hourglass_transformer_pytorch import get_hourglass_transformer

from .common import PeerLMConfig, RecomputePrefix, head_dim, int_tuple, option_error, register_peer


@dataclass
class HourglassLMConfig(PeerLMConfig):
    hourglass_shorten_factors: str = field(
        default="4,4", metadata={"help": "comma-separated shortening factors, outermost first (blocks of 4, then 16 "
                                         "tokens for '4,4')"})
    hourglass_layers: str = field(
        default="1,2,8,0,1",
        metadata={"help": "layers per stage as 2S+1 comma-separated counts for S factors: the pre-layers of each "
                          "level outermost first, the valley, then the post-layers innermost first ('1,2,8,0,1': 1 "
                          "token layer, 2 at /4, 8 at /16, 0 back at /4, 1 token layer)"})
    hourglass_attn_resampling: bool = field(
        default=False, metadata={"help": "the package's attention resampling at every down/upsampling (on in its own "
                                         "LM; adds 2 attention+FFN blocks per level)"})
    hourglass_updown_sample_type: str = field(
        default="naive", metadata={"help": "'naive' (mean pool / repeat, like ours) or 'linear' (projections)"})


def nested_depth(layers, factors):
    """(1, 2, 8, 0, 1) with 2 factors -> (1, (2, 8, 0), 1): the package's nested depth tuple."""
    if len(layers) != 2 * len(factors) + 1:
        raise option_error("hourglass_layers", f"needs 2S+1 = {2 * len(factors) + 1} counts for {len(factors)} "
                                               f"shortening factors, got {len(layers)}")
    depth = layers[len(factors)]
    for level in reversed(range(len(factors))):
        depth = (layers[level], depth, layers[-1 - level])
    return depth


class HourglassTrunk(RecomputePrefix, nn.Module):
    def __init__(self, args):
        super().__init__()
        factors = int_tuple("hourglass_shorten_factors", args.hourglass_shorten_factors)
        layers = int_tuple("hourglass_layers", args.hourglass_layers)
        if not factors or any(f < 2 for f in factors):
            raise option_error("hourglass_shorten_factors", f"one or more factors >= 2, got '{args.hourglass_shorten_factors}'")
        if args.decoder_ffn_embed_dim != 4 * args.decoder_embed_dim:
            raise option_error("decoder_ffn_embed_dim", f"the package's FFN is 4x the width: use "
                                                        f"{4 * args.decoder_embed_dim}")
        if args.hourglass_updown_sample_type not in ("naive", "linear"):
            raise option_error("hourglass_updown_sample_type", "'naive' or 'linear'")
        self.trunk = get_hourglass_transformer(
            args.decoder_embed_dim, depth=nested_depth(layers, factors),
            shorten_factor=factors if len(factors) > 1 else factors[0],
            attn_resampling=args.hourglass_attn_resampling, updown_sample_type=args.hourglass_updown_sample_type,
            heads=args.decoder_attention_heads, dim_head=head_dim(args), causal=True, norm_out=False)
        self.grid = 1  # inputs are padded to a multiple of every factor's product (see forward)
        for f in factors:
            self.grid *= f
        resampling = 2 * len(factors) if args.hourglass_attn_resampling else 0
        self.layers = sum(layers) + resampling
        scales = ["token"] + [f"/{f}" for f in factors]
        for level in range(1, len(factors)):
            scales[level + 1] = f"/{factors[level] * int(scales[level][1:])}"
        parts = [f"{n} at {scales[min(i, 2 * len(factors) - i)]}" for i, n in enumerate(layers) if n]
        self.layout = " + ".join(parts) + (f" + {resampling} resampling" if resampling else "") + \
            f", {args.hourglass_updown_sample_type} up/down"

    def forward(self, x, inner_states):
        # The package's own padding fails in 0.0.6 (pad_to_multiple calls math.ceil without importing math), so
        # pad here: on the right, where under the hourglass shift no earlier position can read it.
        seq_len = x.size(1)
        x = F.pad(x, (0, 0, 0, (-seq_len) % self.grid))  # (B, T', C), T' a multiple of the coarsest block
        return self.trunk(x)[:, :seq_len]  # (B, T, C)


register_peer("peer_hourglass", "bottom_up", "hourglass-transformer-pytorch", HourglassLMConfig, HourglassTrunk)
