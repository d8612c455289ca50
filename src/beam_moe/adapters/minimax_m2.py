from beam_moe.adapters.base import MoEFamily

FAMILY = MoEFamily(
    model_type="minimax_m2",
    block_classes=("MiniMaxM2SparseMoeBlock",),
    description="MiniMax-M2: sigmoid-scored top-k with correction bias, no shared experts",
)
