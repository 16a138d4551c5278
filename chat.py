"""Chat: text -> token ids. Tokenizers and chat formats (the dataset readers are in data.py).

Two rules keep what the model sees exact:
1. A chat format is a plain function returning the very string the model's official jinja `chat_template` renders,
   BOS included as text where the template writes it (tests/test_chat.py renders the verbatim templates and compares).
   `plain`, for base models, has no template: its rule is in its docstring.
2. `Tokenizer.encode` turns that string into the ids Hugging Face would: special-token strings inside the text
   (`<s>`, `<|im_start|>`, ...) become their single ids, and nothing is added unless asked (`bos=True`).
"""
import functools
import json
import re
import warnings
from pathlib import Path

# Strings that end an assistant turn in the families we support; generation stops on any of them present.
END_OF_TURN = ("</s>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or as {"content": "<s>", "lstrip": ...}."""
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """Encode/decode with either backend: `tokenizers` (tokenizer.json) or `sentencepiece` (tokenizer.model).

    Use `load_tokenizer(folder)`. Chat strings already hold their BOS text, so encode them with bos=False.
    """

    def __init__(self, folder: Path, hf=None, sp=None):
        self.hf, self.sp = hf, sp  # exactly one is set
        cfg = _read_json(folder / "tokenizer_config.json")
        configs = [_read_json(folder / "generation_config.json"), _read_json(folder / "config.json")]
        if sp is not None:
            self._init_sentencepiece(folder, cfg)

        def special_id(name: str) -> int | None:
            """`<name>_token` of tokenizer_config, else `<name>_token_id` of generation_config/config, else spm's."""
            tok = _content(cfg.get(f"{name}_token"))
            candidates = [self._id_of(tok) if tok else None] + [c.get(f"{name}_token_id") for c in configs]
            candidates += [getattr(sp, f"{name}_id")()] if sp is not None else []  # -1 when the model has none
            for i in candidates:
                i = i[0] if isinstance(i, list) and i else i
                if isinstance(i, int) and i >= 0:
                    return i
            return None

        self.bos_id, self.eos_id, pad = special_id("bos"), special_id("eos"), special_id("pad")
        # Whether the tokenizer starts ordinary text with BOS (HF's add_special_tokens=True): tokenizer.json's
        # post-processor says so, or tokenizer_config's add_bos_token (sentencepiece Llama: yes unless it says no).
        if hf is not None:
            self.adds_bos = self.bos_id is not None and hf.encode("a").ids[:1] == [self.bos_id]
        else:
            self.adds_bos = self.bos_id is not None and cfg.get("add_bos_token", True) is not False
        self.pad_id = pad if pad is not None else self.eos_id  # Llama-2 has no pad; padding is masked anyway
        # Stop ids: eos, the end-of-turn tokens present, and every eos id the configs list (Llama-3-Instruct's
        # generation_config lists both <|end_of_text|> and <|eot_id|>).
        self.eos_ids = {self.eos_id} | {self._id_of(s) for s in END_OF_TURN}
        for v in (c.get("eos_token_id") for c in configs):
            self.eos_ids |= set(v) if isinstance(v, list) else {v}
        self.eos_ids -= {None}

    def _init_sentencepiece(self, folder: Path, cfg: dict):
        # The strings split out of the text before sentencepiece sees it, as HF's slow tokenizer does: the model's
        # own control/unknown pieces (<s>, </s>, <unk>) plus tokenizer_config's added and special tokens.
        sp = self.sp
        n = sp.get_piece_size()
        self.special = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        self.special |= {_content(tok): int(i) for i, tok in cfg.get("added_tokens_decoder", {}).items()}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            tok = _content(cfg.get(key))
            if tok and sp.id_to_piece(sp.piece_to_id(tok)) == tok:
                self.special.setdefault(tok, sp.piece_to_id(tok))
        self.special_by_id = {i: s for s, i in self.special.items()}
        # Longest first, so that a special string wins over a shorter one that is its prefix.
        self.special_re = re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special, key=len)[::-1]) + ")")
        if cfg.get("legacy") is False:
            warnings.warn(f"{folder}: tokenizer_config.json says legacy=false, but tokenizer.model is encoded the "
                          "legacy way (as Meta's code and HF's tokenizer.json do): every chunk between special tokens "
                          "gets sentencepiece's dummy-prefix '▁'")

    def _id_of(self, token: str) -> int | None:
        if self.hf is not None:
            return self.hf.token_to_id(token)
        return self.special.get(token)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        if self.hf is not None:
            # add_special_tokens=False: no post-processor BOS, like HF on an apply_chat_template string.
            ids = self.hf.encode(text, add_special_tokens=False).ids
        else:
            # re.split with a capture group alternates text, special, text, ...: odd indices are special tokens.
            # Each text chunk is encoded on its own, so each gets sentencepiece's dummy-prefix "▁": this is HF's
            # legacy=True behaviour and Meta's reference code ("<s>[INST]" -> <s>, "▁[", "INST", "]").
            ids = []
            for k, chunk in enumerate(self.special_re.split(text)):
                if k % 2:
                    ids.append(self.special[chunk])
                elif chunk:
                    ids += self.sp.encode(chunk)
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=skip_special)
        # sentencepiece drops control ids silently, so special ids are written here; each run of ordinary ids is
        # decoded alone, which removes that run's dummy-prefix space: decode(encode(s)) == s.
        out, run = [], []
        for i in ids + [None]:
            if i is not None and i not in self.special_by_id:
                run.append(i)
                continue
            out.append(self.sp.decode(run) if run else "")
            run = []
            if i is not None and not skip_special:
                out.append(self.special_by_id[i])
        return "".join(out)

    def token_str(self, i: int) -> str:
        """The raw vocabulary piece ("ĠA" byte-level, "▁A" sentencepiece): find answer letters by string."""
        if self.hf is not None:
            return self.hf.id_to_token(int(i))
        return self.special_by_id.get(int(i)) or self.sp.id_to_piece(int(i))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (an embedding may be padded larger)."""
        if self.hf is not None:
            return self.hf.get_vocab_size(with_added_tokens=True)
        return max(self.sp.get_piece_size(), max(self.special_by_id, default=-1) + 1)

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(folder) -> Tokenizer:
    """tokenizer.json (HF's fast tokenizer, exactly) if present, else tokenizer.model (sentencepiece, Llama-2)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        import tokenizers
        return Tokenizer(folder, hf=tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
    if (folder / "tokenizer.model").is_file():
        import sentencepiece
        return Tokenizer(folder, sp=sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")))
    raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model here"
                            + ("" if folder.is_dir() else " (the folder does not exist)"))


# ---------------------------------------------------------------------------------------------------------------
# Chat formats: fmt(messages, add_generation_prompt=True, prefill="") -> str, one per official template.
# `prefill` opens the assistant turn and writes the given text verbatim after the template's opening of an assistant
# message (" " for llama2/mistral, the generation prompt for the others), so that fmt(m, prefill="(") is a prefix of
# fmt(m + [assistant "(A) ..."]): what transformers' continue_final_message renders. It implies the generation prompt.
# (qwen3's opening of a final assistant message is not its generation prompt: see _qwen3.)

SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN2_5_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"


def _turns(messages: list[dict], name: str, alternate: bool, prefill: str) -> tuple[str | None, list[dict]]:
    """Check a conversation; return (system prompt or None, the other messages)."""
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"{name}: message {i} must be {{'role': system|user|assistant, 'content': str}}: {m!r}")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"{name}: a system message may only come first (message {i} is one)")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    if not turns:
        raise ValueError(f"{name}: the conversation has no user or assistant message")
    if alternate:  # the official template raises on this; say where
        for i, m in enumerate(turns):
            if m["role"] != ("user", "assistant")[i % 2]:
                raise ValueError(f"{name}: roles must alternate user/assistant/user/... after an optional system "
                                 f"message, but turn {i} is {m['role']!r}")
    if prefill and turns[-1]["role"] == "assistant":
        raise ValueError(f"{name}: prefill opens an assistant turn, but the last message already is one")
    return system, turns


