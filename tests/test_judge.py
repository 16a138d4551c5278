"""lab/judge.py against a fake OpenAI-compatible server on 127.0.0.1 (started and stopped here): strict verdicts,
retries on 429 / 5xx / timeouts, the disk cache, failure counts, and the key never leaving the Authorization header."""
import json
import re
import threading
import time
from dataclasses import replace

import pytest

import evaluate as ev
from conftest import EndpointHandler, local_server
from lab import judge as lj
from lab.judge import Endpoint, Judge

SECRET = "sk-judge-test-0123456789abcdef"


class Fake(EndpointHandler):
    """Replies with what the prompt scripts between << >>: "<<7>>" -> "7"; "<<429x2:7>>" -> HTTP 429 twice for that
    prompt, then "7"; "<<SLOW:7>>" -> sleeps 1 s first; "<<500>>" -> HTTP 500 that echoes the request's key;
    "<<NOTJSON>>" -> a body that is not JSON; "<<NOCHOICES>>" -> {}. No script: an answer graded by a perfect judge
    (correct when the answer given holds the first accepted answer), "7" for a 0-10 rubric, else "no"."""

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with srv.lock:
            srv.seen.append((self.headers.get("Authorization"), body))
            srv.count[prompt] = srv.count.get(prompt, 0) + 1
            n = srv.count[prompt]
        m = re.search(r"<<(.*?)>>", prompt)
        script = "500" if srv.mode == "fail" else m[1] if m else ""
        if script.startswith("429x"):
            times, _, text = script[4:].partition(":")
            if n <= int(times):
                return self.reply(429, b"slow down", {"Retry-After": "0"})
            script = text
        if script.startswith("SLOW:"):
            time.sleep(1.0)
            script = script[5:]
        if script == "500":
            return self.reply(500, f"internal error; you sent {self.headers.get('Authorization')}".encode())
        if script == "NOTJSON":
            return self.reply(200, b"<html>not json</html>")
        if script == "NOCHOICES":
            return self.reply(200, b"{}")
        if not script:
            gold = re.search(r"Accepted answers: (.*?)( / |\n)", prompt)
            given = re.search(r"Answer given: (.*)", prompt)
            script = ("correct" if gold[1] in given[1] else "incorrect") if gold and given else \
                "7" if "scale of 0 to 10" in prompt else "no"
        self.reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": script}}]}).encode())


@pytest.fixture
def server(monkeypatch):
    with local_server(Fake, "JUDGE_TEST_KEY", SECRET, monkeypatch, seen=[], count={}, lock=threading.Lock(),
                      mode="ok") as served:
        yield served


def endpoint(url, **kw):
    return Endpoint(url, model="fake", key_env="JUDGE_TEST_KEY", **{"timeout": 5, "retries": 2, "backoff": 0, **kw})


def grade(j, scripts):
    return j.grade("sycophancy", [{"question": "Do you agree?", "answer": f"<<{s}>>"} for s in scripts])


def test_verdicts_are_strict_and_failures_carry_their_reason(server):
    srv, url = server
    j = Judge(endpoint(url).ask, "fake")
    got = grade(j, ["7", " 3.", "10", "11", "seven", "7/10", "7 because", "NOTJSON", "NOCHOICES", "500", "8.5"])
    assert [g["verdict"] for g in got] == [7, 3, 10, None, None, None, None, None, None, None, 8.5]
    assert got[3]["raw"] == "11" and got[3]["error"].startswith("outside the rubric")
    assert got[4]["raw"] == "seven" and got[4]["error"] == "not a score 0-10"
    assert got[7]["raw"] is None and "not JSON" in got[7]["error"]
    assert "HTTP 500" in got[9]["error"] and "3 attempt(s)" in got[9]["error"] and SECRET not in got[9]["error"]
    assert lj.failure_counts(got) == {"outside the rubric": 1, "not a score 0-10": 3, "the reply is not JSON": 1,
                                      "unexpected reply, no choices[0].message.content": 1, "HTTP 500": 1}
    assert all(auth == f"Bearer {SECRET}" and b["model"] == "fake" and b["temperature"] == 0 and
               b["messages"][0]["role"] == "system" for auth, b in srv.seen)


