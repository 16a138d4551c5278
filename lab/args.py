"""Command lines: `--key=value` flags read into a script's config dataclass, and the model options every script
that loads a model shares (ModelOptions: each such script's config extends it).

Flags are checked while they are parsed, naming the flag: a field's type says what it accepts (int, float: finite,
bool, str, or one of the checked types below: Count, Positive, Layers, Numbers, Fraction, PositiveNumber). A
script with actions (studies.steering vectors|steer|...) reads them with parse_command. A script's main is wrapped
in user_errors(), which ends a mistake in the user's input with one `error: ...` line and keeps tracebacks for bugs.
"""
import contextlib
import dataclasses
import errno
import math
import os
import sys
import typing
from dataclasses import dataclass


@dataclass
class ModelOptions:
    model: str = ""           # "" = the embedded default (converted on first use); else an HF-layout folder
    dtype: str = "fp32"       # fp32 on the CPU: bf16 logits near |20| step by 1/8, too coarse for p(letter) shifts
    device: str = "cpu"
    chat_format: str = ""     # "" = detected from the checkpoint
    system: str = ""          # system prompt of every chat that has none, or @FILE holding it ("" = none; a
                              # template's default stays)
    prepack: bool = True      # CPU: projections multiply by a oneDNN-layout copy of their weights (runtime/cpu.py)
    compile: bool = False     # runtime/compile.py: torch.compile with frozen weights, after a while of compiling
    adapter: str = ""         # a LoRA adapter (train.py's adapter.safetensors) applied to the model; "" = none
    cross_model: bool = False # accept an adapter, vectors or activations made from another model (recorded)


@dataclass
class JudgeOptions:
    """Who grades generated text (lab/judge.py): every script that judges extends these beside ModelOptions."""
    judge: str = ""           # "" = judge-free scoring; "self" = the model under test (unhooked); a checkpoint folder;
                              # or an OpenAI-compatible endpoint, http(s)://host:port/v1
    judge_model: str = ""     # endpoint: the "model" field of each request
    judge_key_env: str = "OPENAI_API_KEY"   # endpoint: the environment variable holding its key (never written)
    judge_cache: bool = True  # replies cached in OUT/judge-cache/ by (judge, prompt): a rerun asks only what is new
    judge_timeout: float = 60.0   # endpoint: seconds per request
    judge_retries: int = 3    # endpoint: retries on 429, 5xx, timeouts and refused connections
    judge_workers: int = 8    # endpoint: concurrent requests


def read_system(value: str, flag: str = "--system") -> tuple[str, str]:
    """--system's value -> (system prompt, file it was read from or ""): "@PATH" is that file's text (a trailing
    newline dropped), anything else is the text itself. A text that names an existing file is refused: it was
    almost surely meant as the file, and taking it as the prompt would be a silent wrong result."""
    if value.startswith("@"):
        path = value[1:]
        if not os.path.isfile(path):
            raise ValueError(f"{flag}=@{path}: no such file")
        with open(path, encoding="utf-8") as f:
            return f.read().removesuffix("\n"), path
    if value and "\n" not in value and len(value) < 4096 and os.path.isfile(value):
        raise ValueError(f"{flag}={value}: that is a file; write {flag}=@{value} to use its text as the system "
                         f"prompt")
    return value, ""


# ------------------------------------------------------------------------------------------------ checked types
# A field annotated with one of these is checked when its flag is parsed; each raises ValueError("expects ...").

class Count(int):
    """A whole number >= 0 (0 usually means "all" or "none")."""

    def __new__(cls, value):
        n = _whole(value)
        if n < 0:
            raise ValueError("expects a whole number >= 0")
        return super().__new__(cls, n)


class Positive(int):
    """A whole number >= 1: a count where 0 means nothing."""

    def __new__(cls, value):
        n = _whole(value)
        if n < 1:
            raise ValueError("expects a whole number >= 1")
        return super().__new__(cls, n)


class Layers(str):
    """"" or layer numbers: "3,9,15", "4-12" (inclusive), "-1" (from the end); checked against a model later."""

    def __new__(cls, value):
        layer_numbers(value)
        return super().__new__(cls, value)


class Numbers(str):
    """Comma-separated finite numbers ("-2,-1,0,1,2")."""

    def __new__(cls, value):
        finite_numbers(value)
        return super().__new__(cls, value)


class Fraction(float):
    """A number strictly between 0 and 1 (a share of the items)."""

    def __new__(cls, value):
        x = _finite(value)
        if not 0 < x < 1:
            raise ValueError("expects a number between 0 and 1 (both excluded)")
        return super().__new__(cls, x)


class PositiveNumber(float):
    """A finite number > 0 (a limit, a scale)."""

    def __new__(cls, value):
        x = _finite(value)
        if not x > 0:
            raise ValueError("expects a number > 0")
        return super().__new__(cls, x)


def _finite(value) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ValueError("expects a number") from None
    if not math.isfinite(x):
        raise ValueError("expects a finite number")
    return x


def _whole(value) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("expects a whole number") from None


