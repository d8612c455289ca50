"""The reference MoE's experiment machinery: corpus, tokenizer training, pretraining, quickstart, report.

python -m beam_moe.experiments.refmoe.corpus prepare
python -m beam_moe.experiments.refmoe.pretrain --output runs/refmoe --install
"""
