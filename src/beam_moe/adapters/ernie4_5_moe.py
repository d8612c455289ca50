from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="ernie4_5_moe",
    block_classes=("Ernie4_5_MoeSparseMoeBlock",),
    description="ERNIE-4.5 MoE (21B-A3B, 300B-A47B): softmax top-k with correction bias, shared experts",
    shared_expert_attrs=("shared_experts",),
)
