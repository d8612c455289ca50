import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from beam_moe.tiny_models import BYTE_VOCAB_SIZE, byte_tokenizer, save_tiny


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = byte_tokenizer()
    assert len(tokenizer) == BYTE_VOCAB_SIZE
    text = "Hello, wörld — ½ 日本\n\ttabs"
    ids = tokenizer(text).input_ids
    assert max(ids) < BYTE_VOCAB_SIZE
    assert tokenizer.decode(ids) == text


def test_chat_template_marks_assistant_tokens():
    tokenizer = byte_tokenizer()
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(marked) == "yo<|im_end|>"


def test_saved_tiny_folder_loads_with_auto_classes(tmp_path):
    save_tiny("qwen3_moe", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batch = tokenizer(["some text"], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape[-1] == BYTE_VOCAB_SIZE
