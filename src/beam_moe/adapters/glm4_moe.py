from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="glm4_moe",
    block_classes=("Glm4MoeMoE",),
    description="GLM-4.5 / 4.6: sigmoid scores, correction bias, group-limited top-k, routed scaling, shared experts",
    shared_expert_attrs=("shared_experts",),
)
