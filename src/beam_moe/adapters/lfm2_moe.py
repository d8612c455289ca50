from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="lfm2_moe",
    block_classes=("Lfm2MoeSparseMoeBlock",),
    description="LFM2-8B-A1B: conv/attention hybrid, sigmoid top-k with expert bias",
)
