"""A session: the model under test with its tokenizer, chat format and origin, and the judge, built in one place from
the shared model options (lab.args.ModelOptions) and handed to every study.

    s = open_session(cfg)                  # cfg: any config that extends ModelOptions
    logits = s.model(torch.tensor([s.tok.encode(s.fmt(user("Hi")))]))
"""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chat import Tokenizer, detect_chat_format, get_chat_format, load_tokenizer, with_bos, with_system
from lab import dist
from lab.prepare import ensure_default_model
from lora import load_adapter
from model import Transformer, load
from runtime import accelerate


@dataclass
class Session:
    model: Transformer            # or its compiled wrapper (ModelOptions.compile), which passes attributes through
    tok: Tokenizer
    fmt: Callable                 # chat format: messages -> the string the official template renders (chat.py),
                                  # with ModelOptions.system as the system message of every chat that has none
    fmt_name: str
    model_dir: Path
    judge: "Session | None" = None    # asked for one-word verdicts (score.judge_words); None = judge-free scoring


def open_model(folder, dtype: str, device: str, prepack: bool, compile: bool, chat_format: str = "",
               system: str = "", adapter: str = "", cross_model: bool = False) -> Session:
    """One model folder -> a Session without a judge, run the fastest way this machine knows (runtime.accelerate).
    `system`: the system prompt every chat built with the session's fmt gets when it has none ("" = none).
    `adapter`: a save_adapter file applied unmerged (lora.load_adapter: refused if trained on another base model,
    unless cross_model), so lora_disabled gives the base model in the same session."""
    folder = Path(folder)
    model = load(folder, dtype=dtype, device=device)
    if adapter:
        load_adapter(model, adapter, cross_model)
    model = accelerate(model, prepack=prepack, compile=compile)
    name, tok = chat_format or detect_chat_format(folder), load_tokenizer(folder)
    return Session(model, tok, with_system(session_format(name, tok), system), name, folder)


def session_format(name: str, tok) -> callable:
    """The chat format `name` as a session applies it: `plain` text after the tokenizer's BOS where it adds one."""
    return with_bos(get_chat_format(name), tok) if name == "plain" else get_chat_format(name)


def open_session(cfg) -> Session:
    """The session a config asks for: cfg.model ("" = the embedded default, converted on first use) with cfg.dtype,
    cfg.device, cfg.chat_format, cfg.system, cfg.prepack and cfg.compile (lab.args.ModelOptions), and cfg.judge where
    the config has one: "" = none, "self" = the model under test, or another model folder. The system prompt
    conditions the model under test only: a judge is asked without it."""
    if not cfg.model and not dist.is_main():
        dist.barrier()            # under torchrun rank 0 converts the default model once, before the others look
    model_dir = Path(cfg.model) if cfg.model else ensure_default_model()
    if not cfg.model and dist.is_main():
        dist.barrier()
    t0 = time.perf_counter()
    adapter = getattr(cfg, "adapter", "")
    s = open_model(model_dir, cfg.dtype, cfg.device, cfg.prepack, cfg.compile, cfg.chat_format, cfg.system,
                   adapter, getattr(cfg, "cross_model", False))
    n_params = sum(p.numel() for p in s.model.parameters())
    print(f"model  {model_dir}  ({s.model.config.model_type}, {n_params / 1e6:.0f}M parameters, {cfg.dtype}, "
          f"chat format {s.fmt_name}, loaded in {time.perf_counter() - t0:.1f} s)"
          + (f"\nadapter {adapter}" if adapter else "") + (f"\nsystem {cfg.system!r}" if cfg.system else ""))
    judge = getattr(cfg, "judge", "")
    if judge == "self":
        s.judge = Session(s.model, s.tok, session_format(s.fmt_name, s.tok), s.fmt_name, s.model_dir)
    elif judge:
        s.judge = open_model(judge, cfg.dtype, cfg.device, cfg.prepack, compile=False)   # a few short questions
    return s
