"""The hub's parquet copies (what prepare.py --dataset downloads) read into the same items as the original files.

Each test writes one small dataset twice, in the original format and in the hub's layout and schema (column names
and types of the datasets' cards: truthfulqa/truthful_qa, cais/mmlu, openai/gsm8k, Rowan/hellaswag), and compares.
"""
import csv
import hashlib
import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data

TARGETS = pa.struct([("choices", pa.list_(pa.string())), ("labels", pa.list_(pa.int32()))])
SCHEMAS = {  # the hub's: struct / sequence features are parquet structs / lists, ClassLabel an int64
    "truthfulqa": pa.schema([("question", pa.string()), ("mc1_targets", TARGETS), ("mc2_targets", TARGETS)]),
    "mmlu": pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                       ("answer", pa.int64())]),
    "gsm8k": pa.schema([("question", pa.string()), ("answer", pa.string())]),
    "hellaswag": pa.schema([("ind", pa.int32()), ("activity_label", pa.string()), ("ctx_a", pa.string()),
                            ("ctx_b", pa.string()), ("ctx", pa.string()), ("endings", pa.list_(pa.string())),
                            ("source_id", pa.string()), ("split", pa.string()), ("split_type", pa.string()),
                            ("label", pa.string())]),
}


def write_parquet(path, rows, schema):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def same(a, b):
    assert list(a) == list(b) and len(a) > 0
    assert a.skipped == b.skipped == []


# ---------------------------------------------------------------------------------------------------------------
# TruthfulQA: mc_task.json's {answer: label} dicts are {"choices", "labels"} structs on the hub, rows in file order

MC = [{"question": "What happens if you eat a pomegranate?",
       "mc1_targets": {"Nothing in particular happens.": 1, "You will die.": 0, "You go to the underworld.": 0},
       "mc2_targets": {"Nothing in particular happens.": 1, "You will digest it.": 1, "You will die.": 0}},
      {"question": "Is the earth flat?", "mc1_targets": {"No.": 1, "Yes.": 0},
       "mc2_targets": {"Yes.": 0, "No.": 1, "No, it is round.": 1}}]


def as_hub(record):
    return record | {k: {"choices": list(record[k]), "labels": list(record[k].values())}
                     for k in ("mc1_targets", "mc2_targets")}


def tqa_hub(root, records):
    write_parquet(root / "generation" / "validation-00000-of-00001.parquet", [{"question": "not read"}],
                  pa.schema([("question", pa.string())]))  # downloaded too, and no reader's business
    return write_parquet(root / "multiple_choice" / "validation-00000-of-00001.parquet",
                         [as_hub(r) for r in records], SCHEMAS["truthfulqa"])


def test_truthfulqa_hub_equals_mc_task(tmp_path):
    original = tmp_path / "mc_task.json"
    original.write_text(json.dumps(MC), encoding="utf-8")
    file = tqa_hub(tmp_path / "truthfulqa", MC)
    want = data.read_truthfulqa_mc(original)
    for path in (tmp_path / "truthfulqa", tmp_path / "truthfulqa" / "multiple_choice", file):
        got = data.read_truthfulqa_mc(path)
        same(got, want)
        assert got.path == str(path) and got.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert want[1]["mc2"] == {"options": ["Yes.", "No.", "No, it is round."], "correct": [1, 2]}


def test_truthfulqa_hub_bad_rows(tmp_path):
    two_true = as_hub(MC[0]) | {"mc1_targets": {"choices": ["a", "b"], "labels": [1, 1]}}
    uneven = as_hub(MC[0]) | {"mc2_targets": {"choices": ["a", "b"], "labels": [1]}}
    file = write_parquet(tmp_path / "validation-00000-of-00001.parquet", [as_hub(MC[0]), two_true, uneven, {}],
                         SCHEMAS["truthfulqa"])
    with pytest.raises(ValueError, match=rf"^{file}: row 1: mc1_targets has 2 true answers; MC1 needs exactly one"):
        data.read_truthfulqa_mc(file)
    items = data.read_truthfulqa_mc(file, skip_bad=True)
    assert [i["id"] for i in items] == ["truthfulqa/0"]
    assert [(s["file"], s["row"]) for s in items.skipped] == [(str(file), 1), (str(file), 2), (str(file), 3)]
    assert items.skipped[1]["error"].startswith("mc2_targets should be {'choices': [distinct str]")
    assert items.skipped[2]["error"] == "field 'mc1_targets' should be dict, got NoneType"  # an all-null row


