"""Results files: provenance, atomic writes that never overwrite, resumable progress.

A results file is OUT/<run>-<time>.json = {"config", "provenance", "metrics", "items"[, "timing"]}, where
    metrics = {name: {"value": float, "ci": [lo, hi] | None, "n": int, "kind": "proportion" | "mean", "n_missing"}}
and items holds one row per example (parse failures included), with an "id" and one key per metric holding
that item's score, so runs can be compared item by item (docs/conventions.md).
"""
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


WEIGHTS_CACHE = ".syco-sha256.json"   # beside a model's weights: {file: {size, mtime_ns, sha256}}


def weights_sha256(model_dir) -> dict:
    """{file name: sha256} of a model folder's *.safetensors. The hashes are kept beside the weights and reused
    while a file's size and modification time stay the same, so a 7B model's 14 GB are read once, not per run.
    A folder that cannot be written to is hashed every time."""
    folder = Path(model_dir)
    cache_path = folder / WEIGHTS_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    out, fresh = {}, {}
    for p in sorted(folder.glob("*.safetensors")):
        st = p.stat()
        hit = cache.get(p.name)
        if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            out[p.name] = hit["sha256"]
        else:
            out[p.name] = sha256(p)
        fresh[p.name] = dict(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=out[p.name])
    if fresh != cache:
        try:
            write_atomic(cache_path, json.dumps(fresh, indent=1).encode())
        except OSError:
            pass
    return out


def model_id(model_dir) -> str:
    """A model's identity: the sha256 of its weight files' sha256s (weights_sha256, cached). Vectors and adapters
    record the id of the model they were made from and are refused on any other model, however alike: a copy with
    one layer changed has another id."""
    lines = "".join(f"{name} {h}\n" for name, h in sorted(weights_sha256(model_dir).items()))
    if not lines:
        raise ValueError(f"{model_dir}: no *.safetensors weights to identify the model by")
    return hashlib.sha256(lines.encode()).hexdigest()


def model_identity(model_dir, adapter="") -> dict:
    """What a vectors or activations file records of the model it comes from: {"model": folder, "model_sha256":
    model_id} and, where an adapter is applied, {"adapter": path, "adapter_sha256": the file's sha256}."""
    out = {"model": str(model_dir), "model_sha256": model_id(model_dir)}
    return out | ({"adapter": str(adapter), "adapter_sha256": sha256(adapter)} if adapter else {})


def _shown(identity: dict) -> str:
    adapter = identity.get("adapter_sha256")
    return (f"model {identity.get('model', '?')} (sha256 {identity.get('model_sha256')})"
            + (f" with adapter {identity.get('adapter', '?')} (sha256 {adapter})" if adapter else ""))


def check_model_id(path, what: str, made_from: dict, now: dict, cross_model: bool) -> dict:
    """Refuse `path` (vectors, activations or an adapter) on a model other than the one it was made from (another
    base model, or the same with another adapter or none), unless cross_model says the user means it (a Mistral
    vector on Llama-2, a base model's vector on its chat model). made_from, now: model_identity's form (read from
    the file; of the model loaded now). Returns what the results record."""
    key = lambda ident: (ident.get("model_sha256"), ident.get("adapter_sha256"))
    same = key(made_from) == key(now)
    record = dict(made_from=made_from.get("model"), made_from_sha256=made_from.get("model_sha256"),
                  used_on=now.get("model"), used_on_sha256=now.get("model_sha256"), same_model=same,
                  cross_model=cross_model)
    record |= {f"{k}_adapter_sha256": ident["adapter_sha256"] for k, ident in (("made_from", made_from),
               ("used_on", now)) if ident.get("adapter_sha256")}
    if same or cross_model:
        return record
    why = ("records no model identity (model_sha256), so it cannot be checked against this model"
           if not made_from.get("model_sha256") else f"was made from {_shown(made_from)}, not the one loaded now, "
                                                     f"{_shown(now)}")
    raise ValueError(f"{path}: this {what} file {why}; pass --cross_model=true to use it on this model anyway "
                     "(the results record it)")


def input_hashes(model_dir=None, files=()) -> dict:
    """{path: sha256} of everything a run reads: the model's weight files and the given files (data, adapters,
    vectors). What a resumed run compares with what its first part read (check_same_inputs)."""
    out = {str(Path(model_dir) / name): h for name, h in weights_sha256(model_dir).items()} if model_dir else {}
    return out | {str(p): sha256(p) for p in files}


