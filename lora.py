"""LoRA swapped in place: low-rank adapters on the attention and MLP projections, for SFT and DPO.

    from lora import add_lora, lora_disabled, lora_parameters, merge, save_adapter, load_adapter
    add_lora(model, r=8, alpha=16)                  # wraps q,k,v,o,gate,up,down of every layer; freezes the rest
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    with lora_disabled(model):                      # DPO's reference: the same weights with adapters off
        ref = model(ids)
    save_adapter(model, "out/sft.safetensors", meta={"model": "SmolLM2-135M-Instruct"})

LoRA (Hu et al. 2021) learns W' = W + (alpha / r) B A, with A (r, in) and B (out, r), r << in, out. B starts at
zero, so at init the model is exactly the base. A wrapped projection keeps the base weight as its own `.weight`
(the same Parameter, no copy), so `model.layers.0.self_attn.q_proj.weight` keeps its state-dict key, and hooks,
steering and checkpoint code see the names they expect; the adapter adds `...q_proj.lora_A` / `...q_proj.lora_B`.

Adapters are fp32 whatever the base dtype (as peft does): they are tiny, and Adam's small updates to bf16 values
would round away. The adapter path runs in fp32 and is added to the base output before one rounding to the base
dtype, so a bf16 model at init still gives bit-identical logits. export_peft / import_peft write and read peft's
adapter folders (plain LoRA only: DoRA, rsLoRA, biases and other options that change the math are refused).
"""
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.results import write_atomic
from model import read_safetensors

# target -> the sub-module of a block that holds it (HF names): layers[i].<parent>.<target>
TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
NAME = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")      # a wrapped module's name in the model
PEFT_PREFIX = "base_model.model."           # peft's key = PEFT_PREFIX + our key + ".weight"
# peft options that change what a saved adapter computes: each must be empty/false for plain LoRA.
PEFT_REFUSED = ("use_dora", "use_rslora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                "modules_to_save", "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora",
                "alora_invocation_tokens", "megatron_config", "use_bdlora", "arrow_config", "kasa_config",
                "velora_config", "monteclora_config")


class LoRALinear(nn.Module):
    """A bias-free nn.Linear plus a low-rank update: y = x W^T + scaling * (dropout(x) A^T) B^T."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear: the wrapped nn.Linear has a bias; syco-lab's projections are bias-free "
                             "and merge/export here assume no bias")
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight                   # (out, in): the same Parameter, so the same key and memory
        self.weight.requires_grad_(False)
        self.r, self.alpha, self.scaling, self.dropout_p = r, alpha, alpha / r, dropout
        kw = dict(dtype=torch.float32, device=self.weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))    # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))   # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # as nn.Linear and peft; the caller seeds torch
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()   # active only in model.train()
        self.merged = False     # True: W already holds W + scaling B A, so forward must not add it again
        self.disabled = False   # True: forward is the base projection alone

    def forward(self, x):                                                   # x (..., in) -> (..., out)
        if self.merged and self.disabled:
            raise RuntimeError("LoRA adapters merged into the weights cannot be disabled; unmerge(model) first")
        y = F.linear(x, self.weight)
        if self.merged or self.disabled:
            return y
        h = F.linear(self.dropout(x.float()), self.lora_A)                   # (..., r), fp32
        return (y + F.linear(h, self.lora_B) * self.scaling).to(y.dtype)     # fp32 sum, one rounding

    @torch.no_grad()
    def set_merged(self, merged: bool):
        # W +/- scaling B A in fp32, then cast back: a bf16 W rounds, so unmerging it is exact only up to that
        # rounding. Merge for inference or export; train unmerged (merged, the adapters get no gradient).
        if merged != self.merged:
            delta = (self.lora_B @ self.lora_A) * self.scaling                # (out, in), fp32
            self.weight.copy_((self.weight.float() + (delta if merged else -delta)).to(self.weight.dtype))
            self.merged = merged

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}, disabled={self.disabled}"


def lora_modules(model) -> dict:
    """{'model.layers.0.self_attn.q_proj': LoRALinear, ...} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model) -> list:
    """The trainable tensors (every lora_A and lora_B), e.g. for the optimizer."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def _slot(model, name: str, key: str):
    """'model.layers.0.self_attn.q_proj' -> (layers[0].self_attn, 'q_proj'); an error names `key`."""
    m = NAME.fullmatch(name)
    if not m or TARGETS.get(m[3]) != m[2] or int(m[1]) >= len(model.layers):
        raise ValueError(f"{key!r} is not a LoRA target of this model: targets are model.layers.<i>.self_attn."
                         f"{{q,k,v,o}}_proj and model.layers.<i>.mlp.{{gate,up,down}}_proj, i < {len(model.layers)}")
    return getattr(model.layers[int(m[1])], m[2]), m[3]


def _wrap(model, names, r, alpha, dropout) -> list:
    """Swap each named projection for a LoRALinear around it; freeze every other parameter of the model."""
    if lora_modules(model):
        raise ValueError(f"the model already has LoRA adapters on {len(lora_modules(model))} modules; "
                         "syco-lab keeps one adapter set per model")
    slots = [_slot(model, n, n) for n in names]     # all checked before any change: an error leaves the model as is
    for p in model.parameters():
        p.requires_grad_(False)
    for owner, attr in slots:
        lora = LoRALinear(getattr(owner, attr), r, alpha, dropout)
        setattr(owner, attr, lora.train(owner.training))    # a new module is in train mode: follow the model's
    return list(names)


def add_lora(model, targets=tuple(TARGETS), r=8, alpha=16, dropout=0.0, layers=None) -> list:
    """Wrap `targets` of `layers` (None = all) in place; returns the wrapped names. Seed with torch.manual_seed."""
    targets = [targets] if isinstance(targets, str) else list(dict.fromkeys(targets))
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown LoRA target(s) {bad}; valid targets are {list(TARGETS)}")
    n = len(model.layers)
    layers = range(n) if layers is None else sorted(set(layers))
    if any(not 0 <= i < n for i in layers):
        raise ValueError(f"LoRA layers {list(layers)}: the model has layers 0..{n - 1}")
    return _wrap(model, [f"model.layers.{i}.{TARGETS[t]}.{t}" for i in layers for t in targets], r, alpha, dropout)


def adapter_config(model) -> dict:
    """{r, alpha, dropout, targets, layers} of the model's adapters."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters (call add_lora or load_adapter first)")
    m = next(iter(mods.values()))
    parts = [NAME.fullmatch(n).groups() for n in mods]      # (layer, parent, target)
    return {"r": m.r, "alpha": m.alpha, "dropout": m.dropout_p,
            "targets": [t for t in TARGETS if any(p[2] == t for p in parts)],
            "layers": sorted({int(p[0]) for p in parts})}


