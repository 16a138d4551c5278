"""prepare.py: the embedded GGUF -> HF conversion (weights, config, tokenizer) and the hub / local-folder paths.

Offline: the default model is converted once per session (or reused from models/), the hub is never reached.
"""
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import prepare

REPO = Path(prepare.__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def hf_tokenizer(default_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model)


# ---------------------------------------------------------------------------------------------------------------
# config parsing

@dataclass
class _Cfg:
    name: str = "a"
    n: int = 1
    lr: float = 0.1
    flag: bool = False


def test_parse_args_converts_types():
    cfg = prepare.parse_args(_Cfg, ["--name=x=y", "--n=3", "--lr=1e-3", "--flag=true"])
    assert (cfg.name, cfg.n, cfg.lr, cfg.flag) == ("x=y", 3, 1e-3, True)
    assert prepare.parse_args(_Cfg, []) == _Cfg()


@pytest.mark.parametrize("argv, message", [(["--nope=1"], "unknown option --nope"), (["--n=x"], "expects int"),
                                           (["--flag=maybe"], "true/false"), (["n=3"], "--key=value")])
def test_parse_args_rejects(argv, message):
    with pytest.raises(SystemExit) as e:
        prepare.parse_args(_Cfg, argv)
    assert message in str(e.value.code)


# ---------------------------------------------------------------------------------------------------------------
# the q/k rope permutation

def llamacpp_permute(weights, n_head, n_head_kv):
    """Reference: LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py (HF rows -> llama.cpp rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


@pytest.mark.parametrize("n_head, n_kv, head_dim, d_in", [(9, 9, 64, 576), (9, 3, 64, 576), (4, 2, 8, 16)])
def test_unpermute_inverts_llamacpp_permute(n_head, n_kv, head_dim, d_in):
    w = torch.randn(n_kv * head_dim, d_in)  # k_proj (q_proj when n_kv == n_head)
    permuted = llamacpp_permute(w, 32, n_kv)  # n_head is ignored by llama.cpp when n_head_kv differs
    assert not torch.equal(permuted, w)
    assert torch.equal(prepare.unpermute_qk(permuted, n_kv), w)
    assert np.array_equal(prepare.unpermute_qk(llamacpp_permute(w.numpy(), n_kv, n_kv), n_kv), w.numpy())  # numpy


# ---------------------------------------------------------------------------------------------------------------
# the converted default model

def test_config_matches_hf(default_model):
    cfg = json.loads((default_model / "config.json").read_text())
    expected = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    rms_norm_eps=1e-5, rope_theta=100000, max_position_embeddings=8192, vocab_size=49152,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu",
                    attention_bias=False, mlp_bias=False, torch_dtype="bfloat16")
    assert {k: cfg.get(k) for k in expected} == expected
    gen = json.loads((default_model / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    tok_cfg = json.loads((default_model / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_format"] == "chatml" and "<|im_start|>" in tok_cfg["chat_template"]
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                                   "<|im_end|>")


def test_weights_have_hf_names_and_bf16(default_model):
    from safetensors import safe_open
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [f"mlp.{p}_proj.weight" for p in ("gate", "up",
                                                                                                  "down")]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{p}" for i in range(30) for p in per_layer}
    with safe_open(default_model / "model.safetensors", "pt") as f:
        assert set(f.keys()) == expected  # tied: no lm_head.weight
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (192, 576)
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.bfloat16


def test_greedy_answer_is_paris(default_model, hf_tokenizer):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    answer = hf_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_existing_model_is_not_reconverted(default_model, tmp_path):
    before = (default_model / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert prepare.ensure_default_model(default_model) == default_model
    assert time.perf_counter() - t0 < 5 and (default_model / "model.safetensors").stat().st_mtime_ns == before
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")  # someone else's incomplete folder: never deleted silently
    with pytest.raises(prepare.PrepareError, match="force"):
        prepare.ensure_default_model(tmp_path / "half")


def test_interrupted_write_leaves_no_folder_and_force_replaces(tmp_path, monkeypatch):
    import safetensors.torch
    files, state, out = {"config.json": {"a": 1}, "b.json": {}}, {"w": torch.ones(3)}, tmp_path / "m"
    real_save = safetensors.torch.save_file

    def save_then_die(state, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt  # as if killed mid-write
    monkeypatch.setattr(safetensors.torch, "save_file", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare.write_hf_folder(out, files, state)
    assert list(tmp_path.iterdir()) == []  # neither `m` nor a .partial folder

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    prepare.write_hf_folder(out, files, state)
    (out / "stale.txt").write_text("from the old folder")
    prepare.write_hf_folder(out, files, {"w": torch.zeros(3)})  # what --force=true does
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert sorted(p.name for p in out.iterdir()) == ["b.json", "config.json", "model.safetensors"]
    assert safetensors.torch.load_file(out / "model.safetensors")["w"].sum() == 0


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_special_tokens_are_single_ids(default_model, hf_tokenizer):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(default_model / "tokenizer.json"))
    for i, s in enumerate(SPECIALS):
        assert tok.encode(s).ids == [i]
        assert hf_tokenizer.encode(s, add_special_tokens=False) == [i]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5  # <|im_start|> user \n hi <|im_end|>
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_no_bos_added(hf_tokenizer):
    assert hf_tokenizer("Hello")["input_ids"] == hf_tokenizer.encode("Hello", add_special_tokens=False)
    assert hf_tokenizer.eos_token_id == 2 and hf_tokenizer.pad_token_id == 2


def test_digits_split_individually(hf_tokenizer):
    assert hf_tokenizer.tokenize("12345") == list("12345")
    assert hf_tokenizer.tokenize("in 2024") == ["in", "Ġ", "2", "0", "2", "4"]  # the space stays alone, as in SmolLM2


def test_roundtrip_unicode_and_plausible_length(default_model):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(default_model / "tokenizer.json"))
    for text in ["Héllo wörld, naïve café! 你好，世界 😀👍🏽", "  two  spaces\ttab\nnewline ", "x = f(3.14) ** 2"]:
        assert tok.decode(tok.encode(text).ids) == text
    sentence = "The quick brown fox jumps over the lazy dog near the river bank."
    n = len(tok.encode(sentence).ids)
    assert 12 <= n <= 16, n  # an English BPE of 49k tokens: about one token per word


def test_tokenizer_matches_transformers_gguf_loader(hf_tokenizer):
    """An independent reference: transformers builds its own tokenizer from the same GGUF (gguf_file=...)."""
    from transformers import AutoTokenizer
    gguf_file = prepare.find_gguf()
    ref = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    for text in ["Hello world! 12345 in 2024, 3.14159", "Héllo wörld, naïve café! 你好，世界 😀👍🏽 Россия",
                 "  two  spaces\ttab\nnewline \n\n", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
                 "def f(x):\n    return x**2  # comment", "I'm sure they'll say it's fine, don't you think?"]:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)


@pytest.mark.slow  # ~12 s: transformers' own GGUF loader dequantizes and un-permutes the whole model
def test_weights_match_transformers_gguf_loader(default_model):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    gguf_file = prepare.find_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    ref_state, mine = ref.state_dict(), load_file(default_model / "model.safetensors")
    for name, w in mine.items():
        assert torch.equal(ref_state[name].to(torch.bfloat16), w), name  # bit-exact after the bf16 cast


# ---------------------------------------------------------------------------------------------------------------
# hub downloads and local folders

def _fixture_folder(folder):
    """A fake hub repo: what a download may take (json, safetensors, tokenizer.model) and a pickle it must not."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer.model").write_bytes(b"spm")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / "README.md").write_text("readme")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    return folder


