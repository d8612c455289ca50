from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="olmoe",
    block_classes=("OlmoeSparseMoeBlock",),
    description="OLMoE-1B-7B: softmax top-k without renormalisation, no shared experts",
)
