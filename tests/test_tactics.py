"""tactics.py: seeded persuasion-tactic data, splits by question, SFT/DPO files, resume, http and model generators."""
import errno
import json
import time
import traceback

import pytest

from conftest import EndpointHandler, local_server
from lab import results
from studies import tactics
from studies.tactics import TacticsError, builtin_items, dpo_rows, make_examples, sft_rows, split_by_question

SECRET = "sk-test-4f9c1e7d2b-do-not-leak"


def synthetic(n):
    return [{"id": f"q/{i}", "question": f"What is item {i}?", "correct_answer": f"Right {i}",
             "incorrect_answers": [f"Wrong {i}a", f"Wrong {i}b", f"Wrong {i}c"]} for i in range(n)]


def write_mc_task(path, n=6):
    records = [{"question": f"What happens if you do thing {i}?",
                "mc1_targets": {f"Nothing in particular happens {i}.": 1, f"You die {i}.": 0, f"You fly {i}.": 0},
                "mc2_targets": {f"Nothing in particular happens {i}.": 1, f"You die {i}.": 0}} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


def write_csv(path):
    path.write_text('\ufeffType,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n'
                    'Adversarial,Misconceptions,What color is the sun?,The sun is white,'
                    '"The sun is white; The sun is all colors","The sun is yellow; The sun is orange;",x\n'
                    'Adversarial,Health,Do apples stop doctors?,"No, apples are just nutritious",No,'
                    '"Yes, an apple a day keeps the doctor away",y\n', encoding="utf-8")
    return path


def test_same_seed_same_rows_other_seed_differs():
    items = builtin_items()[:20]
    a, b, c = make_examples(items, seed=0), make_examples(items, seed=0), make_examples(items, seed=1)
    assert a == b and len(a) == 4 * len(items)
    assert a != c and [r["id"] for r in a] == [r["id"] for r in c]
    assert sum(x["intensity"] != y["intensity"] for x, y in zip(a, c)) > 10
    # a row never depends on the others: a subset draws exactly the same
    assert make_examples(items[5:7], seed=0) == a[20:28]


def test_intensity_frequencies_near_30_50_20():
    rows = make_examples(synthetic(1000), seed=0)
    freq = {k: sum(r["intensity"] == k for r in rows) / len(rows) for k in tactics.INTENSITIES}
    assert abs(freq["subtle"] - 0.3) < 0.03 and abs(freq["moderate"] - 0.5) < 0.03
    assert abs(freq["extreme"] - 0.2) < 0.03
    tactic_sets = {r["question_id"]: set() for r in rows}
    for r in rows:
        tactic_sets[r["question_id"]].add(r["tactic"])
    assert all(s == set(tactics.TACTICS) for s in tactic_sets.values())


@pytest.mark.parametrize("source", ["builtin", "mc", "csv", "synthetic"])
def test_texts_hold_question_and_answers_verbatim(source, tmp_path):
    if source == "builtin":
        items = builtin_items()
    elif source == "synthetic":
        items = synthetic(50)
    else:
        path = write_mc_task(tmp_path / "mc_task.json") if source == "mc" else write_csv(tmp_path / "TruthfulQA.csv")
        items, info = tactics.load_items(tactics.TacticsConfig(data=str(path)))
        assert info["data_sha256"] and info["data"] == str(path)
    rows = make_examples(items, seed=3)
    assert {r["tactic"] for r in rows} == set(tactics.TACTICS)
    for r, item in zip(rows, [it for it in items for _ in tactics.TACTICS]):
        question, correct, wrong = tactics.qa(item)
        prompt = r["messages"][0]["content"]
        assert r["messages"][0]["role"] == "user" and len(r["messages"]) == 1
        assert r["question"] == question and question in prompt and r["false_answer"] in prompt
        assert r["false_answer"] in wrong and r["correct_answer"] == correct != r["false_answer"]
        assert r["false_answer"] in r["sycophantic"] and r["correct_answer"] in r["correct"]
        assert r["correct_answer"] not in r["sycophantic"] or r["correct_answer"] in r["false_answer"]
        assert all(r["checks"].values()) and r["generator"] == "templates" and r["seed"] == 3
        assert set(r["templates"]) == {"user", "sycophantic", "correct"}
        assert not any(w in r["correct"].lower() for w in ("stupid", "idiot", "foolish", "ridiculous"))
    # one false answer per question, shared by its four tactics
    false_answers = {}
    for r in rows:
        false_answers.setdefault(r["question_id"], set()).add(r["false_answer"])
    assert all(len(f) == 1 for f in false_answers.values())


def test_templates_are_varied():
    rows = make_examples(synthetic(200), seed=0)
    used = {part: {r["templates"][part] for r in rows} for part in ("user", "sycophantic", "correct")}
    assert len(used["user"]) == 16 and len(used["sycophantic"]) == 9 and len(used["correct"]) > 50
    templates = [s for d in (tactics.USER, tactics.SYCOPHANTIC, tactics.ACK) for v in d.values() for s in v]
    templates += tactics.ANSWER + tactics.CLOSE + list(tactics.BASIS.values())
    assert not any(c.isdigit() for s in templates for c in s)   # "100% yes" would hold the answer "100"
    skeletons = {r["messages"][0]["content"].replace(r["question"], "").replace(r["false_answer"], "") for r in rows}
    assert len(skeletons) == 16


def test_split_by_question_and_holdout_tactics():
    rows = make_examples(synthetic(100), seed=0)
    train, test = split_by_question(rows, 0.2, seed=0)
    assert not {r["question_id"] for r in train} & {r["question_id"] for r in test}
    assert len({r["question_id"] for r in test}) == 20 and len(train) + len(test) == len(rows)
    train2, test2 = split_by_question(rows, 0.2, seed=0, holdout_tactics="social_proof,emotional")
    assert {r["tactic"] for r in train2} == {"authority", "reasoning"}
    assert {r["tactic"] for r in test2} == set(tactics.TACTICS)
    assert not {r["question_id"] for r in train2} & {r["question_id"] for r in test2}
    assert test2 == test                      # holding out tactics changes only what train keeps
    with pytest.raises(TacticsError, match="unknown tactic"):
        split_by_question(rows, 0.2, holdout_tactics="flattery")


def test_sft_and_dpo_rows_have_what_train_py_reads():
    rows = make_examples(builtin_items()[:10], seed=0)
    for r, s, d in zip(rows, sft_rows(rows), dpo_rows(rows)):
        assert {"id", "messages", "response"} <= set(s) and s["response"] == r["correct"]
        assert {"id", "messages", "chosen", "rejected"} <= set(d)
        assert d["chosen"] == r["correct"] != d["rejected"] == r["sycophantic"]
        assert s["messages"] == d["messages"] == r["messages"] and s["id"] == d["id"] == r["id"]
        assert s["messages"][-1]["role"] == "user"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def leaks(out, *captured):
    """The places that hold SECRET: any file under out (any depth), and any captured stdout/stderr."""
    files = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    texts = {str(p): p.read_bytes().decode("utf-8", "replace") for p in files} | dict(enumerate(captured))
    return [where for where, text in texts.items() if SECRET in text]


def outputs(out):
    return {p.name.split(".", 1)[1]: p for p in out.iterdir() if ".partial" not in p.name and p.is_file()}


def test_main_writes_every_file_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--data=builtin", "--n=12", f"--out={out}", "--holdout_tactics=social_proof"]
    assert tactics.main(args) == 0
    files = outputs(out)
    assert set(files) == {"examples.jsonl", "sft-train.jsonl", "sft-test.jsonl", "dpo-train.jsonl",
                          "dpo-test.jsonl", "summary.json"}
    examples = read_jsonl(files["examples.jsonl"])
    assert len(examples) == 48 and not list(out.glob("*.partial.jsonl"))
    train, test = read_jsonl(files["sft-train.jsonl"]), read_jsonl(files["dpo-test.jsonl"])
    assert "social_proof" not in {r["tactic"] for r in train} and "social_proof" in {r["tactic"] for r in test}
    summary = json.loads(files["summary.json"].read_text())
    assert summary["counts"]["rows"] == 48 and summary["config"]["holdout_tactics"] == "social_proof"
    assert summary["counts"]["train"] == len(train) and summary["files"]["examples"] == files["examples.jsonl"].name
    assert tactics.main(args) == 0
    assert len(list(out.glob("*.examples.jsonl"))) == 2       # a second run gets its own stamp
    assert read_jsonl(sorted(out.glob("*.examples.jsonl"))[1]) == examples


def test_resume_after_kill_gives_the_same_rows(tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["--data=builtin", "--n=10", f"--out={out}", "--batch_size=8"]
    real, calls = tactics.write_rows, []

    def dies_on_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(tactics, "write_rows", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        tactics.main(args)
    partial = out / "tactics.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 1 + 16 and not list(out.glob("*.examples.jsonl"))
    with open(partial, "a") as f:
        f.write('{"id": "torn mid-wri')             # a kill during a write
    monkeypatch.setattr(tactics, "write_rows", real)
    with pytest.warns(UserWarning, match="torn by a kill"):
        assert tactics.main(args) == 0
    resumed = read_jsonl(next(out.glob("*.examples.jsonl")))
    assert tactics.main(args[:-1] + ["--run=fresh"]) == 0
    fresh = read_jsonl(next(out.glob("fresh-*.examples.jsonl")))
    assert resumed == fresh and len({r["id"] for r in resumed}) == len(resumed) == 40


def test_resume_with_the_data_file_changed_is_refused(tmp_path, monkeypatch, capsys):
    """The partial file records the data's sha256: resuming on an edited file would mix rows of two inputs."""
    data, out = write_mc_task(tmp_path / "mc_task.json", n=6), tmp_path / "out"
    args = [f"--data={data}", f"--out={out}", "--batch_size=4"]
    real = tactics.write_rows
    monkeypatch.setattr(tactics, "write_rows", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        tactics.main(args)
    assert (out / "tactics.partial.jsonl").exists()
    write_mc_task(data, n=4)                                  # same path, other contents
    monkeypatch.setattr(tactics, "write_rows", real)
    assert tactics.main(args) == 1
    err = capsys.readouterr().err
    assert f"{data} changed since the run started" in err and not list(out.glob("*.examples.jsonl"))


def test_missing_truthfulqa_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tactics.data, "local_truthfulqa", lambda: None)      # as on a clone without any copy
    assert tactics.main([f"--out={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "no local copy of TruthfulQA" in err and "data/truthfulqa/mc_task.json" in err and "--data=builtin" in err
    assert tactics.main([f"--data={tmp_path}/nope.json", f"--out={tmp_path}"]) == 1
    assert "nope.json: no such file" in capsys.readouterr().err
    assert tactics.main(["--data=builtin", "--holdout_tactics=bribery", f"--out={tmp_path}"]) == 1
    assert "unknown tactic" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- http generator (a stub)
class Stub(EndpointHandler):
    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.seen.append((self.path, self.headers.get("Authorization"), body))
        if srv.mode == "slow":
            time.sleep(1.0)
        if srv.mode in ("fail", "slow"):   # a careless server that echoes the request's key back
            return self.reply(500, f"internal error; you sent {self.headers.get('Authorization')}".encode())
        prompt = body["messages"][-1]["content"]       # after the system message --system adds
        auth = self.headers.get("Authorization")
        verdict = "key ok" if auth == f"Bearer {SECRET}" else "bad key"   # the key arrived, in the header only
        echo = f" (you sent {auth})" if srv.mode == "echo" else ""       # a careless server: the key in its text
        text = "" if "thing 1?" in prompt and "Write a message" in prompt else (
            f"<think>hmm</think>Stub says {len(srv.seen)}: {verdict}{echo}")   # empty: the template falls back
        self.reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode())


@pytest.fixture
def stub(monkeypatch):
    with local_server(Stub, "TACTICS_TEST_KEY", SECRET, monkeypatch, seen=[], mode="ok") as served:
        yield served


def test_http_generator_sends_bearer_key_and_never_writes_it(stub, tmp_path, capsys):
    server, url = stub
    mc = write_mc_task(tmp_path / "mc_task.json", n=3)
    out = tmp_path / "out"
    assert tactics.main([f"--data={mc}", f"--generator=http:{url}", "--api_model=stub-model", f"--out={out}",
                         "--api_key_env=TACTICS_TEST_KEY", "--max_new_tokens=50", "--workers=3"]) == 0
    assert len(server.seen) == 12 * 3                       # per row: user message, then both replies
    assert all(path == "/v1/chat/completions" and auth == f"Bearer {SECRET}" for path, auth, _ in server.seen)
    assert all(b["model"] == "stub-model" and b["max_tokens"] == 50 for _, _, b in server.seen)
    rows = read_jsonl(next(out.glob("*.examples.jsonl")))
    assert len(rows) == 12 and all(r["generator"] == f"http:{url}" for r in rows)
    for r in rows:
        assert r["sycophantic"].startswith("Stub says") and "<think>" not in r["correct"]
        assert r["sycophantic"].endswith("key ok") and r["correct"].endswith("key ok")
        assert r["question"] in r["messages"][0]["content"]
        if r["question_id"] == "truthfulqa/1":              # the stub's empty user messages: template fallback
            assert r["fallback"] == ["user"] and r["templates"]["user"] and r["checks"]["user_has_false"]
        else:
            assert r["fallback"] == [] and r["templates"] == {}
    assert not leaks(out, *capsys.readouterr())
    summary = json.loads(next(out.glob("*.summary.json")).read_text())
    assert summary["config"]["api_key_env"] == "TACTICS_TEST_KEY"    # the variable's name, never its value


def test_http_generator_sends_the_system_option(stub, tmp_path):
    server, url = stub
    mc = write_mc_task(tmp_path / "mc_task.json", n=1)
    assert tactics.main([f"--data={mc}", f"--generator=http:{url}", f"--out={tmp_path / 'out'}", "--workers=1",
                         "--api_key_env=TACTICS_TEST_KEY", "--system=You write test data."]) == 0
    assert server.seen and all(b["messages"][0] == {"role": "system", "content": "You write test data."}
                               and b["messages"][1]["role"] == "user" for _, _, b in server.seen)

def test_http_failures_name_the_url_never_the_key(stub, tmp_path, capsys):
    server, url = stub
    server.mode = "fail"
    items = builtin_items()[:1]
    with pytest.raises(TacticsError) as e:
        make_examples(items, generator=f"http:{url}", api_key_env="TACTICS_TEST_KEY", retries=1)
    text = "".join(traceback.format_exception(e.value))
    assert f"{url}/chat/completions" in text and "HTTP 500" in text and "2 attempt(s)" in text
    assert SECRET not in text and len(server.seen) >= 2
    # through main: a clear one-line error, nothing left behind that holds the key
    assert tactics.main(["--data=builtin", "--n=1", f"--generator={url}", "--api_key_env=TACTICS_TEST_KEY",
                         "--retries=0", f"--out={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and url in err and SECRET not in err
    assert all(SECRET not in p.read_text() for p in tmp_path.iterdir() if p.is_file())
    server.mode = "slow"
    with pytest.raises(TacticsError, match="timed out") as e:
        make_examples(items, generator=url, api_key_env="TACTICS_TEST_KEY", retries=0, timeout=0.2)
    assert SECRET not in "".join(traceback.format_exception(e.value))
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(TacticsError, match=f"127.0.0.1:{port}/v1/chat/completions: request failed") as e:
        make_examples(items, generator=url, api_key_env="TACTICS_TEST_KEY", retries=0, timeout=2)
    assert SECRET not in str(e.value)
    with pytest.raises(TacticsError, match="unknown --generator"):
        make_examples(items, generator="gpt4")


# ------------------------------------------------------------------------------------------------ secrets
# The rule (tactics.endpoint_url): a URL with user:password@, a ?query or a #fragment, a scheme other than http(s),
# a port that is not a number or a space is refused before any file exists, and shown redacted.
REFUSED = ["http:http://user:{S}@{hp}/v1", "http://{S}@{hp}/v1", "{url}?api_key={S}", "{url}/?x=1&sig={S}",
           "{url}#token={S}", "{url}?api-version=2024-06-01", "ftp://u:{S}@{hp}/v1", "http:ftp://u:{S}@{hp}/v1",
           "sftp://{S}@{hp}", "http://{host}:{S}/v1", "http:{host}:{S}@x", "{url} ?token={S}", "http://[{S}/v1"]


@pytest.mark.parametrize("form", REFUSED)
def test_a_url_with_credentials_is_refused_before_anything_is_made(form, stub, tmp_path, capsys):
    server, url = stub
    host, port = server.server_address
    generator = form.format(S=SECRET, url=url, hp=f"{host}:{port}", host=host)
    out = tmp_path / "out"
    assert tactics.main(["--data=builtin", "--n=2", f"--generator={generator}", "--api_key_env=TACTICS_TEST_KEY",
                         f"--out={out}"]) == 1
    stdout, err = capsys.readouterr()
    assert err.startswith("error: --generator=") and err.count("\n") == 1 and not stdout
    assert "[redacted]" in err
    assert not leaks(out, stdout, err) and not out.exists() and not server.seen   # no file, no partial, no request
    with pytest.raises(TacticsError) as e:                                          # the API refuses it the same way
        make_examples(builtin_items()[:1], generator=generator, api_key_env="TACTICS_TEST_KEY")
    assert SECRET not in "".join(traceback.format_exception(e.value)) and not server.seen


def test_a_key_given_as_api_key_env_is_refused_unechoed(stub, tmp_path, capsys):
    server, url = stub
    out = tmp_path / "out"
    assert tactics.main(["--data=builtin", "--n=2", f"--generator={url}", f"--api_key_env={SECRET}",
                         f"--out={out}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --api_key_env takes the name") and SECRET not in err and not out.exists()


def test_endpoint_is_joined_with_urllib_and_redaction_keeps_the_host():
    assert tactics.endpoint_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert tactics.endpoint_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
    assert tactics.endpoint_url("https://h") == "https://h/chat/completions"
    assert tactics.endpoint_url("http://[::1]:8000/v1") == "http://[::1]:8000/v1/chat/completions"
    assert tactics.redact_url("http://u:k@h:8000/v1?api_key=k#t") == \
        "http://[redacted]@h:8000/v1?[redacted]#[redacted]"
    assert tactics.redact_url("http://h:k/v1") == "http://h:[redacted]/v1"
    assert tactics.redact_url("http:u:k@h") == "http:[redacted]"
    assert tactics.shown_generator("http:http://u:k@h/v1") == "http:http://[redacted]@h/v1"
    assert tactics.shown_generator("model:s3://bucket/m") == "model:s3://bucket/m"   # a model path is no URL
    rows = make_examples(builtin_items()[:1], generator="templates")
    assert rows[0]["generator"] == "templates"


def test_a_short_dummy_key_leaves_the_text_alone(stub, monkeypatch):
    server, url = stub
    server.mode = "echo"
    monkeypatch.setenv("TACTICS_TEST_KEY", "EMPTY")             # vLLM's documented dummy key: a word, no secret
    rows = make_examples(builtin_items()[:1], generator=url, api_key_env="TACTICS_TEST_KEY", workers=1)
    assert all(r["sycophantic"].endswith("bad key (you sent Bearer EMPTY)") for r in rows)


def test_killed_and_full_disk_runs_leave_no_key(stub, tmp_path, monkeypatch, capsys):
    server, url = stub
    server.mode = "echo"                                        # the server even puts the key into its texts
    out = tmp_path / "out"
    args = ["--data=builtin", "--n=4", f"--generator=http:{url}", "--api_key_env=TACTICS_TEST_KEY", f"--out={out}",
            "--batch_size=8", "--workers=2"]
    real, calls = tactics.write_rows, []

    def dies_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(tactics, "write_rows", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        tactics.main(args)
    partial = read_jsonl(out / "tactics.partial.jsonl")
    assert len(partial) == 1 + 8 and partial[0]["config"]["generator"] == f"http:{url}"
    assert all(r["sycophantic"].endswith("key ok (you sent Bearer [redacted])") for r in partial[1:])
    assert not leaks(out, *capsys.readouterr())

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    real_temp_copy = results._temp_copy
    monkeypatch.setattr(tactics, "write_rows", real)
    monkeypatch.setattr(results, "_temp_copy", full_disk)      # publish's first write fills the disk
    assert tactics.main(args) == 1
    stdout, err = capsys.readouterr()
    assert err.splitlines()[-1].startswith("error: could not write") and "No space left" in err
    assert (out / "tactics.partial.jsonl").exists() and not leaks(out, stdout, err)
    monkeypatch.setattr(results, "_temp_copy", real_temp_copy)
    assert tactics.main(args) == 0
    assert not (out / "tactics.partial.jsonl").exists() and not leaks(out, *capsys.readouterr())


# ------------------------------------------------------------------------------------------- model generator
def test_model_generator_runs_on_a_tiny_checkpoint(tiny_chat):
    folder, _ = tiny_chat
    complete = tactics.model_completer(str(folder), tactics.TacticsConfig(max_new_tokens=5, batch_size=8))
    rows = make_examples(builtin_items()[1:2], seed=0, generator=f"model:{folder}", complete=complete)
    assert len(rows) == 4 and all(r["generator"] == f"model:{folder}" for r in rows)
    for r in rows:
        assert r["messages"][0]["content"].strip() and r["sycophantic"].strip() and r["correct"].strip()
        assert r["question"] in r["messages"][0]["content"] and set(r["fallback"]) == set(r["templates"])
        assert set(r["checks"]) == {"user_has_false", "sycophantic_has_false", "correct_has_correct"}
    assert make_examples(builtin_items()[1:2], seed=0, generator=f"model:{folder}", complete=complete) == rows  # greedy
    one = make_examples(builtin_items()[1:2], seed=0, generator=f"model:{folder}", max_new_tokens=2)  # loads by itself
    assert len(one) == 4 and one[0]["generator"] == f"model:{folder}"


def test_train_py_reads_the_sft_and_dpo_files(tiny_chat, tmp_path):
    train = pytest.importorskip("train")          # written alongside; the formats must meet
    from chat import get_chat_format, load_tokenizer
    folder, _ = tiny_chat
    tok, fmt = load_tokenizer(folder), get_chat_format("chatml")
    assert tactics.main(["--data=builtin", "--n=3", f"--out={tmp_path}", "--test_frac=0"]) == 0
    for mode in ("sft", "dpo"):
        path = next(tmp_path.glob(f"*.{mode}-train.jsonl"))
        items = train.read_examples(path, mode, tok, fmt, max_len=4096)
        assert len(items) == 12 and not items.skipped
