"""Data: the dataset readers, each a file on disk -> checked item dicts (`Items`), with `skip_bad` handling.

Tokenizers and chat formats (text -> token ids) are in chat.py.
"""
import csv
import hashlib
import io
import json
import re
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------
# Dataset readers: a file on disk -> a list of plain JSON-serializable item dicts, checked against the schema.
#
# Every item has "id" (unique and stable: built from the file and the record's position, never from a shuffle) and
# "source" (which dataset/file). Every reader takes `skip_bad`: False (default) raises ValueError("path:line: why")
# at the first malformed record; True leaves such records out and lists them in `.skipped`, so a results file can
# report how many were dropped. Schemas of the real files: ../shared/data/README.md. `python -m lab.prepare
# --dataset` fetches them from the hub, whose copies of TruthfulQA, MMLU, GSM8K and HellaSwag are parquet: those four
# readers also take a .parquet file or the downloaded folder, and give the same items (same ids) as from the original
# files.

class Items(list):
    """What every reader returns: the item dicts, plus where they came from.

    .path     the file read (the folder, for MMLU and a hub folder)
    .sha256   hex digest of the file's bytes, for provenance (several files: of the sorted "digest  name" lines)
    .skipped  with skip_bad=True, the records left out: [{"file", "line" ("item" for a JSON array, "row" for
              parquet), "error"}]
    """

    def __init__(self, path, sha256=""):
        super().__init__()
        self.path, self.sha256, self.skipped = str(path), sha256, []


def derived(source, rows) -> list:
    """rows (a sample of source's items, or items made from them) as Items of the same file with its skips, so a
    results file still counts the records left out; a plain list (built-in probes) stays a plain list."""
    if not isinstance(source, Items):
        return list(rows)
    out = Items(source.path, source.sha256)
    out.extend(rows)
    out.skipped = source.skipped
    return out


def skipped_of(*item_lists) -> list[dict]:
    """The records left out of these lists (Items' .skipped; none for built-in probes), for a results file."""
    return [s for items in item_lists for s in getattr(items, "skipped", [])]


class BadRecord(Exception):
    """One malformed record; _add turns it into 'path:line: why' or an entry of Items.skipped."""


def _load(path) -> tuple[Path, str, str]:
    """(path, text, sha256). utf-8-sig drops a BOM where there is one: TruthfulQA.csv has one; json.loads rejects it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return path, text, hashlib.sha256(raw).hexdigest()


def _add(items: Items, path, where: tuple[str, int], make, skip_bad: bool):
    """items.append(make()), where make raises BadRecord for a malformed record and returns None for one left out on
    purpose. where = ("line", n), ("item", i) or ("row", r): 0-based, as pyarrow counts a parquet file's rows."""
    try:
        if (item := make()) is not None:
            items.append(item)
    except BadRecord as e:
        if not skip_bad:
            at = f":{where[1]}" if where[0] == "line" else f": {where[0]} {where[1]}"
            raise ValueError(f"{path}{at}: {e}") from None
        items.skipped.append({"file": str(path), where[0]: where[1], "error": str(e)})


def _done(items: Items) -> Items:
    """items, unless none is left: an empty file, or (skip_bad) one whose every record was bad, is an error, never
    a run on zero items."""
    if not items and items.skipped:
        first = items.skipped[0]
        where = next(f"{k} {first[k]}" for k in ("line", "item", "row") if k in first)
        raise ValueError(f"{items.path}: no usable records: all {len(items.skipped)} were bad and skipped "
                         f"(first, {where}: {first['error']})")
    if not items:
        raise ValueError(f"{items.path}: no records")
    return items


def read_jsonl(path, make, skip_bad) -> Items:
    """make(record, index) for every non-blank line; index = 0-based line number, so ids survive skipped lines."""
    path, text, sha = _load(path)
    items = Items(path, sha)
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028 or \x85, which splitlines() would cut at.
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            _add(items, path, ("line", n), lambda: make(_json_object(line), n - 1), skip_bad)
    return _done(items)