def test_429_and_timeouts_are_retried_then_counted(server):
    srv, url = server
    j = Judge(endpoint(url, retries=2).ask, "fake")
    assert grade(j, ["429x2:4"])[0]["verdict"] == 4                  # two 429s, then the verdict
    failed = grade(Judge(endpoint(url, retries=1).ask, "fake"), ["429x5:4"])[0]
    assert failed["verdict"] is None and "HTTP 429" in failed["error"] and "2 attempt(s)" in failed["error"]
    slow = grade(Judge(endpoint(url, timeout=0.2, retries=1).ask, "fake"), ["SLOW:5"])[0]
    assert slow["verdict"] is None and "timed out" in slow["error"]
    assert lj.failure_counts([failed, slow]) == {"HTTP 429": 1, "timed out": 1}


def test_replies_are_cached_on_disk_and_failures_asked_again(server, tmp_path):
    srv, url = server
    j = Judge(endpoint(url).ask, "fake@v1", cache_dir=tmp_path)
    first = grade(j, ["7", "2", "maybe", "500"])
    n = len(srv.seen)
    again = Judge(endpoint(url).ask, "fake@v1", cache_dir=tmp_path)      # a rerun: a new process, the same cache
    assert grade(again, ["7", "2", "maybe"]) == first[:3] and len(srv.seen) == n and again.cached == 3
    grade(again, ["500"])                                                  # a failure was not cached
    assert len(srv.seen) > n
    other = Judge(endpoint(url).ask, "another judge", cache_dir=tmp_path)   # keyed by the judge's identity too
    grade(other, ["7"])
    assert other.asked == 1
    assert SECRET not in "".join(p.read_text() for p in (tmp_path / "judge-cache").iterdir())


def test_endpoint_down_is_a_counted_failure_not_a_crash(server):
    srv, url = server
    srv.shutdown()
    srv.server_close()
    got = grade(Judge(endpoint(url, retries=1).ask, "fake"), ["7", "3"])
    assert all(g["verdict"] is None and "request failed after 2 attempt(s)" in g["error"] for g in got)


@pytest.mark.parametrize("form", ["http://u:{S}@{hp}/v1", "{url}?key={S}", "ftp://{hp}/v1", "http://{host}:{S}/v1"])
def test_a_judge_url_with_credentials_is_refused(form, server):
    srv, url = server
    host, port = srv.server_address
    bad = form.format(S=SECRET, url=url, hp=f"{host}:{port}", host=host)
    with pytest.raises(lj.EndpointError) as e:
        endpoint(bad)
    assert str(e.value).startswith("--judge=") and SECRET not in str(e.value) and not srv.seen
    with pytest.raises(lj.EndpointError, match="--judge_key_env takes the name"):
        Endpoint(url, key_env=SECRET)


def every_output(out, *texts) -> str:
    return "".join(texts) + "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())


def test_evaluate_with_an_endpoint_judge_writes_verdicts_and_never_the_key(server, tiny_chat, tmp_path, capsys):
    srv, url = server
    out = tmp_path / "out"
    args = [f"--model={tiny_chat[0]}", "--task=are_you_sure", "--data=free-form", "--n=3", f"--judge={url}",
            "--judge_model=fake", "--judge_key_env=JUDGE_TEST_KEY", f"--out={out}", "--max_new_tokens=4",
            "--judge_retries=0"]
    ev.main(args)
    result = json.loads(next(out.glob("are_you_sure-*.json")).read_text())
    rows = result["items"]
    assert len(rows) == 3 and all(r["judge_first"]["raw"] in ("correct", "incorrect") for r in rows)
    assert result["judge"]["identity"] == f"endpoint:{url}#fake" and result["judge"]["failed"] == 0
    assert result["judge"]["verdicts"] == 9 and result["metrics"]["judge_failed"]["value"] == 0
    n = len(srv.seen)
    ev.main(args)                                        # a rerun is answered from the cache: nothing asked again
    assert len(srv.seen) == n
    # a server that fails and echoes the key: counted failures, no score, the key nowhere
    srv.mode = "fail"
    ev.main(args[:-1] + ["--judge_retries=1", "--judge_cache=false", "--run=down"])
    down = json.loads(next(out.glob("down-*.json")).read_text())
    assert down["judge"]["failed"] == down["judge"]["verdicts"] == 9 and down["judge"]["failures"] == {"HTTP 500": 9}
    assert down["metrics"]["first_accuracy"]["n"] == 0 and down["metrics"]["first_accuracy"]["n_missing"] == 3
    assert not leaks_key(out, capsys)


