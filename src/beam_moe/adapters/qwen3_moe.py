from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="qwen3_moe",
    block_classes=("Qwen3MoeSparseMoeBlock",),
    description="Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax top-k, norm_topk_prob, no shared experts",
)
