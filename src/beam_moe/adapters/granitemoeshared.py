from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="granitemoeshared",
    block_classes=("GraniteMoeSharedMoE",),
    description="IBM Granite MoE with a shared MLP beside the routed experts; router returns (ids, weights, logits)",
    router_attr="router",
    router_outputs=(2, 1, 0),
)
