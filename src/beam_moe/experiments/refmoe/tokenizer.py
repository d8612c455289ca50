"""The reference MoE's tokenizer: byte-level BPE trained offline on the corpus's train split.

Byte-level, so any text round-trips. Special tokens follow Qwen's: `<|endoftext|>` (end of document,
also used as padding), `<|im_start|>` and `<|im_end|>` for the ChatML chat template (the same template
as `beam_moe.tiny_models`, with `{% generation %}` markers for assistant masks).
"""

from __future__ import annotations

from collections.abc import Iterable

from beam_moe.tiny_models import CHAT_TEMPLATE

END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A `PreTrainedTokenizerFast` trained on `texts` (deterministic for the same texts in the same order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 30,
    )
