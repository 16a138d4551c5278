"""A session: the model under test with its tokenizer, chat format and origin, and the judge, built in one place from
the shared model options (lab.args.ModelOptions) and handed to every study.

    s = open_session(cfg)                  # cfg: any config that extends ModelOptions
    logits = s.model(torch.tensor([s.tok.encode(s.fmt(user("Hi")))]))
"""
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from chat import Tokenizer, detect_chat_format, get_chat_format, load_tokenizer, with_bos, with_system
from lab import dist
from lab.args import read_system
from lab.judge import Endpoint, Judge, is_url
from lab.prepare import ensure_default_model
from lab.results import model_id, sha256
from lora import load_adapter
from model import Transformer, load
from runtime import accelerate
from score import local_ask


@dataclass
class Session:
    model: Transformer            # or its compiled wrapper (ModelOptions.compile), which passes attributes through
    tok: Tokenizer
    fmt: Callable                 # chat format: messages -> the string the official template renders (chat.py),
                                  # with ModelOptions.system as the system message of every chat that has none
    fmt_name: str
    model_dir: Path
    judge: Judge | None = None    # grades generated text by a rubric (lab/judge.py); None = judge-free scoring
    system: str = ""              # the system prompt fmt gives every chat that has none (read from system_file)
    system_file: str = ""


def with_system_prompt(s: Session, system: str) -> Session:
    """The same model and judge, every chat given `system` instead ("" = none): one condition of a system-prompt
    sweep."""
    return replace(s, fmt=with_system(session_format(s.fmt_name, s.tok), system), system=system, system_file="")


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
    system, system_file = read_system(cfg.system)
    s = open_model(model_dir, cfg.dtype, cfg.device, cfg.prepack, cfg.compile, cfg.chat_format, system,
                   adapter, getattr(cfg, "cross_model", False))
    s.system, s.system_file = system, system_file
    n_params = sum(p.numel() for p in s.model.parameters())
    print(f"model  {model_dir}  ({s.model.config.model_type}, {n_params / 1e6:.0f}M parameters, {cfg.dtype}, "
          f"chat format {s.fmt_name}, loaded in {time.perf_counter() - t0:.1f} s)"
          + (f"\nadapter {adapter}" if adapter else "")
          + (f"\nsystem {system!r}" + (f" (from {system_file})" if system_file else "") if system else ""))
    if getattr(cfg, "judge", ""):
        s.judge = open_judge(cfg, s)
    return s


def open_judge(cfg, s: Session) -> Judge:
    """The judge cfg.judge names (lab.args.JudgeOptions): "self" = the model under test (asked unhooked, without its
    --system), a checkpoint folder, or an OpenAI-compatible endpoint URL. Its identity, which keys the cache and is
    recorded in results, holds what changes its replies: the model's identity (lab.results.model_id) and, for a self
    judge, its adapter's sha256, the dtype and chat format; or the endpoint's URL (redacted) and model name."""
    cache = cfg.out if cfg.judge_cache and hasattr(cfg, "out") else None
    if is_url(cfg.judge):
        endpoint = Endpoint(cfg.judge, cfg.judge_model, cfg.judge_key_env, cfg.judge_timeout, cfg.judge_retries,
                            cfg.judge_workers)
        return Judge(endpoint.ask, f"endpoint:{endpoint.shown}#{cfg.judge_model}", cache)
    j = s if cfg.judge == "self" else open_model(cfg.judge, cfg.dtype, cfg.device, cfg.prepack, compile=False)
    adapter = getattr(cfg, "adapter", "") if cfg.judge == "self" else ""   # a self judge is the adapted model
    identity = (f"model:{j.model_dir}@{model_id(j.model_dir)[:16]}" + (f"+adapter@{sha256(adapter)[:16]}" if adapter
                else "") + f"/{cfg.dtype}/{j.fmt_name}")
    judge = Judge(local_ask(j.model, j.tok, session_format(j.fmt_name, j.tok)), identity, cache)
    judge.model_dir = j.model_dir
    return judge
