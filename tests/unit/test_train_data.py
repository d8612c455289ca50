"""Training data: every source format, assistant-only loss, packing, the validation split, bad files."""

import json

import pytest
import torch

from beam_moe import BeamError
from beam_moe.tiny_models import CHAT_TEMPLATE, byte_tokenizer
from beam_moe.train.data import (
    IGNORE,
    BatchSchedule,
    Tokenizer,
    load_training_data,
    read_records,
    tokenize_blocks,
)
from helpers.training import write_chat_jsonl, write_text_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_text_records_are_packed_with_eos_and_full_loss(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text('{"text": "abc"}\n\n{"text": "de"}\n')
    blocks = tokenize_blocks([str(tmp_path / "a.jsonl")], tokenizer, max_length=4, packing=True)
    eos = tokenizer.eos_token_id
    expected = [*tokenizer("abc")["input_ids"], eos, *tokenizer("de")["input_ids"], eos]
    assert blocks.input_ids.shape == (2, 4)
    assert blocks.input_ids.flatten().tolist()[:7] == expected
    assert blocks.attention_mask.flatten().tolist() == [1] * 7 + [0]
    assert blocks.labels.flatten().tolist() == [*expected, IGNORE]


def test_chat_loss_is_on_assistant_tokens_only(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    blocks = tokenize_blocks([str(path)], tokenizer, max_length=64, packing=False)
    labelled = blocks.labels[blocks.labels != IGNORE].tolist()
    assert tokenizer.decode(labelled) == "hello<|im_end|>"


def test_templates_without_generation_markers_find_the_assistant_turns(tmp_path, tokenizer):
    path = write_chat_jsonl(tmp_path / "chat.jsonl", n=5)
    marked = Tokenizer(tokenizer)
    plain_tokenizer = byte_tokenizer()
    plain_tokenizer.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    plain = Tokenizer(plain_tokenizer)
    for record in read_records([str(path)]):
        (ids, by_markers), (plain_ids, by_prefixes) = marked(record), plain(record)
        assert ids == plain_ids
        assert any(by_markers) and not all(by_prefixes)
        assert all(b for a, b in zip(by_markers, by_prefixes, strict=True) if a)
        # Without markers the span runs to the next turn, so it also takes the template's newline.
        extra = [t for t, a, b in zip(ids, by_markers, by_prefixes, strict=True) if b and not a]
        assert tokenizer.decode(extra).strip() == ""


def test_folders_of_txt_and_jsonl_and_saved_datasets(tmp_path, tokenizer):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("first document")
    write_text_jsonl(folder / "sub" / "more.jsonl", n=3)
    (folder / "ignored.md").write_text("not data")
    records = read_records([str(folder)])
    assert records[0].text == "first document"
    assert len(records) == 4

    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"text": "from a dataset"}] * 2)}).save_to_disk(tmp_path / "ds")
    records = read_records([str(tmp_path / "ds")])
    assert [r.text for r in records] == ["from a dataset"] * 2


def test_no_packing_truncates_to_max_length(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text('{"text": "a long document"}\n{"text": "b"}\n')
    blocks = tokenize_blocks([str(tmp_path / "a.jsonl")], tokenizer, max_length=5, packing=False)
    assert blocks.input_ids.shape == (2, 5)
    assert blocks.attention_mask.tolist() == [[1] * 5, [1, 1, 0, 0, 0]]


def test_validation_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = str(write_text_jsonl(tmp_path / "t.jsonl", n=100))
    a = load_training_data([path], None, tokenizer, 32, True, 0.1, seed=3)
    b = load_training_data([path], None, tokenizer, 32, True, 0.1, seed=3)
    assert torch.equal(a.val.input_ids, b.val.input_ids)
    assert len(a.val) == round(0.1 * (len(a.train) + len(a.val)))
    train_rows = {tuple(r) for r in a.train.input_ids.tolist()}
    assert not any(tuple(r) in train_rows for r in a.val.input_ids.tolist())
    explicit = load_training_data([path], [path], tokenizer, 32, True, 0.1, seed=3)
    assert len(explicit.val) == len(explicit.train)


def test_batch_schedule_covers_each_epoch_once_and_splits_by_process():
    schedule = BatchSchedule(num_blocks=20, batch_size=2, grad_accum=2, processes=2, seed=0)
    assert schedule.steps_per_epoch == 2
    seen = torch.cat([schedule.global_indices(s) for s in range(2)]).tolist()
    assert len(set(seen)) == 16
    assert schedule.global_indices(2).tolist() != schedule.global_indices(0).tolist()
    shares = [torch.cat(schedule.micro_batches(5, rank)) for rank in range(2)]
    assert torch.cat(shares).tolist() == schedule.global_indices(5).tolist()
    with pytest.raises(BeamError, match="fewer than one optimizer step needs"):
        BatchSchedule(num_blocks=3, batch_size=2, grad_accum=1, processes=2, seed=0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": "ok"\n', r"bad\.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n\n{"prompt": "x"}\n', r'bad\.jsonl:3: expected an object with a "text" string'),
        ('{"messages": [{"role": "user"}]}\n', r'bad\.jsonl:1: every message needs a "role" and a "content"'),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, tokenizer, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(BeamError, match=message):
        tokenize_blocks([str(tmp_path / "bad.jsonl")], tokenizer, 16, True)


def test_missing_and_empty_data_are_refused(tmp_path, tokenizer):
    with pytest.raises(BeamError, match="does not exist"):
        read_records([str(tmp_path / "nope.jsonl")])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(BeamError, match="the data is empty"):
        tokenize_blocks([str(tmp_path / "empty.jsonl")], tokenizer, 16, True)
    (tmp_path / "user_only.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(BeamError, match="no tokens to train on"):
        tokenize_blocks([str(tmp_path / "user_only.jsonl")], tokenizer, 16, True)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(BeamError, match="holds no .txt or .jsonl files"):
        read_records([str(tmp_path / "empty_dir")])
