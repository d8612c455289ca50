from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="deepseek_v3",
    block_classes=("DeepseekV3MoE",),
    description="DeepSeek-V3 / R1 / Kimi-K2: sigmoid scores, correction bias, group-limited top-k, shared experts",
    shared_expert_attrs=("shared_experts",),
)
