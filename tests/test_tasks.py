"""Task loaders on files in the real datasets' formats and on the demo corpus; grading; mixtures; offline errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.configargs import UsageError
from nanochat.demo_data import TASK_FILES, DemoCorpusConfig, write_demo_corpus
from nanochat.tasks import (
    GSM8K,
    MMLU,
    TASKS,
    ARCChallenge,
    ARCEasy,
    HumanEval,
    Identity,
    LocalDataFiles,
    SmolTalk,
    TaskMixture,
    TaskSequence,
    make_task,
    require_available,
)
from nanochat.tasks.gsm8k import final_number, solution_parts
from nanochat.tasks.humaneval import extract_code, program
from nanochat.tasks.multiple_choice import answer_letter
from nanochat.tokenizer import train_tokenizer
from tests.conftest import REPO
from tests.fixtures.real_formats import write_real_format_files


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real_formats")
    return write_real_format_files(folder / "files"), folder / "hf"


def _local(files, name, hf_cache):
    builder = "json" if files[name].endswith(".jsonl") else "parquet"
    return LocalDataFiles(builder, (files[name],), cache_dir=hf_cache)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["The capital of Zorbia is Lumton. What is 2 + 2? 4. Answer with the letter of the correct choice.",
             "def add(a, b):\n    return a + b\n"] * 20
    return train_tokenizer(texts, 300)


def test_smoltalk_real_format(real_files, tokenizer):
    files, hf = real_files
    task = SmolTalk("train", source=_local(files, "smoltalk", hf))
    assert len(task) == 2 and task.kind == "generative"
    first = task[0]
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    ids, mask = tokenizer.render_conversation(first, 10_000)
    assert sum(mask) > 0 and len(ids) == len(mask)


def test_mmlu_flat_and_nested_rows_give_the_same_examples(real_files):
    files, hf = real_files
    flat = MMLU("test", source=_local(files, "mmlu_test", hf))
    nested = MMLU("auxiliary_train", source=_local(files, "mmlu_aux_nested", hf))
    assert len(flat) == len(nested) == 3 and flat.kind == "categorical"
    assert [flat[i] for i in range(3)] == [nested[i] for i in range(3)]
    example = flat[1]
    assert example["answer"] == "C" and example["letters"] == ["A", "B", "C", "D"]
    assert example["messages"][1] == {"role": "assistant", "content": "C"}
    assert "C. Heart" in example["messages"][0]["content"]
    assert flat.evaluate(example, "C") and flat.evaluate(example, " (c) Heart") and not flat.evaluate(example, "A")
    anatomy = MMLU("test", source=_local(files, "mmlu_test", hf), subject="anatomy")
    assert len(anatomy) == 1 and anatomy[0]["subject"] == "anatomy"


def test_arc_letters_and_digit_labels(real_files):
    files, hf = real_files
    for cls in (ARCEasy, ARCChallenge):
        task = cls("test", source=_local(files, "arc", hf))
        assert len(task) == 2
        assert task[0]["answer"] == "B" and task[0]["id"] == "Mercury_7175875"
        digits = task[1]
        assert digits["letters"] == ["A", "B", "C"] and digits["answer"] == "C"
        assert task.evaluate(digits, "C.") and not task.evaluate(digits, "B")


def test_gsm8k_tool_calls_and_grading(real_files):
    files, hf = real_files
    task = GSM8K("train", source=_local(files, "gsm8k", hf))
    example = task[0]
    assert example["answer"] == "72"
    parts = example["messages"][1]["content"]
    assert parts == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    assert task[1]["answer"] == "2000"
    assert task.evaluate(example, "so the total is\n#### 72")
    assert task.evaluate(task[1], "#### 2,000")
    assert not task.evaluate(example, "#### 71") and not task.evaluate(example, "The answer is 72.")
    assert final_number("#### -3.50") == "-3.5" and final_number("no answer") is None
    assert solution_parts("no calculations") == [{"type": "text", "text": "no calculations"}]


def test_gsm8k_rendering_masks_tool_output(tokenizer):
    example = {"messages": [{"role": "user", "content": "q"},
                            {"role": "assistant", "content": solution_parts("x <<2+2=4>>4\n#### 4")}]}
    ids, mask = tokenizer.render_conversation(example, 1000)
    out_start, out_end = tokenizer.special_id("<|output_start|>"), tokenizer.special_id("<|output_end|>")
    start, end = ids.index(out_start), ids.index(out_end)
    assert all(m == 0 for m in mask[start:end + 1])
    assert mask[ids.index(tokenizer.special_id("<|python_start|>"))] == 1


def test_humaneval_fields_and_program(real_files):
    files, hf = real_files
    task = HumanEval("test", source=_local(files, "humaneval", hf))
    example = task[0]
    assert example["entry_point"] == "add" and example["task_id"] == "HumanEval/0"
    assert example["messages"][1]["content"].endswith("return a + b\n")
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(fenced) == "def add(a, b):\n    return a + b\n"
    for completion in (fenced, "    return a + b\n", "    return a - b\n"):
        script = program(example, completion)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True)
        assert (result.returncode == 0) == ("a + b" in completion)
    with pytest.raises(NotImplementedError):
        task.evaluate(example, fenced)


def test_letter_extraction():
    assert answer_letter("B") == "B" and answer_letter(" b. yes") == "B" and answer_letter("(D)") == "D"
    assert answer_letter("Banana") is None and answer_letter("") is None


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = DemoCorpusConfig(pretrain_megabytes=0.01, num_shards=2, n_smoltalk_train=12, n_smoltalk_test=5,
                              n_mmlu_train=6, n_mmlu_test=5, n_arc_train=6, n_arc_test=5, n_gsm8k_train=6,
                              n_gsm8k_test=5, n_identity=4)
    write_demo_corpus(root, config)
    return root


@pytest.mark.parametrize("name, split, count", [
    ("smoltalk", "train", 12), ("smoltalk", "test", 5), ("mmlu", "auxiliary_train", 6), ("mmlu", "test", 5),
    ("arc_easy", "train", 6), ("arc_challenge", "test", 5), ("gsm8k", "train", 6), ("gsm8k", "test", 5),
    ("humaneval", "test", 8), ("identity", "train", 4),
])
def test_demo_corpus_tasks(demo_root, tokenizer, name, split, count):
    task = make_task(name, split, root=demo_root)
    assert len(task) == count
    for example in task.examples():
        ids, mask = tokenizer.render_conversation(example, 100_000)
        assert sum(mask) >= 1
        if task.kind == "categorical":
            assert task.evaluate(example, example["answer"])
        elif name == "gsm8k":
            assert any(p["type"] == "python" for p in example["messages"][1]["content"])
            assert task.evaluate(example, f"#### {example['answer']}")


def test_every_demo_task_file_has_a_task(demo_root):
    names = {f"{task.name}" for task in TASKS.values()}
    for file_name in TASK_FILES:
        stem = file_name.removesuffix(".jsonl")
        assert any(stem == n or stem.startswith(n + "_") for n in names), file_name


def test_identity_file_override_and_missing(tmp_path, demo_root):
    custom = tmp_path / "me.jsonl"
    custom.write_text(json.dumps({"messages": [{"role": "user", "content": "who are you?"},
                                               {"role": "assistant", "content": "a test model"}]}) + "\n")
    task = Identity(path=custom, root=demo_root)
    assert len(task) == 1 and task[0]["messages"][1]["content"] == "a test model"
    with pytest.raises(UsageError, match="--identity-file"):
        require_available([Identity(path=tmp_path / "absent.jsonl")])


def test_missing_demo_file_names_the_demo_stage(demo_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(demo_root, root)
    (root / "tasks" / "gsm8k_train.jsonl").unlink()
    with pytest.raises(UsageError, match="python -m scripts.demo_data"):
        require_available([make_task("gsm8k", "train", root=root)])


def test_mixture_is_a_deterministic_shuffle(demo_root):
    tasks = [make_task("smoltalk", "train", root=demo_root), make_task("gsm8k", "train", root=demo_root)]
    a, b = TaskMixture(tasks, seed=3), TaskMixture(tasks, seed=3)
    other = TaskMixture(tasks, seed=4)
    order_a = [json.dumps(x, sort_keys=True) for x in a.examples()]
    assert order_a == [json.dumps(x, sort_keys=True) for x in b.examples()]
    assert order_a != [json.dumps(x, sort_keys=True) for x in other.examples()]
    everything = sorted(json.dumps(x, sort_keys=True) for t in tasks for x in t.examples())
    assert sorted(order_a) == everything and len(a) == 18
    assert len(TaskMixture([tasks[1]] * 3, seed=0)) == 18
    sequence = TaskSequence(tasks)
    assert len(sequence) == 18 and sequence[12] == tasks[1][0] and sequence[11] == tasks[0][11]
    with pytest.raises(IndexError):
        sequence[18]


def test_offline_missing_hub_dataset_is_one_usage_line(tmp_path):
    """With HF offline and an empty cache: one UsageError line naming the download step, no network use."""
    script = (
        "from pathlib import Path\n"
        "from nanochat.configargs import UsageError\n"
        "from nanochat.tasks import GSM8K, MMLU, SmolTalk, TaskMixture, require_available\n"
        f"root = Path({str(tmp_path)!r})\n"
        "tasks = TaskMixture([SmolTalk('train', root=root), MMLU('auxiliary_train', root=root)])\n"
        "try:\n"
        "    require_available([tasks, GSM8K('test', root=root)])\n"
        "except UsageError as exc:\n"
        "    print(exc)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "NO_PROXY": "*", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    line = lines[0]
    assert "bash scripts/download_data.sh" in line and "offline" in line
    for name in ("HuggingFaceTB/smol-smoltalk", "cais/mmlu/auxiliary_train", "openai/gsm8k/main [test]"):
        assert name in line
    assert not (Path(tmp_path) / "hf" / "downloads").exists()


def test_bad_split_and_unknown_task():
    with pytest.raises(ValueError, match="splits"):
        GSM8K("validation")
    with pytest.raises(ValueError, match="unknown task"):
        make_task("squad", "train")
