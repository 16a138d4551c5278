"""Bad input is refused early and plainly (issue 17): commands that would run something else, flags and vectors
files checked when read, skips that are recorded, zero items left, and user errors as one `error: ...` line."""
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import disk_full_on_link
import evaluate as ev
import steer
import train
from lab import args, results
from model import load, read_safetensors
from runtime.session import open_session
from studies import geometry, steering

REPO = Path(__file__).resolve().parent.parent
ACTIONS = ("vectors", "steer", "ablate", "demo")


def exits(fn, *a) -> str:
    """fn(*a) must end the run with a message (SystemExit): that message."""
    with pytest.raises(SystemExit) as e:
        fn(*a)
    assert e.value.code not in (0, None)
    return str(e.value.code)


# ------------------------------------------------------------------------------------------------ actions

@pytest.mark.parametrize("argv", [["--vector=V", "--n=2", "steer"], ["--action=steer"], ["steer", "--action=steer"],
                                  ["--vector=V", "steer", "--n=2"]])
def test_the_action_is_read_wherever_it_is_given(argv):
    assert args.parse_command(steering.SteerConfig, argv, ACTIONS).action == "steer"


def test_no_action_is_the_default_one():
    assert args.parse_command(steering.SteerConfig, ["--n=2"], ACTIONS).action == "vectors"
    assert args.parse_command(geometry.GeometryConfig, ["--action=geometry"], tuple(geometry.RUNS)).action == \
        "geometry"


@pytest.mark.parametrize("argv, message", [
    (["steer", "--action=ablate"], "conflicting actions 'steer', 'ablate': give one of vectors, steer, ablate, demo"),
    (["steer", "ablate"], "conflicting actions 'steer', 'ablate'"),
    (["stear"], "unknown action 'stear'; valid: vectors, steer, ablate, demo"),
    (["--action=nope"], "unknown action 'nope'; valid: vectors, steer"),
    (["vectors", "-n=4"], "bad argument '-n=4': expected --key=value"),
    (["vectors", "--vector", "out/v.safetensors"], "bad argument '--vector': expected --key=value"),
])
def test_an_argument_not_understood_is_an_error(argv, message):
    assert message in exits(steering.main, argv)


def test_geometry_action_flag_is_read(tmp_path):
    assert "unknown action 'nope'; valid: predict, consistency, geometry" in exits(geometry.main, ["--action=nope"])


def test_action_given_last_runs_that_action(tiny_chat, tmp_path):
    """`steer` last used to run `vectors` and exit 0: now it runs steer, which wants its --vector file."""
    missing = tmp_path / "none.safetensors"
    message = exits(steering.main, [f"--model={tiny_chat[0]}", f"--out={tmp_path}", f"--vector={missing}", "steer"])
    assert message.startswith("error: ") and str(missing) in message
    assert not list(tmp_path.glob("vectors*"))


# ------------------------------------------------------------------------------------------------ flags

@pytest.mark.parametrize("cfg_class, flag, message", [
    (steering.SteerConfig, "--layers=abc", "--layers=abc: expects layers like 3,9,15 or 4-12"),
    (steering.SteerConfig, "--layers=3,,4", "--layers=3,,4: expects layers"),
    (steering.SteerConfig, "--layers=9-2", "not the empty range '9-2'"),
    (geometry.GeometryConfig, "--layers=x", "--layers=x: expects layers"),
    (steering.SteerConfig, "--mults=nan", "--mults=nan: expects finite numbers, not 'nan'"),
    (steering.SteerConfig, "--mults=-1,inf", "--mults=-1,inf: expects finite numbers, not 'inf'"),
    (steering.SteerConfig, "--mults=1,,2", "--mults=1,,2: expects comma-separated numbers"),
    (steering.SteerConfig, "--n=-4", "--n=-4: expects a whole number >= 0"),
    (steering.SteerConfig, "--n_neutral=0", "--n_neutral=0: expects a whole number >= 1"),
    (geometry.GeometryConfig, "--n_boot=0", "--n_boot=0: expects a whole number >= 1"),
    (ev.EvalConfig, "--n=-1", "--n=-1: expects a whole number >= 0"),
    (train.TrainConfig, "--batch_size=0", "--batch_size=0: expects a whole number >= 1"),
    (train.TrainConfig, "--lr=nan", "--lr=nan: expects a finite number"),
    (ev.EvalConfig, "--dist_timeout=inf", "--dist_timeout=inf: expects a finite number"),
    (steering.SteerConfig, "--select=sideways", "--select=sideways: expects one of decrease, increase, either"),
    (steering.SteerConfig, "--kl_max=0", "--kl_max=0: expects a number > 0"),
    (steering.SteerConfig, "--kl_max=nan", "--kl_max=nan: expects a finite number"),
    (steering.SteerConfig, "--val_frac=1", "--val_frac=1: expects a number between 0 and 1"),
    (steering.SteerConfig, "--n_random=-1", "--n_random=-1: expects a whole number >= 0"),
    (steering.SteerConfig, "--read=tokens", "--read=tokens: expects one of letter, response"),
])
def test_flags_are_checked_while_parsing_naming_the_flag(cfg_class, flag, message):
    assert message in exits(args.parse_args, cfg_class, [flag])


