from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="gpt_oss",
    block_classes=("GptOssMLP",),
    description="gpt-oss-20b / 120b: top-k on biased logits then softmax, interleaved clamped SwiGLU with biases",
    router_attr="router",
)
