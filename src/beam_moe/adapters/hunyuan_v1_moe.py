from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="hunyuan_v1_moe",
    block_classes=("HunYuanMoEV1Moe",),
    description="Hunyuan-A13B: softmax top-k (router weight at gate.wg), a shared MLP beside the experts",
    router_weight_attr="wg.weight",
    shared_expert_attrs=("shared_mlp",),
)