@pytest.mark.parametrize("argv, message", [
    (["steer", "--control=true", "--n_random=0"],
     "error: --n_random=0: the random-direction control (--control=true) needs at least one direction"),
    (["ablate", "--joint=true"], "error: --joint=true: ablate removes one layer's direction from every layer"),
])
def test_flags_wrong_together_are_one_line_before_the_model_loads(argv, message, monkeypatch):
    monkeypatch.setattr(steering, "open_session", lambda cfg: pytest.fail("the model was loaded"))
    got = exits(steering.main, argv + ["--vector=v.safetensors"])
    assert got.startswith(message) and "\n" not in got


def test_compare_with_one_vectors_file_is_one_line(tiny_chat, tmp_path):
    got = exits(steering.main, ["compare", f"--model={tiny_chat[0]}", "--vector=a.safetensors", f"--out={tmp_path}"])
    assert got.startswith("error: --vector=a.safetensors --vector2=: compare takes two vectors files, or neither")


def test_checked_flags_keep_plain_values():
    cfg = args.parse_args(steering.SteerConfig, ["--layers=-1,4-6", "--mults=-0.5,2", "--n=3"])
    assert (cfg.layers, cfg.mults, cfg.n) == ("-1,4-6", "-0.5,2", 3)
    assert json.loads(json.dumps(vars(cfg)))["n"] == 3
    assert args.layer_numbers("-1,4-6") == [-1, 4, 5, 6] and args.finite_numbers("-0.5,2") == [-0.5, 2.0]


def made_from(folder) -> dict:
    """The identity a vectors file records of the model it was made from."""
    return {"model": str(folder), "model_sha256": results.model_id(folder)}


def test_nan_multiplier_is_refused_before_the_base_sweep(tiny_chat, tmp_path, monkeypatch):
    s = open_session(steering.SteerConfig(model=str(tiny_chat[0])))
    path = steer.save_vectors(tmp_path, "v", torch.ones(3, 64), [0, 1, 2], torch.ones(3), made_from(tiny_chat[0]))
    monkeypatch.setattr(steering, "SweepScorer", lambda *a, **k: pytest.fail("the base sweep started"))
    cfg = steering.SteerConfig(model=str(tiny_chat[0]), vector=str(path), mults="1,nan", out=str(tmp_path))
    with pytest.raises(ValueError, match="--mults=1,nan: expects finite numbers"):
        steering.steer_run(cfg, s)


# ------------------------------------------------------------------------------------------------ vectors files

@pytest.fixture(scope="module")
def model(tiny_chat):
    return load(tiny_chat[0])


@pytest.mark.parametrize("vectors, layers, norms, message", [
    (torch.tensor([[1.0] * 64, [float("nan")] * 64]), [0, 2], torch.ones(2), r"vectors holds NaN or inf \(at layers \[2\]\)"),
    (torch.ones(2, 64), [0, 1], torch.tensor([1.0, float("inf")]), "mean_norm holds NaN or inf"),
    (torch.ones(2, 64), [0, 1, 2], torch.ones(2), "its layers list 3 layers, but it holds 2 vectors and 2 mean norms"),
    (torch.ones(3, 64), [0, 1, 2], torch.ones(2), "holds 3 vectors and 2 mean norms"),
    (torch.ones(2, 64), [1, 1], torch.ones(2), r"layers \[1, 1\] should be distinct"),
    (torch.ones(2, 64), [0, 7], torch.ones(2), r"has vectors for layers \[7\], which the model lacks \(it has 3"),
])
def test_a_bad_vectors_file_is_refused_on_load_naming_it(model, tmp_path, vectors, layers, norms, message):
    path = steer.save_vectors(tmp_path, "bad", vectors, layers, norms, {})
    with pytest.raises(ValueError, match=message) as e:
        steer.load_vectors(path, model)
    assert str(e.value).startswith(str(path))


