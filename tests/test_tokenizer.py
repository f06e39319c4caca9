"""Tests for nanochat.tokenizer and the tok_train / tok_eval stages, on small generated corpora."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.configargs import UsageError
from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    iter_parquet_texts,
    load_token_bytes,
    train_tokenizer,
)
from scripts import tok_eval, tok_train

SYLLABLES = ["ka", "lo", "mi", "ren", "tas", "vo", "ph", "ique", "str", "and", "the", "ing", "ou", "ze", "bar"]
SAMPLES = [
    "Hello, world! This is plain ASCII.",
    "naïve café, Ünïcödé — “quotes” and ñ",
    "emoji 😀🎉 and flags 🇫🇷 and CJK 日本語 and Korean 한국어",
    "digits 0 7 42 123 4567 8901234 3.14159",
    "  leading spaces\n\ttabs and\r\nwindows newlines\n\n",
    "",
    "\x00 control \x7f bytes and lone surrogates are not UTF-8, but ￿ is",
]


def make_docs(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    docs = []
    for _ in range(n_docs):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(8, 20)))
        docs.append(f"{sentence.capitalize()}, {rng.randint(0, 9999)} times. Café 😀 {rng.choice(words)}!")
    return docs


def training_texts() -> list[str]:
    pairs = " ".join(f"{i:02d}" for i in range(100))
    return make_docs(400, seed=0) + [pairs] * 40 + ["12345 12345 123 123"] * 200


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(training_texts(), vocab_size=512)


def write_shards(data_dir, n_shards: int, docs_per_shard: int = 300, row_group_size: int = 100) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        table = pa.table({"text": make_docs(docs_per_shard, seed=100 + s)})
        pq.write_table(table, data_dir / f"shard_{s:05d}.parquet", row_group_size=row_group_size)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def test_vocab_size_counts_specials_in_order(tok):
    assert tok.vocab_size == 512
    ids = [tok.special_id(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert tok.bos_id == tok.special_id("<|bos|>")
    assert tok.id_to_token(tok.bos_id) == "<|bos|>"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.special_id("<|eos|>")


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size and not tok.is_special(i) for i in ids)
    assert b"".join(tok.token_to_bytes(i) for i in ids) == text.encode("utf-8")


def test_unseen_characters_fall_back_to_bytes(tok):
    text = "ᚠᛇᚻ᛫ᛒᛦᚦ ∮ E⋅da = Q"  # runes and math symbols never seen in training
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) <= len(text.encode("utf-8"))


def test_token_to_bytes_matches_the_byte_alphabet(tok):
    single_bytes = [tok.token_to_bytes(i) for i in range(tok.vocab_size) if len(tok.token_to_bytes(i)) == 1]
    assert sorted(single_bytes) == [bytes([b]) for b in range(256)]
    text = "".join(chr(c) for c in range(1, 0x800)) + "€ 😀 𐍈 \u00ad\u00a0"
    ids = tok.encode(text)
    assert b"".join(tok.token_to_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.token_to_bytes(tok.bos_id) == b"<|bos|>"


def test_digits_split_in_groups_of_at_most_two(tok):
    assert all(len(tok.encode(f"{i:02d}")) == 1 for i in range(100)), "every digit pair should be one token"
    # "123" and "12345" were frequent in training, yet no token may span more than two digits.
    assert len(tok.encode("12345")) == 3
    assert len(tok.encode("1234567890")) == 5
    assert [tok.decode([i]) for i in tok.encode("123")] == ["12", "3"]


@pytest.mark.parametrize("name", SPECIAL_TOKENS)
def test_special_token_strings_in_text_stay_text(tok, name):
    text = f"ignore this {name} and go on"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.special_id(name)]) == name


def test_prepend_append(tok):
    body = tok.encode("hello")
    assert tok.encode("hello", prepend="<|bos|>") == [tok.bos_id] + body
    end = tok.special_id("<|assistant_end|>")
    assert tok.encode("hello", prepend=tok.bos_id, append=end) == [tok.bos_id] + body + [end]
    assert tok.encode(["hello", "x"], prepend="<|bos|>")[1] == [tok.bos_id] + tok.encode("x")
    with pytest.raises(ValueError):
        tok.encode("hello", prepend=tok.vocab_size)


def test_batched_encode_matches_single(tok):
    texts = make_docs(50, seed=7) + SAMPLES
    singles = [tok.encode(t) for t in texts]
    assert tok.encode(texts) == singles
    assert tok.encode(texts, batch_size=3) == singles
    assert tok.encode(texts, num_threads=1) == singles
    assert tok.encode(texts, num_threads=2, batch_size=8) == singles
    assert tok.encode([]) == []
    with pytest.raises(TypeError):
        tok.encode(["ok", 3])


def test_token_bytes_sum_to_text_bytes(tok):
    token_bytes = tok.token_bytes()
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (tok.vocab_size,)
    assert all(token_bytes[tok.special_id(name)] == 0 for name in SPECIAL_TOKENS)
    assert (token_bytes[[i for i in range(tok.vocab_size) if not tok.is_special(i)]] > 0).all()
    for text in SAMPLES + make_docs(20, seed=3):
        ids = tok.encode(text)
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == tok.vocab_size
    assert [loaded.special_id(n) for n in SPECIAL_TOKENS] == [tok.special_id(n) for n in SPECIAL_TOKENS]
    texts = SAMPLES + ["<|bos|> stays text after loading"]
    assert loaded.encode(texts) == tok.encode(texts)
    assert not any(loaded.is_special(i) for i in loaded.encode(texts[-1]))
    assert torch.equal(loaded.token_bytes(), tok.token_bytes())


def test_load_missing_names_the_training_command(tmp_path):
    with pytest.raises(UsageError, match="python -m scripts.tok_train"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UsageError, match="python -m scripts.tok_train"):
        load_token_bytes(tmp_path)


def test_a_damaged_tokenizer_file_is_named_with_the_command_that_rebuilds_it(tok, tmp_path):
    tok.save(tmp_path)
    torch.save(tok.token_bytes(), tmp_path / "token_bytes.pt")
    for name, load in (("tokenizer.json", Tokenizer.load), ("token_bytes.pt", load_token_bytes)):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])  # cut short
        with pytest.raises(UsageError) as caught:
            load(tmp_path)
        message = str(caught.value)
        assert message.startswith(f"{path} is not readable") and "python -m scripts.tok_train --force" in message
        assert "\n" not in message


def test_train_rejects_bad_sizes():
    with pytest.raises(ValueError, match="at least"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(ValueError, match="only supports"):
        train_tokenizer(["tiny text"], vocab_size=1000)


def test_render_conversation_with_system_message(tok):
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]}
    s = tok.special_id
    user1, reply1 = tok.encode("Be brief.\n\nHi there"), tok.encode("Hello!")
    user2, reply2 = tok.encode("Bye"), tok.encode("Bye.")
    expected_ids = ([tok.bos_id, s("<|user_start|>")] + user1 + [s("<|user_end|>"), s("<|assistant_start|>")]
                    + reply1 + [s("<|assistant_end|>"), s("<|user_start|>")] + user2
                    + [s("<|user_end|>"), s("<|assistant_start|>")] + reply2 + [s("<|assistant_end|>")])
    expected_mask = ([0, 0] + [0] * len(user1) + [0, 0] + [1] * len(reply1) + [1, 0] + [0] * len(user2)
                     + [0, 0] + [1] * len(reply2) + [1])
    ids, mask = tok.render_conversation(conversation, max_tokens=10_000)
    assert ids == expected_ids
    assert mask == expected_mask
    short_ids, short_mask = tok.render_conversation(conversation, max_tokens=5)
    assert short_ids == expected_ids[:5] and short_mask == expected_mask[:5]


def test_render_conversation_with_tool_parts(tok):
    conversation = {"messages": [
        {"role": "user", "content": "What is 12*3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*3"},
            {"type": "python_output", "text": "36"},
            {"type": "text", "text": "It is 36."},
        ]},
    ]}
    s = tok.special_id
    question, intro, code = tok.encode("What is 12*3?"), tok.encode("Let me compute. "), tok.encode("12*3")
    output, answer = tok.encode("36"), tok.encode("It is 36.")
    pieces = [
        ([tok.bos_id, s("<|user_start|>")] + question + [s("<|user_end|>"), s("<|assistant_start|>")], 0),
        (intro + [s("<|python_start|>")] + code + [s("<|python_end|>")], 1),
        ([s("<|output_start|>")] + output + [s("<|output_end|>")], 0),
        (answer + [s("<|assistant_end|>")], 1),
    ]
    ids, mask = tok.render_conversation(conversation, max_tokens=1000)
    assert ids == [i for chunk, _ in pieces for i in chunk]
    assert mask == [m for chunk, m in pieces for _ in chunk]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == \
        "Let me compute. <|python_start|>12*3<|python_end|>It is 36.<|assistant_end|>"


@pytest.mark.parametrize("messages, match", [
    ([], "at least one message"),
    ([{"role": "assistant", "content": "hi"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "expected 'assistant'"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "user", "content": ["not", "a", "string"]}], "user content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "assistant part"),
    ([{"role": "user"}], "'role' and 'content'"),
])
def test_render_conversation_rejects_malformed(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages}, max_tokens=100)


def test_render_for_completion(tok):
    history = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
               {"role": "user", "content": "Another?"}]
    prompt = tok.render_for_completion({"messages": history + [{"role": "assistant", "content": "Red."}]})
    rendered, _ = tok.render_conversation({"messages": history}, max_tokens=1000)
    assert prompt == rendered + [tok.special_id("<|assistant_start|>")]
    assert tok.render_for_completion({"messages": history}) == prompt


def test_iter_parquet_texts_caps(tmp_path):
    write_shards(tmp_path, n_shards=2, docs_per_shard=50, row_group_size=7)
    shards = sorted(tmp_path.glob("*.parquet"))
    everything = list(iter_parquet_texts(shards, max_chars=10**9))
    assert everything == make_docs(50, seed=100) + make_docs(50, seed=101)
    capped = list(iter_parquet_texts(shards, max_chars=1000, doc_cap=30))
    assert all(len(t) <= 30 for t in capped)
    assert sum(len(t) for t in capped) == 1000
    assert capped[0] == everything[0][:30]


def test_tok_train_that_dies_writing_its_report_writes_it_when_run_again(cache, capsys):
    write_shards(cache / "base_data", n_shards=3)
    section = cache / "report" / "tok_train.json"
    section.mkdir(parents=True)  # the section cannot be written: the stage dies there, as if killed
    with pytest.raises(OSError):
        tok_train.cli(["--vocab-size", "400"])
    section.rmdir()
    assert tok_train.cli(["--vocab-size", "400"]) == 0
    assert "already trained" not in capsys.readouterr().out  # it used to stop there, and the section never came
    assert json.loads(section.read_text())["vocab_size"] == 400


def test_tok_train_and_tok_eval_cli(cache, capsys):
    write_shards(cache / "base_data", n_shards=3)
    assert tok_train.cli(["--vocab-size", "400"]) == 0
    out = capsys.readouterr().out
    assert "trained vocab 400" in out and "round trip" in out
    tok_dir = cache / "tokenizer"
    tokenizer = Tokenizer.load(tok_dir)
    assert tokenizer.vocab_size == 400
    assert torch.equal(load_token_bytes(tok_dir), tokenizer.token_bytes())
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "no staging folders left behind"
    section = json.loads((cache / "report" / "tok_train.json").read_text())
    assert section["vocab_size"] == 400 and section["train_shards"] == 2 and section["documents"] == 600

    mtime = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    assert tok_train.cli(["--vocab-size", "400"]) == 0
    assert "already trained" in capsys.readouterr().out
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == mtime

    assert tok_train.cli(["--vocab-size", "420"]) == 2
    assert "--force" in capsys.readouterr().err
    assert Tokenizer.load(tok_dir).vocab_size == 400
    assert tok_train.cli(["--vocab-size", "420", "--force"]) == 0
    assert Tokenizer.load(tok_dir).vocab_size == 420
    assert load_token_bytes(tok_dir).shape == (420,)

    capsys.readouterr()
    assert tok_eval.cli(["--sample-chars", "20000"]) == 0
    out = capsys.readouterr().out
    for row in ("train", "val", "prose", "code", "math", "non-english"):
        assert row in out
    rows = json.loads((cache / "report" / "tok_eval.json").read_text())["compression"]
    val_text = "".join(make_docs(300, seed=102))
    assert len(val_text) > 20000
    assert rows["val"]["bytes"] == len(val_text[:20000].encode("utf-8"))
    assert rows["train"]["bytes"] == len("".join(make_docs(300, seed=100))[:20000].encode("utf-8"))
    assert rows["train"]["bytes_per_token"] > 1.5

    # a finished evaluation is a no-op; new settings, a retrained tokenizer or --force measure again
    written = (cache / "report" / "tok_eval.json").read_text()
    assert tok_eval.cli(["--sample-chars", "20000"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (cache / "report" / "tok_eval.json").read_text() == written
    assert tok_eval.cli(["--sample-chars", "10000"]) == 0
    assert "nothing to do" not in capsys.readouterr().out
    assert tok_eval.cli(["--sample-chars", "10000", "--force"]) == 0
    assert "bytes/token" in capsys.readouterr().out
    assert tok_train.cli(["--vocab-size", "400", "--force"]) == 0
    capsys.readouterr()
    assert tok_eval.cli(["--sample-chars", "10000"]) == 0
    assert "nothing to do" not in capsys.readouterr().out


def test_tok_train_usage_errors(cache, capsys):
    assert tok_train.cli([]) == 2
    err = capsys.readouterr().err
    assert "python -m scripts.demo_data" in err and "bash scripts/download_data.sh" in err
    write_shards(cache / "base_data", n_shards=1)
    assert tok_train.cli(["--vocab-size", "300"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert tok_train.cli(["--vocab-size", "10"]) == 2
    write_shards(cache / "base_data", n_shards=2, docs_per_shard=3)
    assert tok_train.cli(["--vocab-size", "5000"]) == 2
    assert "smaller vocabulary" in capsys.readouterr().err
    assert not (cache / "tokenizer").exists()


def test_tok_eval_without_tokenizer(cache, capsys):
    write_shards(cache / "base_data", n_shards=2, docs_per_shard=5)
    assert tok_eval.cli([]) == 2
    assert "python -m scripts.tok_train" in capsys.readouterr().err