def llama2(messages, add_generation_prompt=True, prefill=""):
    """Llama-2-chat. System folded into the first user turn; contents stripped. The template has no generation
    prompt (a prompt simply ends with " [/INST]"), so add_generation_prompt changes nothing."""
    system, turns = _turns(messages, "llama2", alternate=True, prefill=prefill)
    out = ""
    for i, m in enumerate(turns):
        content = m["content"] if i or system is None else f"<<SYS>>\n{system}\n<</SYS>>\n\n{m['content']}"
        out += f"<s>[INST] {content.strip()} [/INST]" if m["role"] == "user" else f" {content.strip()} </s>"
    return out + (f" {prefill}" if prefill else "")


def mistral(messages, add_generation_prompt=True, prefill=""):
    """Mistral-7B-Instruct-v0.2 as its template reads since 2024: system prepended to the first user message, a
    space before each [INST] and each answer (older copies had neither and rejected system). No generation prompt."""
    system, turns = _turns(messages, "mistral", alternate=True, prefill=prefill)
    out = "<s>"
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = m["content"] if i or system is None else f"{system}\n\n{m['content']}"
            out += f" [INST] {content} [/INST]"
        else:
            out += f" {m['content']}</s>"
    return out + (f" {prefill}" if prefill else "")


def zephyr(messages, add_generation_prompt=True, prefill=""):
    """zephyr-7b-beta: <|role|>\\ncontent</s>\\n per message."""
    _turns(messages, "zephyr", alternate=False, prefill=prefill)
    out = "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages)
    return out + ("<|assistant|>\n" if add_generation_prompt or prefill else "") + prefill


