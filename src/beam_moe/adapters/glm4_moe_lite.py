from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="glm4_moe_lite",
    block_classes=("Glm4MoeLiteMoE",),
    description="GLM-4.7-Flash: MLA attention, sigmoid-scored top-k with correction bias, shared experts",
    shared_expert_attrs=("shared_experts",),
)