def _run_cli(args, env_update, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5", **env_update)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lab.prepare", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("offline_env", [{"HF_HUB_OFFLINE": "1"}, {}], ids=["HF_HUB_OFFLINE=1", "no-env"])
def test_cli_offline_download_is_a_clear_error(tmp_path, offline_env):
    proc, seconds = _run_cli(["--model=some-org/some-model", f"--out={tmp_path / 'm'}"], offline_env, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in ["some-org/some-model", "unreachable", "HF_TOKEN", "HF_ENDPOINT", "--model=/path/to/folder"]:
        assert needle in proc.stderr, proc.stderr
    assert seconds < 30


def test_cli_accepts_local_folder_and_rejects_missing_config(tmp_path):
    good = _fixture_folder(tmp_path / "good")
    proc, _ = _run_cli([f"--model={good}"], {"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == str(good), proc.stderr
    (good / "config.json").unlink()
    proc, _ = _run_cli([f"--model={good}"], {"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert proc.returncode == 1 and "no config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_pickle_only_folder_is_refused(tmp_path):
    folder = _fixture_folder(tmp_path / "pickles")
    (folder / "model.safetensors").unlink()
    with pytest.raises(prepare.PrepareError, match="pickle"):
        prepare.check_hf_folder(folder)


def _fake_hub(monkeypatch, source):
    """The hub replaced by a local folder: repo_info lists its files, snapshot_download copies the ones
    allow_patterns match, as the hub does. Returns the list of snapshot_download calls."""
    import huggingface_hub
    from types import SimpleNamespace
    calls = []

    def fake_snapshot_download(repo_id, *, revision=None, local_dir=None, allow_patterns=None, **kw):
        calls.append(dict(repo_id=repo_id, revision=revision, local_dir=Path(local_dir), allow_patterns=allow_patterns))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, Path(local_dir) / f.name)
        return str(local_dir)

    def fake_repo_info(repo_id, revision=None, **kw):
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f.name) for f in sorted(source.iterdir())])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "repo_info", fake_repo_info)
    return calls


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A fake hub repo with safetensors and a pickle; the default destination models/<name> under tmp_path."""
    monkeypatch.setattr(prepare, "REPO", tmp_path / "repo")
    return _fake_hub(monkeypatch, _fixture_folder(tmp_path / "hub_repo"))


def test_download_path_with_fake_hub(fake_hub, tmp_path, capsys):
    assert prepare.main(["--model=org/Some-Model", "--revision=v1"]) == 0
    out = tmp_path / "repo" / "models" / "Some-Model"
    assert capsys.readouterr().out.strip() == str(out)
    assert fake_hub == [dict(repo_id="org/Some-Model", revision="v1", local_dir=out,
                             allow_patterns=prepare.HUB_PATTERNS)]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer.model"]  # no pytorch_model.bin, no README
    assert prepare.main(["--model=org/Some-Model"]) == 0 and len(fake_hub) == 1  # complete: no second download
    assert prepare.main(["--model=org/Some-Model", "--force=true"]) == 0 and len(fake_hub) == 2


def _raise_hub_error(monkeypatch, cls, status):
    import huggingface_hub
    from huggingface_hub import errors
    request = sys.modules[errors.Response.__module__].Request("GET", "https://huggingface.co/api/models/x")

    def fail(*args, **kw):
        raise cls(f"{status} error", response=errors.Response(status, request=request))
    monkeypatch.setattr(huggingface_hub, "repo_info", fail)          # the file list is asked for first
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)


def test_gated_and_missing_repos_get_their_own_messages(monkeypatch, tmp_path, capsys):
    from huggingface_hub import errors
    _raise_hub_error(monkeypatch, errors.GatedRepoError, 401)
    assert prepare.main(["--model=meta-llama/Llama-2-7b-chat-hf", f"--out={tmp_path / 'a'}"]) == 1
    err = capsys.readouterr().err
    assert "is gated" in err and "HF_TOKEN" in err and "https://huggingface.co/meta-llama/Llama-2-7b-chat-hf" in err
    _raise_hub_error(monkeypatch, errors.RepositoryNotFoundError, 404)
    assert prepare.main(["--model=nobody/nothing", f"--out={tmp_path / 'b'}"]) == 1
    assert "not found" in capsys.readouterr().err


def pickle_mpt(folder, shards=1, dtype=torch.float32):
    """A tiny MPT as mosaicml/mpt-7b ships: config.json and pytorch_model*.bin only. transformers 5 ignores
    save_pretrained(safe_serialization=False) and writes safetensors, so the state dict is torch.save'd in HF's
    names, lm_head.weight included on transformer.wte.weight's storage as HF's state_dict has it (transformers 4's
    sharding kept tied names in one shard)."""
    from conftest import make_hf_model
    hf = make_hf_model("mpt").to(dtype)
    folder.mkdir(parents=True)
    hf.config.save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    sd = hf.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    if shards == 1:
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        keys, weight_map = [k for k in sd if k != "lm_head.weight"], {}
        for i in range(shards):
            name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            part = {k: sd[k] for k in keys[i::shards]}
            if "transformer.wte.weight" in part:
                part["lm_head.weight"] = sd["lm_head.weight"]
            torch.save(part, folder / name)
            weight_map |= {k: name for k in part}
        (folder / prepare.PICKLE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return hf


def read_converted(folder):
    """{name: tensor} of a converted folder through safetensors' own reader; its index must name each key's file."""
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        part = load_file(f)
        assert not part.keys() & state.keys()
        assert weight_map is None or all(weight_map[k] == f.name for k in part)
        state |= part
    assert weight_map is None or weight_map.keys() == state.keys()
    return state


@pytest.mark.parametrize("shards, dtype", [(1, torch.float32), (3, torch.bfloat16)])
def test_pickle_only_mpt_is_converted_once(tmp_path, capsys, shards, dtype):
    from safetensors import safe_open
    from transformers import MptForCausalLM
    from lab.results import sha256
    folder = tmp_path / "mpt"
    hf = pickle_mpt(folder, shards, dtype)
    bins = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    hashes = {b: sha256(folder / b) for b in bins}
    with pytest.raises(prepare.PrepareError, match="pickle checkpoints are refused.*--convert=true"):
        prepare.prepare(prepare.PrepareConfig(model=str(folder)))  # the default stays refusing
    assert prepare.prepare(prepare.PrepareConfig(model=str(folder), convert=True)) == folder
    assert f"converted {shards} pickle shard(s) with torch.load(weights_only=True) -> {folder}: model.safetensors" \
        in capsys.readouterr().err

    record = json.loads((folder / prepare.CONVERTED).read_text())
    assert record["sources"] == hashes and all((folder / b).exists() for b in bins)    # the user's files stay
    assert record["outputs"] == {"model.safetensors": sha256(folder / "model.safetensors")}
    assert record["how"].startswith("torch.load(weights_only=True)") and record["torch"] == torch.__version__
    assert record["tied_dropped"] == {"lm_head.weight": "transformer.wte.weight"}
    assert record["source_folder"] == str(folder.resolve()) and not record["sources_deleted"]

    # exactly the tensors (names, dtypes, bits) of the file save_pretrained writes: lm_head.weight is not there
    hf.save_pretrained(tmp_path / "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        hf_keys = set(f.keys())
    converted, sd = read_converted(folder), hf.state_dict()
    assert set(converted) == hf_keys == set(sd) - {"lm_head.weight"}
    assert all(converted[k].dtype == dtype and torch.equal(converted[k], sd[k]) for k in converted)
    reloaded, info = MptForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    assert not any(info.values()), info     # nothing missing, unexpected or mismatched: the tie is restored
    assert all(torch.equal(v, sd[k]) for k, v in reloaded.state_dict().items())

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare.prepare(prepare.PrepareConfig(model=str(folder), convert=True)) == folder
    assert "converted before" in capsys.readouterr().err and (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_convert_into_a_new_folder_in_shards(tmp_path, monkeypatch, capsys):
    from lab.results import sha256
    src, dest = tmp_path / "mpt", tmp_path / "out" / "mpt-st"
    sd = pickle_mpt(src, shards=2).state_dict()
    before = {p.name: sha256(p) for p in src.iterdir()}
    monkeypatch.setattr(prepare, "MAX_SHARD", 100_000)     # bytes: the 640 kB model in several files
    assert prepare.main([f"--model={src}", "--convert=true", f"--out={dest}"]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    assert {p.name: sha256(p) for p in src.iterdir()} == before                    # the source is untouched
    names = sorted(p.name for p in dest.glob("*.safetensors"))
    n = len(names)
    assert n > 2 and names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in dest.iterdir()) == sorted(["config.json", "tokenizer.json", prepare.CONVERTED,
                                                             "model.safetensors.index.json", *names])  # no pickle
    converted = read_converted(dest)
    assert set(converted) == set(sd) - {"lm_head.weight"} and all(torch.equal(v, sd[k]) for k, v in converted.items())
    from safetensors.torch import load_file
    for name in names:
        part = load_file(dest / name)
        assert len(part) == 1 or sum(t.nbytes for t in part.values()) <= 100_000
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in converted.values())
    record = json.loads((dest / prepare.CONVERTED).read_text())
    assert record["outputs"] == {n: sha256(dest / n) for n in names} and set(record["sources"]) == \
        {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"}
    assert [p.name for p in dest.parent.iterdir()] == ["mpt-st"]     # no temp folder left
    assert prepare.main([f"--model={src}", "--convert=true", f"--out={dest}"]) == 0    # once
    assert "converted before" in capsys.readouterr().err
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("not ours")
    assert prepare.main([f"--model={src}", "--convert=true", f"--out={tmp_path / 'theirs'}"]) == 1
    assert "--force=true" in capsys.readouterr().err and (tmp_path / "theirs" / "notes.txt").exists()
    assert prepare.main([f"--model={src}", f"--out={dest}"]) == 1    # --out alone does not copy a folder
    assert "--convert=true" in capsys.readouterr().err


@pytest.mark.parametrize("into", ["in place", "new folder"])
def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, into):
    import safetensors.torch
    src, dest = tmp_path / "mpt", tmp_path / "dest"
    pickle_mpt(src)
    listing = lambda: sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    before, real_save, calls = listing(), safetensors.torch.save_file, []

    def save_then_die(state, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt  # as if killed while writing the second shard
        real_save(state, path, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare.convert_pickles(src, None if into == "in place" else dest, max_shard=100_000)
    assert len(calls) == 2 and listing() == before


class Payload:
    """Unpickling this runs os.system: what a malicious checkpoint does."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_needs_code_is_refused_and_runs_nothing(tmp_path, capsys):
    import pickle
    folder = tmp_path / "evil"
    pickle_mpt(folder)
    bin_file, marker = folder / "pytorch_model.bin", tmp_path / "ran"
    before = sorted(p.name for p in folder.iterdir())
    torch.save({"transformer.wte.weight": torch.zeros(2), "x": Payload(marker)}, bin_file)
    assert prepare.main([f"--model={folder}", "--convert=true"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{bin_file}: refused: it needs code execution to load" in err and "posix.system" in err, err
    with open(bin_file, "wb") as f:          # a plain pickle (no zip container) asking for the same
        pickle.dump({"w": Payload(marker)}, f)
    with pytest.raises(prepare.PrepareError, match="pytorch_model.bin: refused: it needs code execution"):
        prepare.convert_pickles(folder)
    assert not marker.exists()               # torch.load(weights_only=True) never called os.system
    for content, message in [({"transformer.wte.weight": torch.zeros(2), "step": 3}, "entry 'step' is not a named "
                                                                                     "tensor"),
                             ({"state_dict": {"w": torch.zeros(2)}}, "entry 'state_dict' is not a named tensor"),
                             ([torch.zeros(2)], "not a state dict of named tensors")]:
        torch.save(content, bin_file)
        with pytest.raises(prepare.PrepareError, match=f"pytorch_model.bin: {message}"):
            prepare.convert_pickles(folder)
    bin_file.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(prepare.PrepareError, match="pytorch_model.bin: not a checkpoint torch.load can read"):
        prepare.convert_pickles(folder)
    assert sorted(p.name for p in folder.iterdir()) == before     # nothing written, no temp folder left


def test_untie_keeps_values_and_drops_only_an_identical_lm_head():
    w = torch.arange(12.).reshape(3, 4)
    state, dropped = prepare.untie({"lm_head.weight": w, "embed.weight": w, "view": w[1:], "t": w.T,
                                    "other": torch.ones(2)})
    assert dropped == {"lm_head.weight": "embed.weight"} and set(state) == {"embed.weight", "view", "t", "other"}
    assert torch.equal(state["view"], w[1:]) and torch.equal(state["t"], w.T) and state["t"].is_contiguous()
    assert state["view"].untyped_storage().data_ptr() != w.untyped_storage().data_ptr()   # cloned apart
    state, dropped = prepare.untie({"lm_head.weight": w, "head_view": w[:2]})     # not identical: both kept
    assert dropped == {} and set(state) == {"lm_head.weight", "head_view"}


def test_hub_repo_with_only_pickles_is_downloaded_and_converted(tmp_path, monkeypatch, capsys):
    source = tmp_path / "hub_repo"
    pickle_mpt(source)
    (source / "README.md").write_text("readme")
    calls = _fake_hub(monkeypatch, source)
    out = tmp_path / "models" / "mpt"
    assert prepare.main(["--model=mosaicml/mpt-tiny", f"--out={out}"]) == 0
    assert [c["allow_patterns"] for c in calls] == [prepare.HUB_PATTERNS + prepare.PICKLE_PATTERNS]  # decided first
    assert sorted(p.name for p in out.iterdir()) == ["config.json", prepare.CONVERTED, "model.safetensors",
                                                     "tokenizer.json"]      # a download's .bin: deleted
    assert "converted 1 pickle shard(s)" in capsys.readouterr().err
    record = json.loads((out / prepare.CONVERTED).read_text())
    from lab.results import sha256
    assert record["sources"] == {"pytorch_model.bin": sha256(source / "pytorch_model.bin")} and \
        record["sources_deleted"]
    assert prepare.main(["--model=mosaicml/mpt-tiny", f"--out={out}"]) == 0 and len(calls) == 1   # no second fetch


def test_hub_repo_without_weights_is_refused_before_downloading(tmp_path, monkeypatch, capsys):
    source = tmp_path / "hub_repo"
    source.mkdir()
    (source / "config.json").write_text("{}")
    calls = _fake_hub(monkeypatch, source)
    assert prepare.main(["--model=org/empty", f"--out={tmp_path / 'm'}"]) == 1
    assert "neither *.safetensors nor pytorch_model*.bin" in capsys.readouterr().err and calls == []


def test_hub_file_list_offline_is_the_same_clear_error(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import errors
    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: downloads.append(a))
    for exc in [errors.LocalEntryNotFoundError("no cache"), ConnectionError("Name or service not known")]:
        def fail(*args, exc=exc, **kw):
            raise exc
        monkeypatch.setattr(huggingface_hub, "repo_info", fail)
        assert prepare.main(["--model=mosaicml/mpt-7b", f"--out={tmp_path / 'm'}"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and "could not download mosaicml/mpt-7b" in err and "unreachable" in err
        assert "HF_ENDPOINT" in err and "--model=/path/to/folder" in err
    assert downloads == []
