"""Command lines: `--key=value` flags read into a script's config dataclass, and the model options every script
that loads a model shares (ModelOptions: each such script's config extends it).
"""
import dataclasses
import sys
import typing
from dataclasses import dataclass


@dataclass
class ModelOptions:
    model: str = ""           # "" = the embedded default (converted on first use); else an HF-layout folder
    dtype: str = "fp32"       # fp32 on the CPU: bf16 logits near |20| step by 1/8, too coarse for p(letter) shifts
    device: str = "cpu"
    chat_format: str = ""     # "" = detected from the checkpoint
    system: str = ""          # system prompt of every chat that has none ("" = none; a template's default stays)
    prepack: bool = True      # CPU: projections multiply by a oneDNN-layout copy of their weights (runtime/cpu.py)
    compile: bool = False     # runtime/compile.py: torch.compile with frozen weights, after a while of compiling


def parse_args(cfg_class, argv):
    """`--key=value` overrides of a flat dataclass, converted to the field's type; unknown keys are an error."""
    types, cfg = typing.get_type_hints(cfg_class), cfg_class()
    for arg in argv:
        if arg in ("-h", "--help"):
            print("\n".join(f"--{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg_class)))
            sys.exit(0)
        key, eq, value = arg.removeprefix("--").partition("=")
        key, kind = key.replace("-", "_"), types.get(key.replace("-", "_"))
        if not arg.startswith("--") or not eq:
            sys.exit(f"error: bad argument {arg!r}: expected --key=value")
        if kind is None:
            sys.exit(f"error: unknown option --{key}; valid: {', '.join('--' + k for k in types)}")
        if kind is bool and value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            sys.exit(f"error: --{key} expects true/false, got {value!r}")
        try:  # bool("false") would be True, hence the special case
            setattr(cfg, key, value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
        except ValueError:
            sys.exit(f"error: --{key} expects {kind.__name__}, got {value!r}")
    return cfg
