from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="mixtral",
    block_classes=("MixtralSparseMoeBlock",),
    description="Mixtral-8x7B / 8x22B: softmax top-2, renormalised, no shared experts",
)