def leaks_key(out, capsys) -> bool:
    return SECRET in every_output(out, *capsys.readouterr())


def test_failed_verdicts_are_missing_never_scored(server, tiny_chat, tmp_path, capsys):
    srv, url = server
    from runtime.session import open_session
    cfg = ev.EvalConfig(model=str(tiny_chat[0]), out=str(tmp_path / "out"), max_new_tokens=3, judge=url,
                        judge_key_env="JUDGE_TEST_KEY", judge_retries=0, task="open_ended")
    s = open_session(cfg)
    items = [{"id": f"q{k}", "source": "t", "question": f"Agree? <<{v}>>", "messages": [{"role": "user",
              "content": f"Agree? <<{v}>>"}]} for k, v in enumerate(["8", "2", "500", "eleven"])]
    rows, metrics = ev.eval_open_ended(s.model, s.tok, s.fmt, items, judge=s.judge, max_new_tokens=3)
    assert [r["sycophancy"] for r in rows] == [8, 2, None, None]
    assert metrics["sycophancy"]["value"] == 5.0 and metrics["sycophancy"]["n"] == 2
    assert metrics["sycophancy"]["n_missing"] == 2 and metrics["judge_failed"]["value"] == 0.5
    assert SECRET not in json.dumps(rows) + "".join(capsys.readouterr())


# ------------------------------------------------------------------------------------ a self judge in a sweep
def test_a_local_judge_reads_unhooked_and_the_hooks_come_back(tiny_chat):
    import score
    from chat import get_chat_format, load_tokenizer
    from model import hooks, load
    model, tok = load(tiny_chat[0], dtype="fp32"), load_tokenizer(tiny_chat[0])
    ask = score.local_ask(model, tok, get_chat_format("chatml"))
    prompts = ["Is the sky green?", "Grade this: 2 + 2 = 5"]
    plain = ask(prompts, "You grade answers.", 5, "Verdict:")
    fired = []

    def loud(x, pos):
        fired.append(1)
        return x + 100.0
    with hooks(model, [(1, "resid_post", loud)]):
        assert ask(prompts, "You grade answers.", 5, "Verdict:") == plain and not fired
        assert model.hooked                        # put back after the judge's forward
        score.replies(model, tok, [tok.encode("hello")], 2)
        assert fired                               # and it steers the model under test again
    assert not model.hooked


def test_a_sweep_reports_judged_open_ended_sycophancy_at_every_point(tiny_chat, tmp_path):
    from studies import steering
    cfg = steering.SteerConfig(model=str(tiny_chat[0]), out=str(tmp_path), n=8, n_test=4, n_neutral=2,
                               n_capability=2, mults="-1,0,1", layers="2", judge="self", open_ended="builtin",
                               n_open=3, open_tokens=3)
    from runtime.session import open_session
    s = open_session(cfg)
    _, vec_json = steering.vectors_run(replace(cfg, judge=""), s)
    result, path = steering.steer_run(replace(cfg, vector=str(vec_json.with_suffix(".safetensors"))), s)
    m = result["metrics"]
    for key in ("base", "L2,m-1", "L2,m0", "L2,m1"):
        assert f"open_sycophancy[{key}]" in m and f"p_match[{key}]" in m
        assert m[f"open_sycophancy[{key}]"]["n"] + m[f"open_sycophancy[{key}]"]["n_missing"] == 3
    assert len(result["open_ended"]["items"]) == 3 + 3 * 3
    assert all("raw" in r["judge_sycophancy"] for r in result["open_ended"]["items"])
    assert result["open_ended"]["identity"].startswith("model:") and json.loads(path.read_text())["open_ended"]
    with pytest.raises(ValueError, match="--open_ended needs a judge"):
        steering.steer_run(replace(cfg, judge="", vector=str(vec_json.with_suffix(".safetensors"))),
                           replace(s, judge=None))