def _chatml(messages, add_generation_prompt, prefill, default_system: str, name: str) -> str:
    system, _ = _turns(messages, name, alternate=False, prefill=prefill)
    out = "" if system is not None else f"<|im_start|>system\n{default_system}<|im_end|>\n"
    out += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + ("<|im_start|>assistant\n" if add_generation_prompt or prefill else "") + prefill


def chatml(messages, add_generation_prompt=True, prefill=""):
    """ChatML as SmolLM2-Instruct's template writes it: without a system message it inserts its default one."""
    return _chatml(messages, add_generation_prompt, prefill, SMOLLM2_DEFAULT_SYSTEM, "chatml")


def qwen2_5(messages, add_generation_prompt=True, prefill=""):
    """Qwen2.5-Instruct: SmolLM2's ChatML with Qwen's default system prompt (the template without tools)."""
    return _chatml(messages, add_generation_prompt, prefill, QWEN2_5_DEFAULT_SYSTEM, "qwen2_5")


def llama3(messages, add_generation_prompt=True, prefill=""):
    """Meta-Llama-3-Instruct: header per message, contents stripped, BOS before the first."""
    _turns(messages, "llama3", alternate=False, prefill=prefill)
    out = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages)
    gen = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return out + (gen if add_generation_prompt or prefill else "") + prefill


