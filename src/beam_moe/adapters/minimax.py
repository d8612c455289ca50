from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="minimax",
    block_classes=("MiniMaxSparseMoeBlock",),
    description="MiniMax-Text-01: lightning (linear) attention hybrid, softmax top-2",
)