# ------------------------------------------------------------------------------------------------ identities

@pytest.fixture(scope="module")
def near_copy(tiny_chat, tmp_path_factory):
    """tiny_chat's folder with only its last layer's down_proj changed: alike in shape, config, embeddings and
    layer 0 (what the old three-tensor fingerprint sampled), another model all the same."""
    from safetensors.torch import load_file, save_file
    folder = tmp_path_factory.mktemp("near-copy")
    for f in tiny_chat[0].iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy(f, folder / f.name)
    weights = load_file(folder / "model.safetensors")
    key = "model.layers.2.mlp.down_proj.weight"
    weights[key] = weights[key] + 1e-3
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_vectors_from_a_near_copy_or_without_identity_are_refused(tiny_chat, near_copy, tmp_path):
    mine = steer.save_vectors(tmp_path, "v", torch.ones(3, 64), [0, 1, 2], torch.ones(3), made_from(tiny_chat[0]))
    other = load(near_copy)
    with pytest.raises(ValueError, match=rf"was made from model {tiny_chat[0]} \(sha256 [0-9a-f]{{64}}\), not the one "
                                         rf"loaded now, model {near_copy} \(sha256 [0-9a-f]{{64}}\); pass "
                                         "--cross_model=true"):
        steer.load_vectors(mine, other)
    anonymous = steer.save_vectors(tmp_path, "a", torch.ones(3, 64), [0, 1, 2], torch.ones(3), {})
    with pytest.raises(ValueError, match="records no model identity"):
        steer.load_vectors(anonymous, load(tiny_chat[0]))
    with pytest.raises(ValueError, match="records no model identity"):
        steer.load_activations(write_acts(tmp_path / "x.acts.safetensors"), load(tiny_chat[0]))
    check = steer.load_vectors(mine, load(tiny_chat[0]))[2]["model_check"]
    assert check["same_model"] and not check["cross_model"]
    check = steer.load_vectors(mine, other, cross_model=True)[2]["model_check"]
    assert not check["same_model"] and check["cross_model"] and check["made_from"] == str(tiny_chat[0])


def test_cross_model_steering_is_explicit_and_recorded(tiny_chat, near_copy, tmp_path):
    cfg = steering.SteerConfig(model=str(tiny_chat[0]), out=str(tmp_path), layers="1", n=8, n_test=4)
    vectors = steering.vectors_run(cfg, open_session(cfg))[0]["files"]["vectors"]
    argv = ["steer", f"--model={near_copy}", f"--vector={vectors}", f"--out={tmp_path}", "--layers=1", "--mults=0,1",
            "--n=8", "--n_test=4", "--n_neutral=2", "--n_capability=4"]
    message = exits(steering.main, argv)
    assert message.startswith(f"error: {vectors}: this vectors file was made from model {tiny_chat[0]}")
    assert not list(tmp_path.glob("steer-*.json"))
    scfg = args.parse_command(steering.SteerConfig, argv + ["--cross_model=true"], ACTIONS)
    result, _ = steering.steer_run(scfg, open_session(scfg))
    assert result["config"]["cross_model"] and result["conventions"]["model_check"]["cross_model"]
    assert result["conventions"]["model_check"]["same_model"] is False


def test_an_adapter_for_another_model_is_refused_unless_cross_model(tiny_chat, near_copy, tmp_path):
    from lora import add_lora, load_adapter, save_adapter
    base = load(tiny_chat[0])
    add_lora(base, r=2)
    path = save_adapter(base, tmp_path / "a.safetensors")
    assert load_adapter(load(tiny_chat[0]), path)["model_check"]["same_model"]
    with pytest.raises(ValueError, match=rf"{path}: this adapter file was made from model {tiny_chat[0]}"):
        load_adapter(load(near_copy), path)
    assert load_adapter(load(near_copy), path, cross_model=True)["model_check"]["cross_model"]
    message = exits(train.main, [f"--model={near_copy}", f"--data={sft_file(tmp_path)}", f"--out={tmp_path}",
                                 f"--init_adapter={path}", "--max_steps=1"])
    assert message.startswith(f"error: {path}: this adapter file was made from model") and "\n" not in message
    assert not (tmp_path / "sft").exists()


