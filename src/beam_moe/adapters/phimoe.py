from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="phimoe",
    block_classes=("PhimoeSparseMoeBlock",),
    description="Phi-3.5-MoE: SparseMixer top-2 routing, no shared experts",
    router_attr="router",
)
