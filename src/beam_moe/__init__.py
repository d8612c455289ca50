"""beam-moe: Binary Expert Activation Masking (BEAM) for Mixture-of-Experts language models.

from beam_moe import BeamConfig, attach, save_beam, load_beam, beam_stats
attach(model, BeamConfig())          # every MoE block gets `beam_mask`
with beam_stats(model) as s:
    model(**batch)
s.avg_k
with beam_budget(model, avg_k=1.5):  # any budget the adapter's calibrated curve covers
    model.generate(**batch)

The public names load on first use, so `import beam_moe` (and the `beam-moe` command) can set up the
process, e.g. OpenMP's wait policy, before torch is imported.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from beam_moe.lazy import lazy_attributes
from beam_moe.version import __version__

_PUBLIC = {
    "attach": (
        "attach",
        "beam_stats",
        "detach",
        "disable_masks",
        "get_attachment",
        "is_attached",
        "last_avg_k",
        "mask_parameters",
        "mask_regularizer",
        "set_routing_policy",
    ),
    "budget": ("beam_budget",),
    "adapter": ("load_beam", "read_adapter_config", "read_threshold_curve", "save_beam"),
    "config": ("BeamConfig",),
    "errors": ("BeamError",),
    "loading": ("load_beam_model",),
    "mask": ("MaskHead",),
    "merged": ("from_pretrained",),
    "routing": ("MaskedRouting", "RoutingPolicy", "apply_keep", "apply_mask", "to_sentinel"),
    "stats": ("BeamStats",),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

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
    "beam_budget",
    "beam_stats",
    "detach",
    "disable_masks",
    "from_pretrained",
    "get_attachment",
    "is_attached",
    "last_avg_k",
    "load_beam",
    "load_beam_model",
    "mask_parameters",
    "mask_regularizer",
    "read_adapter_config",
    "read_threshold_curve",
    "save_beam",
    "set_routing_policy",
    "to_sentinel",
]


__getattr__ = lazy_attributes(__name__, _HOME)


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


class _Package(types.ModuleType):
    """Keeps `beam_moe.attach` the function: importing the submodule of the same name would bind the
    module over it (the submodule stays importable as `beam_moe.attach` through sys.modules)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _HOME.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from beam_moe.adapter import load_beam, read_adapter_config, read_threshold_curve, save_beam
    from beam_moe.attach import (
        attach,
        beam_stats,
        detach,
        disable_masks,
        get_attachment,
        is_attached,
        last_avg_k,
        mask_parameters,
        mask_regularizer,
        set_routing_policy,
    )
    from beam_moe.budget import beam_budget
    from beam_moe.config import BeamConfig
    from beam_moe.errors import BeamError
    from beam_moe.loading import load_beam_model
    from beam_moe.mask import MaskHead
    from beam_moe.merged import from_pretrained
    from beam_moe.routing import MaskedRouting, RoutingPolicy, apply_keep, apply_mask, to_sentinel
    from beam_moe.stats import BeamStats
