from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="dots1",
    block_classes=("Dots1MoE",),
    description="dots.llm1: sigmoid-scored top-k with correction bias, shared experts",
    shared_expert_attrs=("shared_experts",),
)