def layer_numbers(spec: str) -> list[int]:
    """"3,9,15" -> [3, 9, 15], "4-12" -> 4..12, "-1" -> [-1] (from the end), "" -> []. The one reader of a layers
    spec (steer.parse_layers checks the numbers against a model)."""
    out = []
    for part in [p.strip() for p in spec.split(",")] if spec.strip() else []:
        a, dash, b = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            idx = range(int(a), int(b) + 1) if dash else [int(a)]
        except ValueError:
            raise ValueError(f"expects layers like 3,9,15 or 4-12 (negative: from the end), not {part!r}") from None
        if not idx:
            raise ValueError(f"expects layers like 3,9,15 or 4-12, not the empty range {part!r}")
        out += idx
    return out


def finite_numbers(spec: str) -> list[float]:
    """"-2,-1,0,1,2" -> floats; an empty entry, a word, nan or inf is a ValueError (a NaN multiplier would poison
    every number of a sweep)."""
    out = []
    for part in spec.split(","):
        try:
            x = float(part)
        except ValueError:
            raise ValueError(f"expects comma-separated numbers, not {part.strip()!r}") from None
        if not math.isfinite(x):
            raise ValueError(f"expects finite numbers, not {part.strip()!r}")
        out.append(x)
    return out


# ------------------------------------------------------------------------------------------------ parsing

def parse_args(cfg_class, argv):
    """`--key=value` overrides of a flat dataclass, converted to and checked by the field's type; an unknown key, a
    bare word or a value the type refuses is an error naming the flag."""
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
        try:
            setattr(cfg, key, _convert(kind, value))
        except ValueError as e:
            sys.exit(f"error: --{key}={value}: {e}")
    return cfg


def _convert(kind, value: str):
    if kind is bool:      # bool("false") would be True, hence the special case
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError("expects true/false")
        return value.lower() in ("1", "true", "yes")
    if kind in (int, float):
        try:
            x = kind(value)
        except ValueError:
            raise ValueError(f"expects {kind.__name__}") from None
        if not math.isfinite(x):   # float("nan") parses, and would poison whatever it scales
            raise ValueError("expects a finite number")
        return x
    return kind(value)


def parse_command(cfg_class, argv, actions):
    """A script with actions: the action is a bare word anywhere in argv or --action=NAME (both: the same name),
    else cfg_class's default; everything else is a --key=value flag (parse_args). Two different actions, or one
    not in `actions`, is an error naming the valid ones."""
    words = [a for a in argv if not a.startswith("-")]
    cfg = parse_args(cfg_class, [a for a in argv if a.startswith("-")])
    flagged = [a.partition("=")[2] for a in argv if a.startswith("--") and
               a[2:].partition("=")[0].replace("-", "_") == "action"]
    names = list(dict.fromkeys(words + flagged))
    if len(names) > 1:
        sys.exit(f"error: conflicting actions {', '.join(map(repr, names))}: give one of {', '.join(actions)}")
    cfg.action = names[0] if names else cfg.action
    if cfg.action not in actions:
        sys.exit(f"error: unknown action {cfg.action!r}; valid: {', '.join(actions)}")
    return cfg


# ------------------------------------------------------------------------------------------------ errors

class UserError(Exception):
    """A mistake in what the user gave (a flag, a file, a setting): the project's own error classes subclass it
    (lab.prepare's PrepareError and studies.tactics' TacticsError predate it: their mains report them)."""


# errnos of a disk or a path the user can act on (full, read-only, no permission, no such file), not of a bug
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM,
               errno.ENOENT, errno.EEXIST, errno.EISDIR, errno.ENOTDIR}


def is_user_error(e: BaseException) -> bool:
    """The user errors: ValueError (a bad flag, file, config or refused checkpoint; json's decode errors and
    UnicodeDecodeError included), UserError, and OSError of a disk or a path (missing file, taken name, permission,
    full disk: USER_ERRNOS). Anything else (KeyError, RuntimeError, an OSError like EBADF) is a bug."""
    if isinstance(e, OSError):
        return isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                              NotADirectoryError)) or e.errno in USER_ERRNOS
    return isinstance(e, (ValueError, UserError))


def error_line(e: BaseException) -> str:
    """`error: ...` in one line: an OSError as "path: why", anything else as its message."""
    text = str(e)
    if isinstance(e, OSError) and e.strerror:
        where = ", ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        text = f"{where}: {e.strerror}" if where else e.strerror
    return "error: " + (" ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__)


@contextlib.contextmanager
def user_errors():
    """Wrap a script's main (`@user_errors()` above it): a user error (is_user_error) ends the run with one
    `error: ...` line on stderr and exit status 1; anything else is a bug and keeps its traceback.

    A bug deep inside a library may raise ValueError too, and would lose its traceback here: SYCO_TRACEBACK=1 in
    the environment keeps every traceback."""
    try:
        yield
    except Exception as e:
        if not is_user_error(e) or os.environ.get("SYCO_TRACEBACK", "") not in ("", "0"):
            raise
        sys.exit(error_line(e))