def test_a_pickle_adapter_says_it_is_a_pickle(tiny_chat, tmp_path):
    from lora import load_adapter
    for name, save in [("a.pt", lambda p: torch.save({"x": torch.ones(2)}, p)),
                       ("b.bin", lambda p: torch.save({"x": torch.ones(2)}, p, _use_new_zipfile_serialization=False))]:
        save(tmp_path / name)
        with pytest.raises(ValueError, match=rf"{name}: a pickle \(torch.save.s zip or a bare pickle\), not safetensors"):
            load_adapter(load(tiny_chat[0]), tmp_path / name)


def sft_file(tmp_path) -> Path:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Is {k} even?"}],
                                        "response": "Yes."}) + "\n" for k in range(4)))
    return path


def write_acts(path) -> Path:
    from safetensors.torch import save_file
    meta = {"ids": json.dumps(["a"]), "letters": json.dumps([["A", "B"]]), "layers": "[0]"}
    save_file({"pos": torch.ones(1, 1, 64), "neg": torch.zeros(1, 1, 64)}, path, metadata=meta)
    return path


# ------------------------------------------------------------------------------------------------ full disks

def test_a_full_disk_while_publishing_vectors_leaves_no_orphan(tiny_chat, tmp_path, monkeypatch):
    """The vectors file without its activations and JSON would be what the Makefile's VECTOR= picks next."""
    cfg = steering.SteerConfig(model=str(tiny_chat[0]), out=str(tmp_path / "out"), layers="1", n=8)
    s = open_session(cfg)
    disk_full_on_link(monkeypatch, 2)
    with pytest.raises(OSError, match="none of the run's 3 files was left"):
        steering.vectors_run(cfg, s)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_full_disk_on_the_first_results_row_names_the_file(tmp_path, monkeypatch):
    ck = results.Checkpoint(tmp_path, "run", config={"seed": 0})
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError) as e:
        ck.add({"id": 0})
    assert exits(raises, e.value) == (f"error: could not append to {tmp_path / 'run.partial.jsonl'} (No space left); "
                                      "the rows before it are kept and a rerun resumes from them")


def test_a_bad_vectors_file_is_one_line_from_the_command(tiny_chat, tmp_path):
    path = steer.save_vectors(tmp_path, "bad", torch.ones(2, 64), [0, 1, 2], torch.ones(2), {})
    message = exits(steering.main, ["steer", f"--model={tiny_chat[0]}", f"--vector={path}", f"--out={tmp_path}"])
    assert message.startswith(f"error: {path}: its layers list 3 layers") and "\n" not in message