def check_same_inputs(where, before: dict | None, now: dict):
    """Refuse to resume `where` when any input differs from what the interrupted run read: the result would mix
    rows computed from two different inputs, and its provenance would name only the second."""
    if before is None:
        raise ValueError(f"{where}: records no hashes of its inputs (written by an older syco-lab), so resuming "
                         "cannot check they are unchanged; delete it to start afresh")
    for path in sorted(set(before) | set(now)):
        was, now_ = before.get(path, "none (not read then)"), now.get(path, "none (not read now)")
        if was != now_:
            raise ValueError(f"{where}: {path} changed since the run started (sha256 {was} then, {now_} now); "
                             "resuming would mix two inputs in one result. Restore the file, or delete the partial "
                             "run to start afresh")


def adapter_provenance(model_dir, adapter: str, cross_model: bool) -> dict:
    """What a result records of the adapter applied (ModelOptions.adapter): its path and sha256, and the base model
    it was trained on as its metadata says, beside the base loaded (weights_sha256); {} without one."""
    if not adapter:
        return {}
    from safetensors import safe_open
    with safe_open(adapter, "np") as f:
        meta = f.metadata() or {}
    trained_on = json.loads(meta.get("base_model_sha256", "null"))
    return {"adapter": str(adapter), "adapter_sha256": sha256(adapter), "adapter_base_model_sha256": trained_on,
            "adapter_on_its_own_base": trained_on == model_id(model_dir), "cross_model": cross_model}


def provenance(cfg, model_dir: Path, chat_format: str, data_files=()) -> dict:
    """Everything needed to reproduce a number: code commit, weights and data hashes, formats, versions."""
    import torch  # here, not at the top: reading and plotting results needs no torch

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    return dict(git_commit=git("rev-parse", "HEAD"),
                git_dirty=git("status", "--porcelain", "--untracked-files=no") != "", model_dir=str(model_dir),
                weights_sha256=weights_sha256(model_dir),
                data_sha256={str(p): sha256(p) for p in data_files}, chat_format=chat_format,
                **adapter_provenance(model_dir, getattr(cfg, "adapter", ""), getattr(cfg, "cross_model", False)),
                seed=cfg.seed, dtype=cfg.dtype, device=cfg.device, python=sys.version.split()[0],
                torch=torch.__version__, numpy=np.__version__)


def _temp_copy(folder: Path, name: str, payload: bytes) -> Path:
    """payload in a fresh temp file in `folder` (so the rename that follows stays on one filesystem), fsynced,
    with the permissions of any file the user makes (open() applies the umask; mkstemp would give 0600)."""
    for k in itertools.count():
        tmp = folder / f".{name}.{os.getpid()}.{k}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            return tmp
        except FileExistsError:
            continue
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_atomic(path, payload: bytes) -> Path:
    """Replace `path` with payload atomically: a kill or a full disk leaves the old file or the new one, never half
    of one (checkpoints, adapters)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = _temp_copy(path.parent, path.name, payload)
    except OSError as e:
        raise OSError(e.errno, f"could not write {path} ({e}); the previous file is untouched") from e
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def publish(out_dir, name: str, suffix: str, payload: bytes, stamp: bool = True) -> Path:
    """Write OUT/<name>-<YYYYmmdd-HHMMSS>[-k]<suffix> (or OUT/<name><suffix> with stamp=False): never overwriting,
    never leaving a partial file.

    The bytes go to a temp file in the same folder, then os.link gives them their final name: link fails if the
    name exists, so two writers finishing in the same second get -2, -3, ... instead of replacing each other
    (exists() then os.replace has that race); an unstamped name that exists is an error. An OSError on the way
    (a full disk) removes the temp file and is raised again naming the destination."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" if stamp else name
    dest = out_dir / f"{base}{suffix}"
    tmp = None
    try:
        tmp = _temp_copy(out_dir, base + suffix, payload)
        for k in itertools.count(2):
            try:
                os.link(tmp, dest)
                break
            except FileExistsError:
                if not stamp:
                    raise FileExistsError(f"{dest} exists; refusing to overwrite it") from None
                dest = out_dir / f"{base}-{k}{suffix}"
    except OSError as e:
        if isinstance(e, FileExistsError):
            raise
        msg = f"could not write {dest} ({e}); no partial file was left"
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return dest


