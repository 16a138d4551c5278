"""The scripts end to end on a tiny random chat model of every family, each in its own chat format: evaluation
(scored and generated), steering vectors and a sweep, SFT and DPO steps. What they compute is checked elsewhere;
here, that nothing in the path from the command line to the results file assumes Llama."""
import json

import pytest

import evaluate as ev
import train
from conftest import make_bpe_tokenizer, make_hf_model, save_hf_model
from studies import steering, tactics

# model_type -> (its chat format, the turn tokens that format writes)
CHATS = {"qwen2": ("qwen2_5", ["<|im_start|>", "<|im_end|>"]),
         "qwen3": ("qwen3_nothink", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]),
         "gemma2": ("gemma", ["<bos>", "<start_of_turn>", "<end_of_turn>"]),
         "gemma3_text": ("gemma", ["<bos>", "<start_of_turn>", "<end_of_turn>"]),
         "phi3": ("phi3", ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]),
         "mpt": ("plain", [])}


@pytest.fixture(scope="module", params=list(CHATS))
def family(request, tmp_path_factory):
    mt = request.param
    hf = make_hf_model(mt, vocab_size=400, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    folder = save_hf_model(hf, tmp_path_factory.mktemp(mt))
    make_bpe_tokenizer(folder, special_tokens=CHATS[mt][1])
    return mt, folder


@pytest.mark.slow
def test_every_script_runs_on_every_family(family, tmp_path):
    mt, folder = family
    fmt = CHATS[mt][0]
    c = [f"--model={folder}", f"--out={tmp_path}", f"--chat_format={fmt}"]
    ev.main(c + ["--task=opinion", "--n=4"])
    ev.main(c + ["--task=are_you_sure", "--n=2", "--max_new_tokens=4"])
    steering.main(["vectors"] + c + ["--n=16"])
    vector = sorted(tmp_path.glob("vectors-*[0-9].safetensors"))[-1]
    steering.main(["steer", f"--vector={vector}"] + c + ["--n_test=6", "--layers=1", "--mults=-1,1", "--n_neutral=2",
                                                         "--n_capability=2"])
    tactics.main(["--data=builtin", "--n=4", f"--out={tmp_path}"])
    sft = sorted(tmp_path.glob("tactics-*.sft-train.jsonl"))[0]
    dpo = sorted(tmp_path.glob("tactics-*.dpo-train.jsonl"))[0]
    train.main(["--mode=sft", f"--data={sft}", "--max_steps=2", "--run=sft"] + c)
    train.main(["--mode=dpo", f"--data={dpo}", "--max_steps=2", "--run=dpo"] + c)
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*.json") if not p.name.endswith(".peft.json")]
    assert results and all(r.get("provenance", {}).get("chat_format", fmt) == fmt for r in results)