@contextmanager
def lora_disabled(model):
    """Adapters off for the body of a `with` (the base model, no second copy); restored also if the body raises.
    Merged adapters cannot be taken out of the weights exactly in bf16, so a forward while merged raises."""
    mods = list(lora_modules(model).values())
    before = [m.disabled for m in mods]
    try:
        for m in mods:
            m.disabled = True
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d


def merge(model, merged: bool = True):
    """Fold every adapter into its weight (forward then costs what the base costs); unmerge takes it back out."""
    for m in lora_modules(model).values():
        m.set_merged(merged)


def unmerge(model):
    merge(model, merged=False)


def lora_state_dict(model) -> dict:
    """Only the adapter tensors, under the model's keys: {'model.layers.0.self_attn.q_proj.lora_A': (r, in), ...}."""
    return {f"{n}.{k}": getattr(m, k).detach() for n, m in lora_modules(model).items() for k in ("lora_A", "lora_B")}


def _install(model, sd: dict, r, alpha, dropout, source: str):
    """Copy {our key: tensor} into the model's adapters, adding them first if it has none. Checks before any change."""
    mods = lora_modules(model)
    have = adapter_config(model) if mods else None
    if mods:
        for key, want in (("r", r), ("alpha", alpha)):
            if have[key] != want:
                raise ValueError(f"{source}: {key}={want}, but the model's adapters have {key}={have[key]}")
        if any(m.merged for m in mods.values()):
            raise RuntimeError("cannot load an adapter into merged weights; unmerge(model) first")
    # module -> a key to name it by in errors: the model's adapters if it has some, else the file's tensors
    names = {n: f"{n}.lora_A" for n in mods} or {k.rsplit(".", 1)[0]: k for k in sd}
    want = {}                                                               # our key -> expected shape
    for n, key in names.items():
        owner, attr = _slot(model, n, key)
        out_f, in_f = getattr(owner, attr).weight.shape
        want[f"{n}.lora_A"], want[f"{n}.lora_B"] = (r, in_f), (out_f, r)
    for k in sorted(set(want) | set(sd)):
        if k not in sd:
            raise ValueError(f"{source}: missing tensor {k!r}")
        if k not in want:
            raise ValueError(f"{source}: tensor {k!r} has no adapter in the model" + (
                f" (it adapts {have['targets']} in layers {have['layers']})" if have else ""))
        if tuple(sd[k].shape) != want[k]:
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {want[k]} (r={r})")
    if not mods:
        _wrap(model, list(names), r, alpha, dropout)
    with torch.no_grad():
        for n, m in lora_modules(model).items():
            m.lora_A.copy_(sd[f"{n}.lora_A"])       # to fp32 and the model's device
            m.lora_B.copy_(sd[f"{n}.lora_B"])


