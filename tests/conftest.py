"""Shared test fixtures: tiny random checkpoints written in the Hugging Face layout by `transformers` itself.

Tests never read the shared data folder or the network; they make what they need.
"""
import contextlib
from http.server import BaseHTTPRequestHandler
import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(2)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


# model_type -> transformers' (config class, model class); the tiny shape below fits all of them.
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
              "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
              "phi3": ("Phi3Config", "Phi3ForCausalLM"), "mpt": ("MptConfig", "MptForCausalLM")}


def make_hf_model(model_type="llama", seed=0, **overrides):
    """A random transformers model (fp32, eval mode) of the tiny shape, with `overrides` applied to its config.
    MPT names its config keys its own way (d_model, n_heads, ...): the same shape, in its names."""
    import transformers
    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if model_type == "mpt":
        kw = dict(vocab_size=kw["vocab_size"], d_model=kw["hidden_size"], n_heads=kw["num_attention_heads"],
                  n_layers=kw["num_hidden_layers"], max_seq_len=kw["max_position_embeddings"],
                  layer_norm_epsilon=kw["rms_norm_eps"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  **{k: v for k, v in overrides.items() if k not in TINY})
    config_class, model_class = (getattr(transformers, c) for c in HF_CLASSES[model_type])
    model = model_class(config_class(**kw))
    # Norm weights are ones (Gemma: zeros) and biases zeros at init; randomize them so a bug there cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    return model.eval()


def save_hf_model(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def default_model(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct in HF layout: models/ if already converted, else converted once here."""
    from lab import prepare
    if all((prepare.default_model_dir() / f).is_file() for f in prepare.DEFAULT_FILES):
        return prepare.default_model_dir()
    return prepare.ensure_default_model(tmp_path_factory.mktemp("models") / prepare.DEFAULT_NAME)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine its waits make each op ~10x slower.
    Training tests use it (pytestmark = pytest.mark.usefixtures("one_thread"))."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_llama(tmp_path):
    """(folder, hf_model) for a tiny GQA Llama with untied embeddings."""
    hf = make_hf_model("llama")
    return save_hf_model(hf, tmp_path / "tiny-llama"), hf


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s (still part of `make test`)")


def corpus(n=2000, seed=0):
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over a lazy dog What is capital of France Paris Lyon answer yes no I think "
             "you are right wrong sure Are agree disagree opinion question ( ) (A) (B) [INST] [/INST] <<SYS>> "
             "hello world 12 345 café naïve 東京 don't that's ? . , ! : \n").split(" ")
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def make_bpe_tokenizer(folder: Path, chat_template: str = "", vocab_size: int = 400, special_tokens=()) -> Path:
    """A byte-level BPE tokenizer.json like SmolLM2's (digits split, then byte-level), trained on a toy corpus;
    special_tokens: more single-id tokens (another chat format's turn markers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        special_tokens=list(dict.fromkeys(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *special_tokens])),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": chat_template,
        "chat_format": "chatml"}))
    return folder


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    """(folder, hf_model): a tiny random Llama with a real byte-level BPE tokenizer and the chatml format."""
    hf = make_hf_model("llama", vocab_size=400, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    folder = save_hf_model(hf, tmp_path_factory.mktemp("tiny-chat"))
    make_bpe_tokenizer(folder)
    return folder, hf


def make_sp_tokenizer(folder: Path, vocab_size: int = 450) -> Path:
    """A sentencepiece tokenizer.model with Llama-2's settings (BPE, byte fallback, identity normalization, dummy
    prefix, whitespace kept), trained on the toy corpus. The caller writes tokenizer_config.json."""
    import sentencepiece as spm
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    return folder


def disk_full_on_link(monkeypatch, k: int):
    """Make the k-th os.link from now on fail with ENOSPC, as a disk that fills while a run publishes its files."""
    import errno
    import os
    real, calls = os.link, []

    def link(src, dst):
        calls.append(dst)
        if len(calls) == k:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(os, "link", link)


class EndpointHandler(BaseHTTPRequestHandler):
    """A fake endpoint's request handler: reply() sends a payload with its length; no request log on stderr."""

    def reply(self, code, payload, headers=None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def local_server(handler, key_env: str, key: str, monkeypatch, **state):
    """An HTTP server on 127.0.0.1 (a free port) answering with `handler`, for the tests of the endpoint clients:
    the key in the environment variable key_env, proxies bypassed; yields (server, its /v1 URL); `state` becomes the
    server's attributes (what the handler records or is told to do). Shut down when the with-block ends."""
    import threading
    from http.server import ThreadingHTTPServer
    monkeypatch.setenv(key_env, key)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in state.items():
        setattr(server, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