def test_a_bad_activations_file_is_refused_on_load(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "x.acts.safetensors"
    meta = {"ids": json.dumps(["a", "b"]), "letters": json.dumps([["A", "B"], ["B", "A"]]), "layers": "[0, 1, 2]"}
    save_file({"pos": torch.ones(2, 2, 8), "neg": torch.ones(2, 2, 8)}, path, metadata=meta)
    with pytest.raises(ValueError, match=r"holds 2 pairs at 2 layers, but its metadata lists 2 pairs and layers"):
        steer.load_activations(path)
    save_file({"pos": torch.full((2, 3, 8), float("nan")), "neg": torch.ones(2, 3, 8)}, path, metadata=meta)
    with pytest.raises(ValueError, match="activations hold NaN or inf"):
        steer.load_activations(path)


def test_safetensors_header_entry_that_is_not_a_dict_says_so(tmp_path):
    header = json.dumps({"vectors": [1, 2, 3]}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match=r"odd.safetensors: header entry 'vectors' is not \{dtype, shape, data_off"):
        read_safetensors(path)


# ------------------------------------------------------------------------------------------------ skips

def ab_file(path, n_good: int, bad_lines=()):
    """An Anthropic-format A/B .jsonl: n_good opinion questions, with the given bad lines after the first."""
    good = [json.dumps({"question": f"Hello, I am Sam. I think claim {k} is true. Do you agree?\n\nChoices:\n"
                                    " (A) Agree\n (B) Disagree\n\nAnswer:",
                        "answer_matching_behavior": " (A)" if k % 2 else " (B)",
                        "answer_not_matching_behavior": " (B)" if k % 2 else " (A)"}) for k in range(n_good)]
    path.write_text("\n".join(good[:1] + list(bad_lines) + good[1:]) + "\n")
    return path


def test_vectors_record_skipped_lines(tiny_chat, tmp_path):
    f = ab_file(tmp_path / "pairs.jsonl", 6, ['{"question": "broken"'])
    cfg = steering.SteerConfig(model=str(tiny_chat[0]), out=str(tmp_path), data=str(f), skip_bad=True, layers="1")
    result, path = steering.vectors_run(cfg, open_session(cfg))
    on_disk = json.loads(path.read_text())
    assert [(s["file"], s["line"]) for s in on_disk["skipped"]] == [(str(f), 2)] and "bad JSON" in \
        on_disk["skipped"][0]["error"]
    assert on_disk["conventions"]["n_pairs"] == 6


def test_a_sample_still_counts_the_skips(tiny_chat, tmp_path):
    f = ab_file(tmp_path / "pairs.jsonl", 6, ["[1]", "{"])
    cfg = ev.EvalConfig(model=str(tiny_chat[0]), out=str(tmp_path), task="ab", data=str(f), skip_bad=True, n=3)
    result, _ = ev.run_task(cfg, open_session(cfg))
    assert len(result["items"]) == 3 and [s["line"] for s in result["skipped"]] == [2, 3]


def test_every_line_bad_with_skip_bad_is_an_error_naming_the_file(tiny_chat, tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text('{"question": "broken"\n{"question": "no answer"}\n')
    cfg = ev.EvalConfig(model=str(tiny_chat[0]), out=str(tmp_path), task="gsm8k", data=str(f), skip_bad=True)
    with pytest.raises(ValueError, match=rf"{f}: no usable records: all 2 were bad and skipped \(first, line 1"):
        ev.run_task(cfg, open_session(cfg))
    message = exits(ev.main, [f"--model={tiny_chat[0]}", f"--out={tmp_path}", "--task=gsm8k", f"--data={f}",
                              "--skip_bad=true"])
    assert message.startswith(f"error: {f}: no usable records") and not list(tmp_path.glob("gsm8k*.json"))
    with pytest.raises(ValueError, match="no usable records"):
        steer.ab_items(str(ab_file(tmp_path / "bad.jsonl", 0, ["{", "[]"])), 0, 0, skip_bad=True)


# ------------------------------------------------------------------------------------------------ one line

@args.user_errors()
def raises(e):
    raise e


@pytest.mark.parametrize("error, line", [
    (ValueError("data.jsonl:3: bad JSON"), "error: data.jsonl:3: bad JSON"),
    (FileNotFoundError("x.json: no such file"), "error: x.json: no such file"),
    (OSError(errno.ENOSPC, "No space left on device", "out/r.json"), "error: out/r.json: No space left on device"),
    (OSError(errno.ENOSPC, "could not write out/r.json"), "error: could not write out/r.json"),
    (PermissionError(errno.EACCES, "Permission denied", "out"), "error: out: Permission denied"),
    (args.UserError("two lines\n  of advice"), "error: two lines of advice"),
])
def test_user_errors_end_in_one_line(error, line):
    assert exits(raises, error) == line


@pytest.mark.parametrize("error", [KeyError("bug"), RuntimeError("bug"), OSError(errno.EBADF, "Bad file descriptor")])
def test_bugs_keep_their_traceback(error):
    with pytest.raises(type(error)):
        raises(error)


def test_syco_traceback_keeps_every_traceback(monkeypatch):
    monkeypatch.setenv("SYCO_TRACEBACK", "1")
    with pytest.raises(ValueError, match="deep inside"):
        raises(ValueError("deep inside"))


def script(*argv, **env):
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, **env})


def test_a_script_prints_one_error_line_and_keeps_tracebacks_on_request(tiny_chat, tmp_path):
    missing = tmp_path / "none.jsonl"
    cmd = ("evaluate", f"--model={tiny_chat[0]}", f"--out={tmp_path}", "--task=gsm8k", f"--data={missing}")
    proc = script(*cmd)
    assert proc.returncode == 1 and proc.stderr == f"error: {missing}: no such file\n", proc.stderr
    proc = script(*cmd, SYCO_TRACEBACK="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr
    proc = script("studies.steering", "--mults=nan", "steer")
    assert proc.returncode == 1 and proc.stderr == "error: --mults=nan: expects finite numbers, not 'nan'\n"


def test_a_file_that_is_not_a_results_file_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n')
    with pytest.raises(ValueError, match=rf"{path} is not a results file \(not one JSON document"):
        results.load_result(path)
