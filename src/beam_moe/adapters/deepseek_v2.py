from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="deepseek_v2",
    block_classes=("DeepseekV2Moe",),
    description="DeepSeek-V2 / V2-Lite: softmax, greedy or group-limited top-k, routed scaling, shared experts",
    shared_expert_attrs=("shared_experts",),
)