def _qwen3(messages, add_generation_prompt, prefill, thinking: bool, name: str) -> str:
    """Qwen3's hybrid-thinking template (Qwen3-8B's, and Qwen3-0.6B's earlier revision of it; without tools). No
    default system prompt.

    An assistant message after the last user message is written with its reasoning in a think block, an empty one
    (QWEN3_EMPTY_THINK) when it has none and is the final message; earlier answers lose their <think>...</think>.
    So a prefilled answer follows the empty think block whether thinking is on or off: fmt(m, prefill="(") ends
    "<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n(", a prefix of fmt(m + [assistant "(A) ..."],
    add_generation_prompt=False), which is what continue_final_message renders; the letter is read after the
    block. Only the bare generation prompt differs: thinking on, "<|im_start|>assistant\\n" and the model writes its
    own <think>; off (enable_thinking=False), the empty block is part of the prompt. fmt(m) is a prefix of
    fmt(m, prefill=p) in both."""
    system, _ = _turns(messages, name, alternate=False, prefill=prefill)
    out = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
    # The template's "last query": the last user message that is not a wrapped tool response.
    queries = [i for i, m in enumerate(messages) if m["role"] == "user"
               and not (m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>"))]
    last_query = queries[-1] if queries else len(messages) - 1
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] == "user":
            out += f"<|im_start|>user\n{content}<|im_end|>\n"
        elif m["role"] == "assistant":
            reasoning = ""
            if "</think>" in content:  # the template moves "<think>r</think>a" into reasoning r and answer a
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            if i > last_query and (i == len(messages) - 1 or reasoning):
                reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
                out += f"<|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{content}<|im_end|>\n"
            else:
                out += f"<|im_start|>assistant\n{content}<|im_end|>\n"
    if prefill:
        return out + "<|im_start|>assistant\n" + QWEN3_EMPTY_THINK + prefill
    return out + ("<|im_start|>assistant\n" + ("" if thinking else QWEN3_EMPTY_THINK) if add_generation_prompt else "")


def qwen3(messages, add_generation_prompt=True, prefill=""):
    """Qwen3 with thinking on (the template's default): the generation prompt leaves the model to think first."""
    return _qwen3(messages, add_generation_prompt, prefill, thinking=True, name="qwen3")


def qwen3_nothink(messages, add_generation_prompt=True, prefill=""):
    """Qwen3 with enable_thinking=False: the generation prompt ends with an empty think block."""
    return _qwen3(messages, add_generation_prompt, prefill, thinking=False, name="qwen3_nothink")


def gemma(messages, add_generation_prompt=True, prefill=""):
    """Gemma-3 (and Gemma-2): <bos> as text, "model" for the assistant, contents stripped, roles alternating.

    No system role: Gemma-3's template writes a system message at the start of the first user turn, followed by
    "\\n\\n" (unstripped). Gemma-2's template renders every other conversation to the same string but raises on a
    system message; here it is folded Gemma-3's way for both (Google's advice for Gemma: system instructions go in
    the first user turn), so --system works with Gemma-2 too."""
    system, turns = _turns(messages, "gemma", alternate=True, prefill=prefill)
    out = "<bos>"
    for i, m in enumerate(turns):
        prefix = f"{system}\n\n" if i == 0 and system is not None else ""
        role = "model" if m["role"] == "assistant" else "user"
        out += f"<start_of_turn>{role}\n{prefix}{m['content'].strip()}<end_of_turn>\n"
    return out + ("<start_of_turn>model\n" if add_generation_prompt or prefill else "") + prefill


def _phi3(messages, add_generation_prompt, prefill, keep_empty_system: bool, name: str) -> str:
    _turns(messages, name, alternate=False, prefill=prefill)
    out = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages
                  if m["role"] != "system" or m["content"] or keep_empty_system)
    if add_generation_prompt or prefill:
        return out + "<|assistant|>\n" + prefill
    return out + "<|endoftext|>"  # the template closes a conversation without generation prompt with its eos


def phi3(messages, add_generation_prompt=True, prefill=""):
    """Phi-3-mini-instruct: <|role|>\\ncontent<|end|>\\n per message, no BOS text, eos after a conversation without
    generation prompt (an older revision, in its first weeks, wrote <s> and dropped system messages)."""
    return _phi3(messages, add_generation_prompt, prefill, keep_empty_system=True, name="phi3")


def phi3_5(messages, add_generation_prompt=True, prefill=""):
    """Phi-3.5-mini-instruct: Phi-3's, except that an empty system message is left out."""
    return _phi3(messages, add_generation_prompt, prefill, keep_empty_system=False, name="phi3_5")


def plain(messages, add_generation_prompt=True, prefill=""):
    """No template, for base models: the contents (the system message's included, empty ones left out) joined by a
    blank line, "\\n\\n"; the generation prompt is one more "\\n\\n", so the answer starts a new paragraph. No role
    names, no BOS: a session adds the tokenizer's BOS where the tokenizer starts text with one (with_bos)."""
    _turns(messages, "plain", alternate=False, prefill=prefill)
    out = "\n\n".join(m["content"] for m in messages if m["content"])
    return out + ("\n\n" if add_generation_prompt or prefill else "") + prefill


CHAT_FORMATS = {f.__name__: f for f in (llama2, mistral, zephyr, chatml, llama3, qwen2_5, qwen3, qwen3_nothink,
                                          gemma, phi3, phi3_5, plain)}