def publish_together(out_dir, name: str, payloads) -> dict:
    """The files of one run (a vectors file, its activations, its JSON) as OUT/<stem><suffix>, stem =
    <name>-<time>[-k], all or none. payloads: {suffix: bytes}, or stem -> {suffix: bytes} for files that name each
    other. Every payload is written to a temp file first, and if any write or link fails (a full disk) the ones
    already published are removed, so no file is left without its companions (an orphan vectors file would be
    what the Makefile's VECTOR= picks next). Returns {suffix: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for k in itertools.count(1):
        base = f"{name}-{stamp}" + ("" if k == 1 else f"-{k}")
        if not any(p.name.startswith(base + ".") for p in out_dir.iterdir()):
            break
    payloads = payloads(base) if callable(payloads) else payloads
    temps, done = {}, {}
    try:
        for suffix, payload in payloads.items():
            temps[suffix] = _temp_copy(out_dir, f"{name}{suffix}", payload)
        for suffix, tmp in temps.items():
            os.link(tmp, out_dir / f"{base}{suffix}")          # fails if the name was taken since: nothing replaced
            done[suffix] = out_dir / f"{base}{suffix}"
    except OSError as e:
        for path in done.values():
            path.unlink(missing_ok=True)
        msg = f"could not write {out_dir / name}-{stamp}* ({e}); none of the run's {len(payloads)} files was left"
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return done


def write_result(out_dir, name: str, result: dict) -> Path:
    """Write OUT/<name>-<time>.json with publish (never overwriting, never partial); then delete
    OUT/<name>.partial.jsonl (see Checkpoint): its rows now live in the result."""
    text = json.dumps(result, indent=1, ensure_ascii=False)  # first: an unserializable value touches no file
    dest = publish(out_dir, name, ".json", text.encode("utf-8"))
    (Path(out_dir) / f"{name}.partial.jsonl").unlink(missing_ok=True)
    return dest


def load_result(path) -> dict:
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a results file (not one JSON document: {e})") from None
    if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
        raise ValueError(f"{path} is not a results file (no 'metrics'; see docs/conventions.md, results files)")
    return result


def read_partial(path):
    """(header, rows, n_bad) of a .partial.jsonl: line 1 is the header {"config": ..., "inputs": {path: sha256}},
    then one item row per line. Unreadable lines (the last one torn by a kill mid-write) are skipped with a warning,
    not a crash; header is None when line 1 was lost."""
    header, rows, n_bad = None, [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not ("id" in obj or (i == 0 and "config" in obj)):
                    raise ValueError("neither an item row with an 'id' nor the config header")
            except ValueError as e:
                n_bad += 1
                warnings.warn(f"{path}:{i + 1}: unreadable line ignored (torn by a kill mid-write?): {e}")
                continue
            if "id" in obj:
                rows.append(obj)
            else:
                header = obj
    return header, rows, n_bad


def done_ids(path) -> set:
    """Ids of the rows already in a .partial.jsonl (empty if there is none)."""
    return {r["id"] for r in read_partial(path)[1]} if Path(path).exists() else set()


class Checkpoint:
    """Resumable progress: every finished item row is appended to OUT/<run>.partial.jsonl as one JSON line,
    flushed and fsynced, so a kill loses at most the row being written. Rerunning skips ids already done, and
    write_result(OUT, run, ...) deletes the file once the full result is on disk.

        ckpt = Checkpoint(cfg.out, "mmlu", config=asdict(cfg), inputs=input_hashes(model_dir, [data_file]))
        for item in items:
            if item["id"] not in ckpt.done:
                ckpt.add(score(item))                  # a dict with an "id"
        write_result(cfg.out, "mmlu", dict(..., items=ckpt.rows))

    Resuming under another config, or with any input (inputs: {path: sha256}) changed, is refused: it would
    silently mix two runs' items into one result."""

    def __init__(self, out_dir, run: str, config=None, inputs=None):
        self.path = Path(out_dir) / f"{run}.partial.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(config))  # compare as it reads back from disk (tuples become lists)
        inputs = dict(inputs or {})
        if self.path.exists():
            old, self.rows, n_bad = read_partial(self.path)
            if old is not None and old["config"] != config:
                raise ValueError(f"{self.path} was written under another config; delete it to start afresh, or "
                                 f"use another run name.\n  on disk: {old['config']}\n  now:     {config}")
            if old is not None:
                check_same_inputs(self.path, old.get("inputs"), inputs)
            if n_bad or old is None:  # rewrite without the torn line: else the next row would be glued onto it
                tmp = self.path.with_suffix(".tmp")
                lines = [json.dumps(r, ensure_ascii=False) + "\n"
                         for r in [{"config": config, "inputs": inputs}, *self.rows]]
                tmp.write_text("".join(lines), encoding="utf-8")
                os.replace(tmp, self.path)
            print(f"resuming {self.path}: {len(self.rows)} items already done")
        else:
            self.rows = []
            self._append({"config": config, "inputs": inputs})
        self.done = {r["id"] for r in self.rows}

    def _append(self, obj):
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:        # a full disk: name the file; a torn last line is dropped when the run resumes
            raise OSError(e.errno, f"could not append to {self.path} ({e.strerror or e}); the rows before it are "
                                   "kept and a rerun resumes from them") from e

    def add(self, row: dict):
        if "id" not in row or row["id"] in self.done:
            raise ValueError(f"a checkpoint row needs a new, unique 'id', got {row.get('id', '(none)')!r}")
        self._append(row)
        self.rows.append(row)
        self.done.add(row["id"])
