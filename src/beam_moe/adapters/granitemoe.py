from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="granitemoe",
    block_classes=("GraniteMoeMoE",),
    description="IBM Granite 3.x MoE: softmax top-k; the router returns (ids, weights, logits)",
    router_attr="router",
    router_outputs=(2, 1, 0),
)