def save_adapter(model, path, meta: dict | None = None, tensors: dict | None = None) -> Path:
    """Adapter tensors (fp32) + metadata (r, alpha, dropout, targets, layers and `meta`) as one safetensors file.

    Values are JSON-encoded (safetensors metadata is str -> str), so load_adapter returns them as given: put the
    model's name or config hash in `meta` for provenance. Written to a temporary file, then renamed.
    tensors: lora_state_dict's tensors gathered whole where the model holds only shards of them (FSDP)."""
    from safetensors.torch import save
    cfg, meta = adapter_config(model), dict(meta or {})
    if set(meta) & {*cfg, "format"}:
        raise ValueError(f"save_adapter: meta may not use the reserved keys {sorted(set(meta) & {*cfg, 'format'})}")
    info = {"format": "pt", **{k: json.dumps(v) for k, v in {**cfg, **meta}.items()}}
    tensors = {k: v.float().contiguous().cpu() for k, v in (tensors or lora_state_dict(model)).items()}
    path = Path(path)
    write_atomic(path, save(tensors, metadata=info))
    return path


def load_adapter(model, path) -> dict:
    """Load a save_adapter file into the model (adding adapters if it has none); returns the file's metadata."""
    sd, info = read_safetensors(path)
    if not {"r", "alpha"} <= set(info):
        raise ValueError(f"{path}: no r/alpha metadata, so not written by save_adapter (a peft folder? import_peft)")
    meta = {k: json.loads(v) for k, v in info.items() if k != "format"}
    _install(model, sd, meta["r"], meta["alpha"], meta.get("dropout", 0.0), str(path))
    return meta


def export_peft(model, folder, base_model_name_or_path: str = "", tensors: dict | None = None) -> Path:
    """Write a peft LoRA folder (adapter_model.safetensors + adapter_config.json) that PeftModel.from_pretrained
    loads onto the transformers model of the same checkpoint. tensors: as save_adapter's."""
    from safetensors.torch import save
    cfg, n_mods, folder = adapter_config(model), len(lora_modules(model)), Path(folder)
    if n_mods != len(cfg["targets"]) * len(cfg["layers"]):
        raise ValueError("the adapted modules are not every target in every adapted layer, which peft's "
                         "target_modules + layers_to_transform cannot express")
    every_layer = cfg["layers"] == list(range(len(model.layers)))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
              "r": cfg["r"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"],
              "target_modules": cfg["targets"], "layers_to_transform": None if every_layer else cfg["layers"],
              "layers_pattern": None if every_layer else "layers", "bias": "none", "lora_bias": False,
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True}
    tensors = {f"{PEFT_PREFIX}{k}.weight": v.float().contiguous().cpu()
               for k, v in (tensors or lora_state_dict(model)).items()}
    write_atomic(folder / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    write_atomic(folder / "adapter_config.json", json.dumps(config, indent=2).encode())
    return folder


def import_peft(model, folder) -> dict:
    """Install a peft LoRA folder into the model; returns its adapter_config.json. The adapted modules are read from
    the tensor names, so target_modules (list or regex) and layers_to_transform are honoured whatever their form."""
    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").exists():     # an adapter_model.bin is a pickle: refused
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors (pickle adapter_model.bin is refused)")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    src = str(folder / "adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{src}: peft_type={cfg.get('peft_type')!r}; only 'LORA' is supported")
    bad = [f"{k}={cfg[k]!r}" for k in PEFT_REFUSED if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias={cfg['bias']!r}")
    if cfg.get("init_lora_weights", True) not in (True, False, "gaussian"):     # PiSSA, OLoRA, LoftQ, ... may
        bad.append(f"init_lora_weights={cfg['init_lora_weights']!r}")       # have changed the base weights
    if bad:
        raise ValueError(f"{src}: {', '.join(bad)} changes the LoRA math; only plain LoRA can be imported")
    sd = {}
    for k, t in read_safetensors(folder / "adapter_model.safetensors")[0].items():
        if not (k.startswith(PEFT_PREFIX) and k.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise ValueError(f"{folder}: unexpected tensor {k!r} in adapter_model.safetensors (plain LoRA has only "
                             f"{PEFT_PREFIX}<module>.lora_A.weight and .lora_B.weight)")
        sd[k[len(PEFT_PREFIX):-len(".weight")]] = t
    _install(model, sd, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), str(folder))
    return cfg