def _json_object(line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(f"bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    return record


def _json_array(path, make, skip_bad) -> Items:
    """make(record, index) for each element of a file holding one JSON array of objects (CAA, mc_task.json)."""
    path, text, sha = _load(path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:  # the whole file is unreadable: no record can be skipped
        raise ValueError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    items = Items(path, sha)

    def make_one(record, i):
        if not isinstance(record, dict):
            raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
        return make(record, i)
    for i, record in enumerate(records):
        _add(items, path, ("item", i), lambda: make_one(record, i), skip_bad)
    return _done(items)


# The hub's copies: one folder per config, each split in shards {split}-00000-of-0000N.parquet (openai/gsm8k:
# main/test-00000-of-00001.parquet). A reader given a folder takes the shards of one split, in order. The hub calls
# the split the original files call "val" (MMLU, HellaSwag) "validation".

def _is_hub(path) -> bool:
    return Path(path).suffix == ".parquet" or Path(path).is_dir()


def _hub_files(path, config: str, split: str, original: str = "the original file") -> list[Path]:
    """[path] for a .parquet file; for a folder, its {config}/{split}-*.parquet, or {split}-*.parquet when the folder
    is the config folder itself. `original` names what else the caller would have read, for the error."""
    path, split = Path(path), "validation" if split == "val" else split
    if not path.is_dir():
        return [path]
    if files := sorted(path.glob(f"{config}/{split}-*.parquet")) or sorted(path.glob(f"{split}-*.parquet")):
        return files
    raise FileNotFoundError(f"{path}: neither {original} nor the hub's {config}/{split}-*.parquet here")


def _hub_split(file: Path) -> str:
    """test-00000-of-00001.parquet -> "test", validation-... -> "val"."""
    split = file.name.split("-")[0]
    return "val" if split == "validation" else split


def _parquet(path, files, columns: list[str], make, skip_bad) -> Items:
    """make(record, index) for every row of the files, a split's shards in order; index counts on across them, as
    the original file's line (or item) number does, so the ids are the same. A missing column fails the whole file;
    a bad row is 'file: row r: why'. pyarrow gives structs as dicts, lists as lists, nulls as None: field applies."""
    import pyarrow as pa  # here, not at the top: only the hub's parquet copies need pyarrow
    import pyarrow.parquet as pq
    items, digests, index = Items(path), [], 0
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file")
        raw = file.read_bytes()
        digests.append(f"{hashlib.sha256(raw).hexdigest()}  {file.name}")
        try:
            table = pq.read_table(pa.BufferReader(raw))
        except pa.ArrowException as e:
            raise ValueError(f"{file}: not a readable parquet file ({e})") from None
        if missing := [c for c in columns if c not in table.column_names]:
            raise ValueError(f"{file}: lacks column(s) {missing}; found {table.column_names}")
        for r, record in enumerate(table.to_pylist()):
            _add(items, file, ("row", r), lambda: make(record, index), skip_bad)
            index += 1
    one = len(digests) == 1
    items.sha256 = digests[0].split()[0] if one else hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    return items


def _csv_rows(path, text: str):
    """(line where the row starts, row) for each non-blank CSV row; a quoted field may span several lines."""
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{path}:{start}: bad CSV ({e})") from None
        if row:  # a blank line
            yield start, row


def field(record: dict, key: str, kind=str, nonempty=True):
    """record[key], checked: present, of type `kind`, and (unless nonempty=False) not an empty string/list/dict."""
    if key not in record:
        raise BadRecord(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadRecord(f"field {key!r} should be {names}, got {type(value).__name__}")
    if nonempty and isinstance(value, (str, list, dict)) and not value:
        raise BadRecord(f"field {key!r} is empty")
    return value


ANSWER_LETTER = re.compile(r"\s*\(([A-Z])\)\s*")  # " (A)" (Anthropic) and "(A)" (CAA)
CHOICE_LINE = re.compile(r"^[ \t]*\(([A-Z])\)", re.MULTILINE)  # a line opening with "(A)": one choice


def _letter(value, key: str, letters: list[str]) -> str:
    """'(B)' / ' (B)' -> 'B', checked against the choice letters found in the question."""
    m = ANSWER_LETTER.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise BadRecord(f"{key} {value!r} is not an answer letter like '(A)'")
    if m[1] not in letters:
        raise BadRecord(f"{key} {value!r} is not among the question's choices {letters}")
    return m[1]


def _ab_item(record: dict, i: int, source: str) -> dict:
    question = field(record, "question").strip().removesuffix("Answer:").strip()
    letters = sorted(set(CHOICE_LINE.findall(question)))
    not_matching = field(record, "answer_not_matching_behavior", (str, list))  # a list in philpapers2020
    not_matching = [not_matching] if isinstance(not_matching, str) else not_matching
    match = _letter(field(record, "answer_matching_behavior"), "answer_matching_behavior", letters)
    not_match = [_letter(a, "answer_not_matching_behavior", letters) for a in not_matching or [None]]
    if match in not_match:
        raise BadRecord(f"answer {match} is both matching and not matching")
    return {"id": f"{source}/{i}", "source": source, "question": question, "match": match, "not_match": not_match,
            "letters": letters}


def read_anthropic_sycophancy(path, skip_bad: bool = False) -> Items:
    """Anthropic model-written-evals sycophancy_on_{nlp_survey,philpapers2020,political_typology_quiz}.jsonl.
    Item: {id, source, question (the trailing "Answer:" removed), match: "A", not_match: ["B", ...], letters}."""
    source = Path(path).stem
    return read_jsonl(path, lambda r, i: _ab_item(r, i, source), skip_bad)


def read_caa_ab(path, skip_bad: bool = False) -> Items:
    """CAA's A/B sycophancy sets (generate_dataset.json, test_dataset_ab.json): a JSON array, same fields and item
    schema as Anthropic's (CAA already removed "Answer:" and the answer strings' leading space)."""
    source = "caa-" + Path(path).stem.removesuffix("_ab").removesuffix("_dataset")  # caa-generate, caa-test
    return _json_array(path, lambda r, i: _ab_item(r, i, source), skip_bad)


def read_caa_capability(path, skip_bad: bool = False) -> Items:
    """CAA's two-choice capability checks (test/truthfulqa/truthful_qa.json, test/mmlu/mmlu.json).
    Item: {id, source, question (the prompt), correct: "B", letters: ["A", "B"], category}."""
    source = "caa-" + Path(path).stem  # caa-truthful_qa, caa-mmlu

    def make(r, i):
        question = field(r, "prompt").strip()
        letters = sorted(set(CHOICE_LINE.findall(question)))
        _letter(field(r, "incorrect"), "incorrect", letters)
        return {"id": f"{source}/{i}", "source": source, "question": question,
                "correct": _letter(field(r, "correct"), "correct", letters), "letters": letters,
                "category": field(r, "category")}
    return _json_array(path, make, skip_bad)


# Local TruthfulQA copies looked for when no path is given, the first found wins: the original release's file,
# the folder `python -m lab.prepare --dataset=truthfulqa` downloads, the development copy beside the repository.
TRUTHFULQA_COPIES = ("data/truthfulqa/mc_task.json", "data/truthfulqa/multiple_choice",
                     "../shared/data/TruthfulQA/data/mc_task.json")


def local_truthfulqa() -> Path | None:
    repo = Path(__file__).resolve().parent
    return next((repo / p for p in TRUTHFULQA_COPIES if (repo / p).exists()), None)


def read_truthfulqa_mc(path, skip_bad: bool = False) -> Items:
    """TruthfulQA data/mc_task.json, options in file order (MC1's true answer is always first: shuffle, with a
    recorded seed, before any lettered prompt). Item: {id, source, question, mc1/mc2: {options, correct: [index]}}.
    Also the hub's copy (truthfulqa/truthful_qa multiple_choice/validation-*.parquet, or its folder): built from
    mc_task.json in its order, each {answer: label} dict as {"choices": [answers], "labels": [labels]}."""
    def targets(r, key):
        t = field(r, key, dict)
        if any(v not in (0, 1) or isinstance(v, bool) for v in t.values()):
            raise BadRecord(f"{key} labels must be 0 or 1")
        correct = [k for k, v in enumerate(t.values()) if v == 1]
        if not correct or key == "mc1_targets" and len(correct) != 1:
            raise BadRecord(f"{key} has {len(correct)} true answers; "
                       + ("MC1 needs exactly one" if key == "mc1_targets" else "MC2 needs at least one"))
        return {"options": list(t), "correct": correct}

    def make(r, i):
        return {"id": f"truthfulqa/{i}", "source": "truthfulqa-mc", "question": field(r, "question"),
                "mc1": targets(r, "mc1_targets"), "mc2": targets(r, "mc2_targets")}

    def as_dict(r, key):  # the hub's {"choices": [...], "labels": [...]} -> mc_task.json's {answer: label}
        t = field(r, key, dict)
        choices, labels = t.get("choices"), t.get("labels")
        if not (isinstance(choices, list) and isinstance(labels, list) and len(choices) == len(labels)
                and all(isinstance(c, str) for c in choices) and len(set(choices)) == len(choices)):
            raise BadRecord(f"{key} should be {{'choices': [distinct str], 'labels': [0 or 1]}}, of equal length")
        return dict(zip(choices, labels))
    if not _is_hub(path):
        return _json_array(path, make, skip_bad)
    files, keys = _hub_files(path, "multiple_choice", "validation", "mc_task.json"), ("mc1_targets", "mc2_targets")
    hub_make = lambda r, i: make(r | {k: as_dict(r, k) for k in keys}, i)
    return _done(_parquet(path, files, ["question", *keys], hub_make, skip_bad))


TRUTHFULQA_COLUMNS = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers"]


def read_truthfulqa_csv(path, skip_bad: bool = False) -> Items:
    """TruthfulQA.csv (UTF-8 with BOM). Its rows are NOT in mc_task.json's order, so ids differ: truthfulqa-csv/{i}.
    Item: {id, source, question, category, type, best_answer, correct_answers: [...], incorrect_answers: [...]}."""
    path, text, sha = _load(path)
    rows = _csv_rows(path, text)
    _, header = next(rows, (1, None))
    if header is None:
        raise ValueError(f"{path}: no records")
    if missing := [c for c in TRUTHFULQA_COLUMNS if c not in header]:
        raise ValueError(f"{path}:1: header lacks column(s) {missing}; found {header}")
    col = {c: header.index(c) for c in TRUTHFULQA_COLUMNS}
    # 24 answer cells end in ";" and a few in a space: split on ";" and drop the empty pieces
    answers = lambda s: [a.strip() for a in s.split(";") if a.strip()]

    def make(row, i):
        if len(row) != len(header):
            raise BadRecord(f"expected {len(header)} fields, got {len(row)}")
        r = {c: row[k].strip() for c, k in col.items()}
        for c in ("Question", "Best Answer", "Correct Answers", "Incorrect Answers"):
            field(r, c)
        return {"id": f"truthfulqa-csv/{i}", "source": "truthfulqa-csv", "question": r["Question"],
                "category": r["Category"], "type": r["Type"], "best_answer": r["Best Answer"],
                "correct_answers": answers(r["Correct Answers"]), "incorrect_answers": answers(r["Incorrect Answers"])}
    items = Items(path, sha)
    for i, (line, row) in enumerate(rows):
        _add(items, path, ("line", line), lambda: make(row, i), skip_bad)
    return _done(items)


MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]  # HF cais/mmlu re-export


def read_mmlu(folder_or_file, split: str = "test", subjects=None, skip_bad: bool = False) -> Items:
    """MMLU CSVs {split}/{subject}_{split}.csv (or one such file), in either layout, detected per file: the original
    hendrycks release (no header; question, A, B, C, D, answer letter) or the re-export with header MMLU_HEADER and a
    0-based answer index. A single file's split comes from its name. `subjects`: None = all, or a list of names.
    Also the hub's copy (cais/mmlu all/{split}-*.parquet, or its folder, where no CSV is): see _mmlu_parquet.
    Item: {id: mmlu/{subject}/{split}/{row}, source, subject, question, options: [4 str], correct: [index]}."""
    root = Path(folder_or_file)
    if root.suffix == ".parquet":
        return _mmlu_parquet(root, [root], subjects, skip_bad)
    if root.is_file():
        files, split = [root], root.stem.rpartition("_")[2]
    else:
        folder = root / split if (root / split).is_dir() else root
        files = sorted(folder.glob(f"*_{split}.csv"))
        if not files and root.is_dir():  # not the original layouts: the hub's (prepare.py --dataset=mmlu)
            return _mmlu_parquet(root, _hub_files(root, "all", split, f"{split}/*_{split}.csv"), subjects, skip_bad)
        if not files:
            raise FileNotFoundError(f"{root}: no MMLU files {split}/*_{split}.csv here")
    by_subject = {f.name.removesuffix(f"_{split}.csv"): f for f in files}
    if subjects is not None:
        if unknown := sorted(set(subjects) - set(by_subject)):
            raise ValueError(f"{root}: no {split} file for subject(s) {unknown}; found {sorted(by_subject)}")
        by_subject = {s: by_subject[s] for s in sorted(set(subjects))}

    def make(row, subject, i, header):
        if len(row) != 6:
            raise BadRecord(f"expected 6 fields (question, 4 options, answer), got {len(row)}")
        answer = row[5].strip()
        correct = ("0123" if header else "ABCD").find(answer) if len(answer) == 1 else -1
        if correct < 0:
            raise BadRecord(f"answer {answer!r} is not one of {'0-3' if header else 'A-D'}")
        if not row[0].strip():
            raise BadRecord("empty question")
        return {"id": f"mmlu/{subject}/{split}/{i}", "source": "mmlu", "subject": subject, "question": row[0],
                "options": row[1:5], "correct": [correct]}

    items, digests = Items(root), []
    for subject, file in by_subject.items():
        path, text, sha = _load(file)
        digests.append(f"{sha}  {file.name}")
        rows = list(_csv_rows(path, text))
        start = 1 if rows and rows[0][1] == MMLU_HEADER else 0  # the layout, told by the first row
        header = start == 1
        for i, (line, row) in enumerate(rows[start:]):
            _add(items, path, ("line", line), lambda: make(row, subject, i, header), skip_bad)
    items.sha256 = sha if root.is_file() else hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    return _done(items)


def _mmlu_parquet(path, files, subjects, skip_bad) -> Items:
    """The hub's MMLU: one table of all subjects, columns question, subject, choices (4 str), answer (0-3). A subject's
    rows keep its CSV's order, so counting them per subject gives the CSV reader's ids, and sorting by subject its
    order (which --n samples from)."""
    split, present, count = _hub_split(files[0]), set(), {}

    def make(r, _):
        present.add(r.get("subject"))
        if subjects is not None and r.get("subject") not in subjects:
            return None
        subject = field(r, "subject")
        i = count[subject] = count.get(subject, -1) + 1  # counted first: a skipped row keeps its number
        choices, answer = field(r, "choices", list), field(r, "answer", int)
        if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise BadRecord("field 'choices' should be a list of 4 strings")
        if answer not in range(4) or isinstance(answer, bool):
            raise BadRecord(f"answer {answer!r} is not one of 0-3")
        if not field(r, "question", nonempty=False).strip():
            raise BadRecord("empty question")
        return {"id": f"mmlu/{subject}/{split}/{i}", "source": "mmlu", "subject": subject, "question": r["question"],
                "options": choices, "correct": [answer]}
    items = _parquet(path, files, ["question", "subject", "choices", "answer"], make, skip_bad)
    if subjects is not None and (unknown := sorted(set(subjects) - present)):
        raise ValueError(f"{path}: no {split} rows for subject(s) {unknown}; found {sorted(present - {None})}")
    items.sort(key=lambda it: it["subject"])  # stable: each subject's rows stay in file order
    return _done(items)


GSM8K_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def read_gsm8k(path, skip_bad: bool = False, split: str = "test") -> Items:
    """GSM8K {split}.jsonl. Item: {id: gsm8k/{split}/{i}, source, question, solution (the answer field verbatim,
    calculator annotations and "#### n" included), answer: "18" (the number after "#### ", commas removed)}.
    Also the hub's copy, same fields: openai/gsm8k main/{split}-*.parquet, or its folder (`split` picks the files)."""
    files = _hub_files(path, "main", split, f"{split}.jsonl") if _is_hub(path) else []
    split = _hub_split(files[0]) if files else Path(path).stem

    def make(r, i):
        solution = field(r, "answer")
        if "#### " not in solution:
            raise BadRecord("answer has no '#### <number>' line")
        answer = solution.rsplit("#### ", 1)[1].strip()
        if not GSM8K_NUMBER.fullmatch(answer):
            raise BadRecord(f"final answer {answer!r} is not a number")
        return {"id": f"gsm8k/{split}/{i}", "source": "gsm8k", "question": field(r, "question"),
                "solution": solution, "answer": answer.replace(",", "")}
    if not files:
        return read_jsonl(path, make, skip_bad)
    return _done(_parquet(path, files, ["question", "answer"], make, skip_bad))


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's hellaswag `preprocess`, step for step: the brackets are WikiHow artifacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path, skip_bad: bool = False, split: str = "val") -> Items:
    """rowanz/hellaswag {train,val}.jsonl (the test file has no labels). Query and endings as lm-evaluation-harness
    builds them. Item: {id: hellaswag/{split}/{i}, source, question, options: [4 endings], correct: [label]}.
    Also the hub's copy, same fields: Rowan/hellaswag data/{split}-*.parquet ("validation" for val), or its folder
    (`split` picks the files)."""
    files = _hub_files(path, "data", split, f"hellaswag_{split}.jsonl") if _is_hub(path) else []
    stem = _hub_split(files[0]) if files else Path(path).stem  # the split, where a record has no "split" field

    def make(r, i):
        endings = field(r, "endings", list)
        if len(endings) != 4 or not all(isinstance(e, str) for e in endings):
            raise BadRecord("field 'endings' should be a list of 4 strings")
        label = field(r, "label", (int, str))
        if str(label) not in ("0", "1", "2", "3"):  # an int in the original files, a string in the hub's copy
            raise BadRecord(f"label {label!r} is not 0-3")
        ctx = field(r, "ctx_a", nonempty=False) + " " + field(r, "ctx_b", nonempty=False).capitalize()
        return {"id": f"hellaswag/{r.get('split', stem)}/{i}", "source": "hellaswag",
                "question": hellaswag_preprocess(field(r, "activity_label") + ": " + ctx),
                "options": [hellaswag_preprocess(e) for e in endings], "correct": [int(label)]}
    if not files:
        return read_jsonl(path, make, skip_bad)
    return _done(_parquet(path, files, ["activity_label", "ctx_a", "ctx_b", "endings", "label"], make, skip_bad))


# SycophancyEval's three files share one record layout (prompt, base, metadata) but not their fields, so each task
# reads its own file with its own schema check: a record of another file is an error naming the field it lacks.
def is_sycophancy_eval(path) -> bool:
    """Whether a file's first record has SycophancyEval's layout ({"prompt": [...], "base": {...}, ...})."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".jsonl":
        return False
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and "prompt" in record and "base" in record
    return False


def _sycophancy_eval_record(r: dict, source: str, i: int) -> dict:
    """The common part: {id, source, messages (human/ai turns as user/assistant), base, template}."""
    roles = {"human": "user", "ai": "assistant"}
    prompt = field(r, "prompt", list)
    for k, turn in enumerate(prompt):
        if not isinstance(turn, dict) or turn.get("type") not in roles or not isinstance(turn.get("content"), str):
            raise BadRecord(f"prompt[{k}] should be {{'type': 'human'|'ai', 'content': str}}, got {turn!r:.80}")
    metadata = r.get("metadata") or {}
    if not isinstance(metadata, dict) or not isinstance(metadata.get("prompt_template", ""), str):
        raise BadRecord("field 'metadata' should be {'prompt_template': str, ...}")
    return {"id": f"{source}/{i}", "source": source, "base": field(r, "base", dict, nonempty=False),
            "messages": [{"role": roles[t["type"]], "content": t["content"]} for t in prompt],
            "template": metadata.get("prompt_template", ""), "metadata": metadata}


def read_sycophancy_eval(path, skip_bad: bool = False) -> Items:
    """meg-tong/sycophancy-eval answer.jsonl, are_you_sure.jsonl, feedback.jsonl, the layout only. Item: {id, source
    (file stem), messages: [{role: user|assistant, content}], base: {...}, template: metadata.prompt_template or ""}. read_answer / read_are_you_sure / read_feedback check each file's own fields."""
    # the name up to its first dot: answer.sample4.jsonl (the 4-record sample in ../shared) is "answer" too
    source = Path(path).name.split(".")[0]
    drop = lambda it: {k: v for k, v in it.items() if k != "metadata"}   # the readers below read metadata itself
    return read_jsonl(path, lambda r, i: drop(_sycophancy_eval_record(r, source, i)), skip_bad)


def _base_field(item: dict, key: str, kind=str, file_kind: str = ""):
    """item["base"][key], checked, the error naming the field as base.KEY (and which file has it)."""
    try:
        return field(item["base"], key, kind)
    except BadRecord as e:
        raise BadRecord(str(e).replace(f"field {key!r}", f"field 'base.{key}'")
                        + (f" (a {file_kind} record has it: is this another SycophancyEval file?)" if file_kind
                           else "")) from None


def read_answer(path, skip_bad: bool = False) -> Items:
    """SycophancyEval answer.jsonl: read_sycophancy_eval's items, each checked to have base.question,
    base.correct_answer and metadata.prompt_template (base.answer, the aliases, and base.incorrect_answer where given)."""
    source = Path(path).name.split(".")[0]

    def make(r, i):
        it = _sycophancy_eval_record(r, source, i)
        for key in ("question", "correct_answer"):
            _base_field(it, key, file_kind="answer.jsonl")
        if not it["template"]:
            raise BadRecord("missing field 'metadata.prompt_template' (an answer.jsonl record has it: is this "
                            "another SycophancyEval file?)")
        return it
    return read_jsonl(path, make, skip_bad)


FEEDBACK_TYPES = {"": "none", "I really like": "like", "I really dislike": "dislike", "I wrote": "wrote",
                  "I did not write": "did_not_write"}
# What a comment is about, per base.dataset: (with its article, for the judge's question; bare).
FEEDBACK_KINDS = {"arguments": ("an argument", "argument"), "poems": ("a poem", "poem"),
                  "math": ("a solution to a math problem", "solution")}


def read_feedback(path, skip_bad: bool = False) -> Items:
    """SycophancyEval feedback.jsonl: each record is one text under one framing (metadata.prompt_template_type:
    "" = none, "I really like", "I really dislike", "I wrote", "I did not write"). The records of one text share
    their base, so base_id is a hash of it. Item: {id, source, base_id, framing, dataset, kind, short, messages}."""
    source = Path(path).name.split(".")[0]

    def make(r, i):
        it = _sycophancy_eval_record(r, source, i)
        dataset = _base_field(it, "dataset", file_kind="feedback.jsonl")
        kind = it["metadata"].get("prompt_template_type")
        if kind is None:
            raise BadRecord("missing field 'metadata.prompt_template_type' (a feedback.jsonl record has it: is this "
                            "another SycophancyEval file?)")
        if kind not in FEEDBACK_TYPES:
            raise BadRecord(f"metadata.prompt_template_type {kind!r} is not one of {sorted(FEEDBACK_TYPES)}")
        if not it["messages"] or it["messages"][-1]["role"] != "user":
            raise BadRecord("prompt should end with a human turn")
        base_id = hashlib.sha256(json.dumps(it["base"], sort_keys=True).encode()).hexdigest()[:16]
        long, short = FEEDBACK_KINDS.get(dataset, ("a text", "text"))
        return {"id": it["id"], "source": source, "base_id": f"{source}/{base_id}", "framing": FEEDBACK_TYPES[kind],
                "dataset": dataset, "kind": long, "short": short, "messages": it["messages"]}
    return read_jsonl(path, make, skip_bad)


def read_are_you_sure(path, skip_bad: bool = False) -> Items:
    """SycophancyEval are_you_sure.jsonl, both halves. Lettered items (base.correct_letter: mmlu_mc_cot,
    truthful_qa_mc, aqua_mc, math_mc_cot) are read by letter; their choices are the "(A) ..." lines of the question
    and a prefilled ai turn ("The answer is (") is the prefill. Free-form items (trivia_qa, truthful_qa) carry
    base.correct_answer and, where given, base.answer (the accepted aliases).
    Item: {id, source, base_id, dataset, messages, challenge, prefill, question, and letters + correct_letter, or
    letters None + correct_answer + aliases}."""
    from probes import CHALLENGE, MC_PREFILL   # the challenge turn is not in the file
    source = Path(path).name.split(".")[0]

    def make(r, i):
        it = _sycophancy_eval_record(r, source, i)
        base = it["base"]
        if "{correct_answer}" in it["template"] or "{incorrect_answer}" in it["template"]:
            raise BadRecord(f"metadata.prompt_template {it['template'][:60]!r} suggests an answer: an answer.jsonl "
                            "record, not an are_you_sure.jsonl one")
        messages = list(it["messages"])
        prefill = messages.pop()["content"] if messages and messages[-1]["role"] == "assistant" else ""
        if not messages or messages[-1]["role"] != "user":
            raise BadRecord("prompt should end with a human turn (and an optional ai prefill)")
        question = _base_field(it, "question", file_kind="are_you_sure.jsonl")
        out = {"id": it["id"], "source": source, "base_id": it["id"], "dataset": base.get("dataset", ""),
               "messages": messages, "challenge": CHALLENGE, "question": question}
        if base.get("correct_letter"):
            letters = sorted(set(CHOICE_LINE.findall(messages[-1]["content"] + "\n" + str(base.get("answers", "")))))
            correct = base["correct_letter"].strip("() ")
            if correct not in letters:
                raise BadRecord(f"base.correct_letter {base['correct_letter']!r} is not among the question's "
                                f"choices {letters}")
            # the letter is read after "The answer is (": the file's own prefill where it is that, else ours after it
            prefill = prefill if prefill.endswith("(") else (prefill + " " if prefill else "") + MC_PREFILL
            return out | {"letters": letters, "correct_letter": correct, "prefill": prefill.lstrip()}
        if "correct_answer" not in base and "answer" not in base:
            raise BadRecord("missing field 'base.correct_letter' (lettered items) or 'base.correct_answer' "
                            "(free-form items): is this another SycophancyEval file?")
        aliases = base.get("answer") if isinstance(base.get("answer"), list) else [base.get("answer")]
        correct = base.get("correct_answer") or aliases[0]
        aliases = [a for a in dict.fromkeys([correct, *aliases]) if isinstance(a, str) and a.strip()]
        if not aliases:
            raise BadRecord("field 'base.correct_answer' is empty")
        return out | {"letters": None, "correct_letter": None, "correct_answer": aliases[0], "aliases": aliases,
                      "prefill": prefill}
    return read_jsonl(path, make, skip_bad)


def read_open_ended(path, skip_bad: bool = False) -> Items:
    """Open-ended prompts: CAA's test_dataset_open_ended.json (a JSON array of {"question"}), or a JSON array /
    JSONL of {"question"} or {"prompt"} objects (persona-style opinion prompts). Item: {id, source, question,
    messages}."""
    path = Path(path)
    source = path.stem

    def make(r, i):
        key = "question" if "question" in r else "prompt"
        question = field(r, key).strip()
        return {"id": f"{source}/{i}", "source": source, "question": question,
                "messages": [{"role": "user", "content": question}]}
    return read_jsonl(path, make, skip_bad) if path.suffix == ".jsonl" else _json_array(path, make, skip_bad)


def read_tactic_pairs(path, skip_bad: bool = False) -> Items:
    """studies.tactics output with a sycophantic and a correct reply per user message: its examples.jsonl
    (sycophantic, correct) or dpo-*.jsonl (rejected, chosen). Item: {id, source, question (the user message),
    sycophantic, correct}."""
    source = Path(path).name.split(".")[0]

    def make(r, i):
        messages = field(r, "messages", list)
        if not messages or not isinstance(messages[-1], dict) or not isinstance(messages[-1].get("content"), str):
            raise BadRecord("field 'messages' should end with {'role': 'user', 'content': str}")
        syco = field(r, "sycophantic") if "sycophantic" in r or "rejected" not in r else field(r, "rejected")
        correct = field(r, "correct") if "correct" in r or "chosen" not in r else field(r, "chosen")
        return {"id": f"{source}/{r.get('id', i)}", "source": source, "question": messages[-1]["content"],
                "sycophantic": syco, "correct": correct}
    return read_jsonl(path, make, skip_bad)
