"""beam-moe: Binary Expert Activation Masking (BEAM) for Mixture-of-Experts language models.

from beam_moe import BeamConfig, attach, save_beam, load_beam, beam_stats
attach(model, BeamConfig())          # every MoE block gets `beam_mask`
with beam_stats(model) as s:
    model(**batch)
s.avg_k
"""

from beam_moe.attach import (
    attach,
    detach,
    get_attachment,
    is_attached,
    last_avg_k,
    mask_parameters,
    mask_regularizer,
    set_routing_policy,
)
from beam_moe.checkpoint import load_beam, read_adapter_config, save_beam
from beam_moe.config import BeamConfig
from beam_moe.errors import BeamError
from beam_moe.loading import load_beam_model
from beam_moe.mask import MaskHead
from beam_moe.merged import from_pretrained
from beam_moe.routing import MaskedRouting, RoutingPolicy, apply_keep, apply_mask, to_sentinel
from beam_moe.stats import BeamStats, beam_stats

__version__ = "0.1.0"

__all__ = [
    "BeamConfig",
    "BeamError",
    "BeamStats",
    "MaskHead",
    "MaskedRouting",
    "RoutingPolicy",
    "__version__",
    "apply_keep",
    "apply_mask",
    "attach",
    "beam_stats",
    "detach",
    "from_pretrained",
    "get_attachment",
    "is_attached",
    "last_avg_k",
    "load_beam",
    "load_beam_model",
    "mask_parameters",
    "mask_regularizer",
    "read_adapter_config",
    "save_beam",
    "set_routing_policy",
    "to_sentinel",
]
