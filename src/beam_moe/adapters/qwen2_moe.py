from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="qwen2_moe",
    block_classes=("Qwen2MoeSparseMoeBlock",),
    description="Qwen2-MoE / Qwen1.5-MoE-A2.7B: softmax top-k, one shared expert behind a sigmoid gate",
    shared_expert_attrs=("shared_expert",),
)
