from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="flex_olmo",
    block_classes=("FlexOlmoSparseMoeBlock",),
    description="FlexOlmo: OLMoE-style softmax top-k over independently trained experts",
)
