"""The demo corpus: deterministic, in the real datasets' shapes, answers true to the world, held-out rule kept."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat.configargs import UsageError
from nanochat.demo_data import (
    COLORS,
    HABITATS,
    MANIFEST_NAME,
    PARTIAL_NAME,
    PEOPLE,
    SOUNDS,
    TASK_FILES,
    DemoCorpusConfig,
    World,
    build_world,
    write_demo_corpus,
)
from scripts.demo_data import cli

SMALL = dict(n_countries=20, n_objects=16, n_animals=16, pretrain_megabytes=0.2, num_shards=3,
             rows_per_row_group=32, n_smoltalk_train=150, n_smoltalk_test=60, n_mmlu_train=120, n_mmlu_test=60,
             n_arc_train=120, n_arc_test=60, n_gsm8k_train=80, n_gsm8k_test=40, n_identity=6)
TRAIN_FILES = ("smoltalk_train.jsonl", "mmlu_auxiliary_train.jsonl", "arc_easy_train.jsonl",
               "arc_challenge_train.jsonl", "gsm8k_train.jsonl", "identity.jsonl")
SUM_PATTERNS = (r"(\d+) plus (\d+)", r"(\d+) \+ (\d+)", r"[Aa]dd (\d+) and (\d+)", r"sum of (\d+) and (\d+)",
                r"(\d+) and (\d+) make")


def small_config(**changes) -> DemoCorpusConfig:
    return DemoCorpusConfig(**{**SMALL, **changes})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def shard_texts(path: Path) -> list[str]:
    return pq.read_table(path).column("text").to_pylist()


def name_pattern(names: list[str]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")(s|es)?\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, World, dict]:
    root = tmp_path_factory.mktemp("demo")
    config = small_config()
    manifest = write_demo_corpus(root, config)
    return root, build_world(config), manifest


# ------------------------------------------------------------------ an oracle that answers from the world

def lookups(world: World) -> dict[str, dict]:
    return {
        "capital": {c.name: c.capital for c in world.countries},
        "country": {c.capital: c.name for c in world.countries},
        "thing": {t.name: t for t in world.things},
        "animal": {a.name: a for a in world.animals},
    }


def singular(word: str, table: dict) -> str:
    for candidate in (word, word[:-1], word[:-2]):
        if candidate in table:
            return candidate
    raise KeyError(word)


def only_match(choices: list[str], keep) -> str:
    matches = [c for c in choices if keep(c)]
    assert len(matches) == 1, (choices, matches)
    return matches[0]


def expected_answer(question: str, choices: list[str] | None, world: World) -> str:
    """The right answer worked out from the world's facts, independently of the generator's templates."""
    look = lookups(world)
    things, animals = look["thing"], look["animal"]
    if m := re.search(r"How many legs do (\d+) (\w+) have in total", question):
        return str(int(m[1]) * animals[singular(m[2], animals)].legs)
    if m := re.search(r"has a (\w+), a (\w+) and a (\w+)\. How many of them are (\w+)", question):
        return str(sum(things[m[i]].color == m[4] for i in (1, 2, 3)))
    if m := re.search(r"Which animal that (.+) also (.+)\?", question):
        conditions = [m[1], m[2]]

        def satisfies(animal, condition: str) -> bool:
            return condition in (f"has {animal.legs} legs", f"lives in the {animal.habitat}", animal.sound)
        return only_match(choices, lambda c: all(satisfies(animals[c], cond) for cond in conditions))
    if m := re.search(r"Which of these objects is (\w+)\?", question):
        return only_match(choices, lambda c: things[c].color == m[1])
    if m := re.search(r"Which of these animals has (\d) legs\?", question):
        return only_match(choices, lambda c: animals[c].legs == int(m[1]))
    if m := re.search(r"Which of these animals lives in the (\w+)\?", question):
        return only_match(choices, lambda c: animals[c].habitat == m[1])
    if m := re.search(r"Which of these animals (\w+)\?", question):
        return only_match(choices, lambda c: animals[c].sound == m[1])
    if m := re.search(r"(\w+) is the capital of which country|has (\w+) as its capital|is (\w+) the capital",
                      question):
        return look["country"][m[1] or m[2] or m[3]]
    if m := re.search(r"capital of (\w+)", question):
        return look["capital"][m[1]]
    if m := re.search(r"color (?:is|of) (?:the|a) (\w+)", question):
        return things[m[1]].color
    if m := re.search(r"legs does (?:the|a) (\w+) have", question):
        return str(animals[m[1]].legs)
    if m := re.search(r"Where does the (\w+) live|home of the (\w+)", question):
        return animals[m[1] or m[2]].habitat
    if m := re.search(r"Where do (\w+) live", question):
        return animals[singular(m[1], animals)].habitat
    if m := re.search(r"(?:sound|noise) does (?:the|a) (\w+) make", question):
        return animals[m[1]].sound
    for pattern in SUM_PATTERNS:
        if m := re.search(pattern, question):
            return str(int(m[1]) + int(m[2]))
    raise AssertionError(f"the oracle does not know this question: {question!r}")


def mc_rows(root: Path, name: str) -> list[tuple[str, list[str], int]]:
    rows = read_jsonl(root / "tasks" / name)
    if name.startswith("arc"):
        return [(r["question"], r["choices"]["text"], "ABCD".index(r["answerKey"])) for r in rows]
    return [(r["question"], r["choices"], r["answer"]) for r in rows]


# ------------------------------------------------------------------------------------------------ tests

def test_same_config_gives_identical_bytes(tmp_path, corpus):
    root, _, _ = corpus
    again = tmp_path / "again"
    write_demo_corpus(again, small_config())
    written = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in written:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = build_world(small_config(seed=1))
    assert [c.name for c in other.countries] != [c.name for c in build_world(small_config()).countries]


def test_names_are_unique_pronounceable_and_not_template_words():
    world = build_world(DemoCorpusConfig())
    names = [n.lower() for n in world.entity_names(True) + world.entity_names(False)]
    assert len(names) == len(set(names)) == 2 * 100 + 50 + 40
    english = {w.lower() for w in (*COLORS, *HABITATS, *PEOPLE, *SOUNDS, "legs", "capital", "country")}
    for name in names:
        assert re.fullmatch(r"[a-z]{5,}", name), name
        assert not re.search(r"[^aeiou]{3}", name), f"{name} has three consonants in a row"
        assert len(re.findall(r"[aeiou]", name)) >= 2, name
        assert name not in english
    for a in names:
        assert not any(b != a and b.startswith(a) for b in names), f"{a} is the start of another name"


def test_parquet_shards_have_one_text_column_row_groups_and_a_fresh_val_shard(corpus):
    root, _, manifest = corpus
    shards = sorted((root / "base_data").glob("*.parquet"))
    assert [p.name for p in shards] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    total = 0
    for path in shards:
        meta = pq.ParquetFile(path)
        assert meta.schema_arrow.names == ["text"] and str(meta.schema_arrow.field("text").type) == "string"
        assert meta.metadata.num_row_groups >= 2
        assert all(meta.metadata.row_group(i).num_rows <= 32 for i in range(meta.metadata.num_row_groups))
        texts = shard_texts(path)
        assert manifest["files"][f"base_data/{path.name}"]["rows"] == len(texts)
        total += sum(len(t.encode()) for t in texts)
    assert total == manifest["pretrain_text_bytes"]
    assert 0.2e6 <= total < 0.2e6 + 3 * 5000
    train = set(shard_texts(shards[0])) | set(shard_texts(shards[1]))
    val = shard_texts(shards[-1])
    assert sum(doc in train for doc in val) < 0.05 * len(val), "the validation shard repeats training documents"


def test_task_files_have_the_real_datasets_shapes(corpus):
    root, _, manifest = corpus
    tasks = root / "tasks"
    assert sorted(p.name for p in tasks.iterdir()) == sorted(TASK_FILES)
    for name in TASK_FILES:
        rows = read_jsonl(tasks / name)
        assert rows and manifest["files"][f"tasks/{name}"]["rows"] == len(rows)
    for name in ("smoltalk_train.jsonl", "smoltalk_test.jsonl", "identity.jsonl"):
        for row in read_jsonl(tasks / name):
            assert list(row) == ["messages"]
            roles = [m["role"] for m in row["messages"] if m["role"] != "system"]
            assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
            assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    smoltalk = read_jsonl(tasks / "smoltalk_train.jsonl")
    assert any(len(r["messages"]) > 2 for r in smoltalk) and any(r["messages"][0]["role"] == "system"
                                                                 for r in smoltalk)
    for name in ("mmlu_auxiliary_train.jsonl", "mmlu_test.jsonl"):
        for row in read_jsonl(tasks / name):
            assert set(row) == {"question", "subject", "choices", "answer"}
            assert len(row["choices"]) == 4 and row["answer"] in range(4) and isinstance(row["subject"], str)
    for name in ("arc_easy_train.jsonl", "arc_easy_test.jsonl", "arc_challenge_train.jsonl",
                 "arc_challenge_test.jsonl"):
        ids = set()
        for row in read_jsonl(tasks / name):
            assert set(row) == {"id", "question", "choices", "answerKey"}
            assert row["choices"]["label"] == ["A", "B", "C", "D"] and len(row["choices"]["text"]) == 4
            assert row["answerKey"] in "ABCD"
            ids.add(row["id"])
        assert len(ids) == manifest["files"][f"tasks/{name}"]["rows"]
    for row in read_jsonl(tasks / "humaneval_test.jsonl"):
        assert set(row) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
        assert "def check(candidate)" in row["test"] and f"def {row['entry_point']}(" in row["prompt"]
    identity = " ".join(m["content"] for r in read_jsonl(tasks / "identity.jsonl") for m in r["messages"])
    assert "nanochat" in identity


@pytest.mark.parametrize("name", ["mmlu_auxiliary_train.jsonl", "mmlu_test.jsonl", "arc_easy_train.jsonl",
                                  "arc_easy_test.jsonl", "arc_challenge_train.jsonl",
                                  "arc_challenge_test.jsonl"])
def test_multiple_choice_answers_agree_with_the_world(corpus, name):
    root, world, _ = corpus
    for question, choices, answer in mc_rows(root, name):
        assert len(set(choices)) == 4, (question, choices)
        assert choices[answer] == expected_answer(question, choices, world), (question, choices, answer)


def test_conversation_answers_agree_with_the_world(corpus):
    root, world, _ = corpus
    checked = 0
    for name in ("smoltalk_train.jsonl", "smoltalk_test.jsonl"):
        for row in read_jsonl(root / "tasks" / name):
            turns = [m for m in row["messages"] if m["role"] != "system"]
            for user, assistant in zip(turns[::2], turns[1::2]):
                try:
                    expected = expected_answer(user["content"], None, world)
                except AssertionError:
                    continue  # chit-chat
                assert re.search(rf"\b{re.escape(expected)}\b", assistant["content"]), (user, assistant)
                checked += 1
    assert checked > 150


def test_gsm8k_answers_show_correct_calculations_and_end_with_the_result(corpus):
    root, _, _ = corpus
    for name in ("gsm8k_train.jsonl", "gsm8k_test.jsonl"):
        for row in read_jsonl(root / "tasks" / name):
            *steps, last = row["answer"].split("\n")
            final = re.fullmatch(r"#### (\d+)", last)
            assert final, row["answer"]
            calcs = [re.findall(r"<<([0-9+\-*/]+)=(\d+)>>", step) for step in steps]
            assert all(len(c) == 1 for c in calcs), row["answer"]
            for expr, result in (c[0] for c in calcs):
                assert eval(expr) == int(result), (expr, result)  # our own arithmetic, digits and + - * /
            assert int(calcs[-1][0][1]) == int(final[1])


def test_heldout_entities_appear_only_in_pretraining_and_test_splits(corpus):
    root, world, _ = corpus
    heldout = world.entity_names(heldout=True)
    pattern = name_pattern(heldout)
    for name in TRAIN_FILES:
        text = (root / "tasks" / name).read_text(encoding="utf-8")
        assert not pattern.search(text), f"{name} mentions held-out {pattern.search(text)[0]}"
    train_text = "\n".join(t for p in sorted((root / "base_data").glob("*.parquet"))[:-1] for t in shard_texts(p))
    missing = [n for n in heldout + world.entity_names(heldout=False) if not name_pattern([n]).search(train_text)]
    assert not missing, f"never stated in the training shards: {missing}"


def sums_in(text: str) -> set[tuple[int, int]]:
    pairs = {(int(a), int(b)) for pattern in SUM_PATTERNS for a, b in re.findall(pattern, text)}
    pairs |= {(int(a), int(b)) for a, b in re.findall(r"<<(\d+)\+(\d+)=", text)}
    pairs |= {(int(s) - int(c), int(c)) for s, c in re.findall(r"<<(\d+)-(\d+)=", text)}
    return pairs


def test_heldout_sums_never_appear_in_pretraining_or_train_splits(corpus):
    root, world, _ = corpus
    seen_anywhere: set[tuple[int, int]] = set()
    for path in sorted((root / "base_data").glob("*.parquet")):
        seen_anywhere |= sums_in("\n".join(shard_texts(path)))
    for name in TRAIN_FILES:
        seen_anywhere |= sums_in((root / "tasks" / name).read_text(encoding="utf-8"))
    assert len(seen_anywhere) > 500
    assert not [p for p in seen_anywhere if world.sum_is_heldout(*p)]
    test_sums = sums_in((root / "tasks" / "smoltalk_test.jsonl").read_text(encoding="utf-8"))
    assert test_sums and all(world.sum_is_heldout(*p) for p in test_sums)


def test_test_splits_ask_only_about_heldout_entities_and_unseen_sums(corpus):
    root, world, _ = corpus
    heldout = name_pattern(world.entity_names(heldout=True))

    def about_heldout(text: str) -> bool:
        return bool(heldout.search(text)) or any(world.sum_is_heldout(*p) for p in sums_in(text))

    for name in ("mmlu_test.jsonl", "arc_easy_test.jsonl", "arc_challenge_test.jsonl"):
        for question, choices, answer in mc_rows(root, name):
            assert about_heldout(question + " " + choices[answer]), (question, choices[answer])
    for row in read_jsonl(root / "tasks" / "smoltalk_test.jsonl"):
        for message in row["messages"]:
            if message["role"] == "user":
                assert about_heldout(message["content"]), message
    for row in read_jsonl(root / "tasks" / "gsm8k_test.jsonl"):
        assert heldout.search(row["question"]), row["question"]


def test_humaneval_canonical_solutions_pass_and_a_wrong_one_fails(corpus):
    root, _, _ = corpus
    rows = read_jsonl(root / "tasks" / "humaneval_test.jsonl")
    assert len(rows) >= 5
    for row in rows:
        scope: dict = {}
        exec(row["prompt"] + row["canonical_solution"] + "\n" + row["test"], scope)  # our own generated code
        scope["check"](scope[row["entry_point"]])
        wrong: dict = {}
        exec(row["prompt"] + "    return None\n\n" + row["test"], wrong)
        with pytest.raises((AssertionError, TypeError)):
            wrong["check"](wrong[row["entry_point"]])


def test_rerun_is_a_noop_other_settings_need_force_and_force_rewrites(tmp_path):
    config = small_config(pretrain_megabytes=0.05, num_shards=3)
    first = write_demo_corpus(tmp_path, config)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert write_demo_corpus(tmp_path, config) == first
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    smaller = small_config(pretrain_megabytes=0.05, num_shards=2)
    with pytest.raises(UsageError, match="--force"):
        write_demo_corpus(tmp_path, smaller)
    rewritten = write_demo_corpus(tmp_path, smaller, force=True)
    assert rewritten["config"]["num_shards"] == 2
    assert sorted(p.name for p in (tmp_path / "base_data").iterdir()) == ["shard_00000.parquet",
                                                                          "shard_00001.parquet"]
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == rewritten
    assert not (tmp_path / PARTIAL_NAME).exists()

    (tmp_path / "tasks" / "mmlu_test.jsonl").unlink()
    assert write_demo_corpus(tmp_path, smaller) == rewritten, "a missing file is written again"
    assert (tmp_path / "tasks" / "mmlu_test.jsonl").is_file()


def test_a_stopped_run_resumes_but_foreign_shards_are_refused(tmp_path):
    config = small_config(pretrain_megabytes=0.05)
    (tmp_path / "base_data").mkdir()
    (tmp_path / "base_data" / "shard_00000.parquet").write_bytes(b"real data")
    with pytest.raises(UsageError, match="--force"):
        write_demo_corpus(tmp_path, config)
    (tmp_path / PARTIAL_NAME).write_text("{}")  # what a demo run killed half-way leaves behind
    manifest = write_demo_corpus(tmp_path, config)
    assert (tmp_path / MANIFEST_NAME).is_file() and not (tmp_path / PARTIAL_NAME).exists()
    assert pq.ParquetFile(tmp_path / "base_data" / "shard_00000.parquet").metadata.num_rows == \
        manifest["files"]["base_data/shard_00000.parquet"]["rows"]


@pytest.mark.parametrize("changes", [dict(num_shards=1), dict(heldout_fraction=1.0), dict(n_countries=6),
                                     dict(pretrain_megabytes=0.0), dict(rows_per_row_group=0),
                                     dict(n_mmlu_test=0)])
def test_bad_settings_are_usage_errors(changes):
    with pytest.raises(UsageError):
        small_config(**changes)


def test_cli_writes_the_cache_and_exits_2_on_bad_values(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    small_flags = ["--n-countries", "20", "--n-objects", "16", "--n-animals", "16", "--pretrain-megabytes",
                   "0.05", "--n-smoltalk-train", "20", "--n-smoltalk-test", "10"]
    assert cli(small_flags) == 0
    assert "wrote" in capsys.readouterr().out
    section = json.loads((tmp_path / "report" / "demo_data.json").read_text())
    assert section["generated"] is True and section["task_rows"]["smoltalk_test.jsonl"] == 10
    assert cli(small_flags) == 0 and "already present" in capsys.readouterr().out
    assert cli(small_flags + ["--seed", "3"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli(small_flags + ["--seed", "3", "--force"]) == 0
    assert cli(["--num-shards", "1"]) == 2
    assert cli(["--heldout-fraction", "0"]) == 2
    with pytest.raises(SystemExit) as exc:
        cli(["--seed", "seven"])
    assert exc.value.code == 2


def test_default_config_writes_about_3_megabytes_quickly(tmp_path):
    start = time.perf_counter()
    manifest = write_demo_corpus(tmp_path, DemoCorpusConfig())
    seconds = time.perf_counter() - start
    assert seconds < 20, f"default demo corpus took {seconds:.1f}s"
    assert 3.0e6 <= manifest["pretrain_text_bytes"] < 3.0e6 + 4 * 5000
    assert len(manifest["heldout"]) == 2 * 30 + 15 + 12