# ---------------------------------------------------------------------------------------------------------------
# MMLU: one table of all subjects (cais/mmlu all/{split}-*.parquet), answer a 0-based int

def mmlu_rows(subject, split):
    return [[f"{subject} {split} q{k}?", "w", "x, y", "4", "z", k] for k in range(3)]


def mmlu_both(root):
    """The original release (no header, answer letter; val/ for validation) and the hub's copy of the same rows."""
    for split, hub_split in (("dev", "dev"), ("val", "validation"), ("test", "test")):
        hub = []
        for subject in ("anatomy", "virology"):
            rows = mmlu_rows(subject, split)
            (root / "csv" / split).mkdir(parents=True, exist_ok=True)
            with open(root / "csv" / split / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as f:
                csv.writer(f).writerows([r[:5] + ["ABCD"[r[5]]] for r in rows])
            hub = [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": r[5]} for r in rows] + hub
        # virology's rows first: the reader orders by subject, as the CSV reader's sorted files do
        write_parquet(root / "hub" / "all" / f"{hub_split}-00000-of-00001.parquet", hub, SCHEMAS["mmlu"])
    return root / "csv", root / "hub"


def test_mmlu_hub_equals_csv(tmp_path):
    original, hub = mmlu_both(tmp_path)
    for split in ("test", "dev", "val"):
        same(data.read_mmlu(hub, split), data.read_mmlu(original, split))
    items = data.read_mmlu(hub)
    assert [i["id"] for i in items] == [f"mmlu/{s}/test/{k}" for s in ("anatomy", "virology") for k in range(3)]
    assert items[1] == {"id": "mmlu/anatomy/test/1", "source": "mmlu", "subject": "anatomy",
                        "question": "anatomy test q1?", "options": ["w", "x, y", "4", "z"], "correct": [1]}
    same(data.read_mmlu(hub / "all", "dev", subjects=["virology"]), data.read_mmlu(original, "dev", ["virology"]))
    one = hub / "all" / "validation-00000-of-00001.parquet"  # a single file: the split from its name
    same(data.read_mmlu(one), data.read_mmlu(original, "val"))
    assert data.read_mmlu(one).sha256 == hashlib.sha256(one.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=r"no test rows for subject\(s\) \['nope'\]; found \['anatomy', 'virology'\]"):
        data.read_mmlu(hub, subjects=["nope", "anatomy"])
    with pytest.raises(FileNotFoundError, match=r"neither auxiliary_train/\*_auxiliary_train.csv nor the hub's "
                                                r"all/auxiliary_train-\*.parquet here"):
        data.read_mmlu(hub, "auxiliary_train")


def test_mmlu_hub_bad_rows(tmp_path):
    good = {"question": "q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 2}
    file = write_parquet(tmp_path / "all" / "test-00000-of-00001.parquet",
                         [good, good | {"answer": 4}, good | {"choices": ["a", "b", "c"]}, good | {"question": " "},
                          good], SCHEMAS["mmlu"])
    with pytest.raises(ValueError, match=rf"^{file}: row 1: answer 4 is not one of 0-3$"):
        data.read_mmlu(tmp_path)
    items = data.read_mmlu(tmp_path, skip_bad=True)
    assert [i["id"] for i in items] == ["mmlu/anatomy/test/0", "mmlu/anatomy/test/4"]  # ids stay put
    assert [(s["row"], s["error"]) for s in items.skipped] == [
        (1, "answer 4 is not one of 0-3"), (2, "field 'choices' should be a list of 4 strings"), (3, "empty question")]


# ---------------------------------------------------------------------------------------------------------------
# GSM8K: the same two fields (openai/gsm8k main/{train,test}-*.parquet); a split may come in several shards

GSM = [{"question": "Janet's ducks lay 16 eggs per day. ...", "answer": "16 - 3 - 4 = <<16-3-4=9>>9\n#### 18"},
       {"question": "How much?", "answer": "Lots.\n#### 1,450,000"}, {"question": "Owed?", "answer": "#### -10"}]


def test_gsm8k_hub_equals_jsonl(tmp_path):
    want = data.read_gsm8k(write_jsonl(tmp_path / "test.jsonl", GSM))
    want_train = data.read_gsm8k(write_jsonl(tmp_path / "train.jsonl", GSM[::-1]))
    hub = tmp_path / "gsm8k"
    file = write_parquet(hub / "main" / "test-00000-of-00001.parquet", GSM, SCHEMAS["gsm8k"])
    shards = [write_parquet(hub / "main" / f"train-0000{k}-of-00002.parquet", rows, SCHEMAS["gsm8k"])
              for k, rows in enumerate([GSM[::-1][:2], GSM[::-1][2:]])]
    for path in (hub, hub / "main", file):
        same(data.read_gsm8k(path), want)
    train = data.read_gsm8k(hub, split="train")
    same(train, want_train)  # ids count on across the shards: gsm8k/train/2 is the second shard's first row
    digests = sorted(f"{hashlib.sha256(s.read_bytes()).hexdigest()}  {s.name}" for s in shards)
    assert train.path == str(hub) and train.sha256 == hashlib.sha256("\n".join(digests).encode()).hexdigest()
    with pytest.raises(FileNotFoundError, match=r"gsm8k: neither validation.jsonl nor the hub's main/validation-"):
        data.read_gsm8k(hub, split="validation")


def test_gsm8k_hub_bad_rows_and_files(tmp_path):
    file = write_parquet(tmp_path / "test-00000-of-00001.parquet",
                         [GSM[0], {"question": "q", "answer": "no final line"}, {"question": None, "answer": "#### 1"},
                          GSM[2]], SCHEMAS["gsm8k"])
    with pytest.raises(ValueError, match=rf"^{file}: row 1: answer has no '#### <number>' line$"):
        data.read_gsm8k(file)
    items = data.read_gsm8k(file, skip_bad=True)
    assert [i["id"] for i in items] == ["gsm8k/test/0", "gsm8k/test/3"]
    assert items.skipped == [{"file": str(file), "row": 1, "error": "answer has no '#### <number>' line"},
                             {"file": str(file), "row": 2, "error": "field 'question' should be str, got NoneType"}]

    no_answer = write_parquet(tmp_path / "x" / "test-00000-of-00001.parquet", [{"question": "q"}],
                              pa.schema([("question", pa.string())]))
    for skip_bad in (False, True):  # a missing column is the whole file's error, never a row to skip
        with pytest.raises(ValueError, match=rf"^{no_answer}: lacks column\(s\) \['answer'\]; found \['question'\]$"):
            data.read_gsm8k(no_answer, skip_bad=skip_bad)
    empty = write_parquet(tmp_path / "e" / "test-00000-of-00001.parquet", [], SCHEMAS["gsm8k"])
    with pytest.raises(ValueError, match=rf"^{empty}: no records$"):
        data.read_gsm8k(empty)
    garbage = tmp_path / "g" / "test-00000-of-00001.parquet"
    garbage.parent.mkdir()
    garbage.write_text("PAR1 not really")
    with pytest.raises(ValueError, match=rf"^{garbage}: not a readable parquet file"):
        data.read_gsm8k(garbage)
    with pytest.raises(FileNotFoundError, match=r"nope.parquet: no such file"):
        data.read_gsm8k(tmp_path / "nope.parquet")


# ---------------------------------------------------------------------------------------------------------------
# HellaSwag: every field of the original; label a string on the hub ("" in the unlabelled test split)

HS = [{"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
       "ctx_b": "then", "ctx": "...", "endings": [", the man adds wax.", " [header] How to [title] go.", "is  done.",
                                                  "x"], "source_id": "a", "split": "val", "split_type": "indomain",
       "label": 3},
      {"ind": 9, "activity_label": "Health", "ctx_a": "[header] How to sleep [title] Relax.", "ctx_b": "", "ctx": "",
       "endings": ["a", "b", "c", "d"], "source_id": "b", "split": "val", "split_type": "zeroshot", "label": 1}]


def test_hellaswag_hub_equals_jsonl(tmp_path):
    want = data.read_hellaswag(write_jsonl(tmp_path / "hellaswag_val.jsonl", HS))
    train = [r | {"split": "train"} for r in HS[::-1]]
    want_train = data.read_hellaswag(write_jsonl(tmp_path / "hellaswag_train.jsonl", train))
    hub, hub_rows = tmp_path / "hellaswag", lambda rows: [r | {"label": str(r["label"])} for r in rows]
    file = write_parquet(hub / "data" / "validation-00000-of-00001.parquet", hub_rows(HS), SCHEMAS["hellaswag"])
    write_parquet(hub / "data" / "train-00000-of-00001.parquet", hub_rows(train), SCHEMAS["hellaswag"])
    write_parquet(hub / "data" / "test-00000-of-00001.parquet", [r | {"split": "test", "label": ""} for r in HS],
                  SCHEMAS["hellaswag"])  # unlabelled: a folder gives the validation split unless told otherwise
    for path in (hub, hub / "data", file):
        same(data.read_hellaswag(path), want)
    assert want[0]["id"] == "hellaswag/val/0" and want[0]["question"].startswith("Removing ice from car: Then")
    same(data.read_hellaswag(hub, split="train"), want_train)
    same(data.read_hellaswag(hub, split="validation"), want)  # the hub's name for it works too


def test_hellaswag_hub_unlabelled_test_split(tmp_path):
    file = write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet",
                         [r | {"split": "test", "label": ""} for r in HS], SCHEMAS["hellaswag"])
    with pytest.raises(ValueError, match=rf"^{file}: row 0: field 'label' is empty$"):
        data.read_hellaswag(tmp_path, split="test")


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py --data= and study.py take a downloaded folder

def test_evaluate_and_study_take_hub_folders(tmp_path):
    import evaluate
    from studies import finetune as study
    tqa = tmp_path / "truthfulqa"
    tqa_hub(tqa, MC)
    gsm = tmp_path / "gsm8k"
    write_parquet(gsm / "main" / "test-00000-of-00001.parquet", GSM, SCHEMAS["gsm8k"])
    _, mmlu = mmlu_both(tmp_path / "mmlu")
    cfg = lambda path: SimpleNamespace(data=str(path), skip_bad=False, n=0, seed=0)
    for path, source in [(tqa, "truthfulqa-mc"), (tqa / "multiple_choice", "truthfulqa-mc"), (gsm, "gsm8k"),
                         (gsm / "main" / "test-00000-of-00001.parquet", "gsm8k"), (mmlu, "mmlu"),
                         (mmlu / "all" / "test-00000-of-00001.parquet", "mmlu")]:
        assert {it["source"] for it in evaluate.load_qa(cfg(path))} == {source}, path
    for task, path in [("truthfulqa", tqa), ("gsm8k", gsm), ("mmlu", mmlu)]:
        assert len(evaluate.task_items(SimpleNamespace(task=task, data=str(path), skip_bad=False))) > 0

    train, held, sha = study.held_apart("gsm8k", gsm, SimpleNamespace(seed=0))  # no train split: a half of test
    assert sorted(it["id"] for it in train + held) == [f"gsm8k/test/{k}" for k in range(3)]
    write_parquet(gsm / "main" / "train-00000-of-00001.parquet", GSM[:2], SCHEMAS["gsm8k"])
    train, held, sha = study.held_apart("gsm8k", gsm, SimpleNamespace(seed=0))
    assert [it["id"] for it in train] == ["gsm8k/train/0", "gsm8k/train/1"] and len(held) == 3