# Checked in order, the more specific first: Qwen's ChatML templates are told apart from SmolLM2's by what they add
# (enable_thinking, Qwen's default system prompt); Phi-3 writes <|user|> like zephyr, but ends turns with <|end|>;
# a Llama-2 template also contains "[INST]".
TEMPLATE_SIGNATURES = [("enable_thinking", "qwen3"), (QWEN2_5_DEFAULT_SYSTEM, "qwen2_5"),
                       (SMOLLM2_DEFAULT_SYSTEM, "chatml"), ("<|start_header_id|>", "llama3"),
                       ("<start_of_turn>", "gemma"), ("'system' and message['content']", "phi3_5"),
                       ("<|end|>", "phi3"), ("<|user|>", "zephyr"), ("<<SYS>>", "llama2"), ("[INST]", "mistral")]
# Without a template: Llama-3 and SmolLM2 ship one, so a bare Llama-family folder is most likely Llama-2 (results
# depend on this guess: kept). The families added since ship a template with every chat model, so a folder of theirs
# without one is a base model: plain text.
MODEL_TYPE_FORMATS = {"llama": "llama2", "mistral": "mistral", "qwen2": "plain", "qwen3": "plain", "gemma2": "plain",
                      "gemma3_text": "plain", "phi3": "plain", "mpt": "plain"}


def with_system(fmt, system: str):
    """fmt that gives every conversation without a system message `system` as its first message ("" = fmt itself).

    How the system message is written is the format's own business (Gemma folds it into the first user turn); a
    conversation that has its own keeps it. The wrapper keeps fmt's __name__, the format name results record."""
    if not system:
        return fmt

    @functools.wraps(fmt)
    def fmt_with_system(messages, add_generation_prompt=True, prefill=""):
        if not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": system}, *messages]
        return fmt(messages, add_generation_prompt, prefill)
    return fmt_with_system


def with_bos(fmt, tok: Tokenizer):
    """fmt whose strings start with the tokenizer's BOS text where the tokenizer starts ordinary text with one: a base
    model read through `plain` sees its text as its tokenizer encodes it (Llama, Gemma: after BOS; Qwen, MPT: not)."""
    if not tok.adds_bos:
        return fmt
    bos = tok.token_str(tok.bos_id)

    @functools.wraps(fmt)
    def fmt_with_bos(messages, add_generation_prompt=True, prefill=""):
        return bos + fmt(messages, add_generation_prompt, prefill)
    return fmt_with_bos


def get_chat_format(name: str):
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {name!r}; known: {', '.join(CHAT_FORMATS)}")
    return CHAT_FORMATS[name]


def detect_chat_format(folder) -> str:
    """tokenizer_config's "chat_format" key, else the chat_template's signature (TEMPLATE_SIGNATURES), else
    config.json's model_type (MODEL_TYPE_FORMATS): without any template, llama -> llama2 and mistral -> mistral as
    before, and the families added since (qwen2, qwen3, gemma2, gemma3_text, phi3, mpt) -> plain, a base model.

    A template matching no signature is a chat model we do not know: its model_type's format is guessed only for
    llama/mistral (as before), never "plain", and never for a ChatML template (<|im_start|>), whose default system
    prompt and think block change the string (Qwen2-Instruct, QwQ, Qwen3-2507, SmolLM v1): pass --chat_format."""
    folder = Path(folder)
    cfg = _read_json(folder / "tokenizer_config.json")
    if "chat_format" in cfg:
        get_chat_format(cfg["chat_format"])
        return cfg["chat_format"]
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():  # where newer transformers saves it
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for signature, name in TEMPLATE_SIGNATURES:
        if template and signature in template:
            return name
    model_type = _read_json(folder / "config.json").get("model_type")
    name = MODEL_TYPE_FORMATS.get(model_type)
    if name and not (template and (name == "plain" or "<|im_start|>" in template)):
        return name
    why = "a chat_template of no known format" if template else "no chat_template"
    raise ValueError(f"{folder}: cannot tell the chat format ({why}, model_type {model_type!r}); "
                     f"pass --chat_format=NAME, NAME one of {', '.join(CHAT_FORMATS)} (plain: a base model's text)")
