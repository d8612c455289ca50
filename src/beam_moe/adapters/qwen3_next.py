from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="qwen3_next",
    block_classes=("Qwen3NextSparseMoeBlock",),
    description="Qwen3-Next-80B-A3B: hybrid linear attention, 512 experts top-10, one gated shared expert",
    shared_expert_attrs=("shared_expert",),
)
