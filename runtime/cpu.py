"""What runs fastest on this CPU, with the same math: the kernel choices model.py makes by CPU, and pack(), a copy of
the weights in oneDNN's blocked layout that the forward multiplies by while it still stands for the weights.

    from runtime.cpu import pack, prepacked
    pack(model)                     # evaluate.py's --prepack: for the whole run
    with prepacked(model): ...      # for a `with`; generate packs its decode steps on its own (see generate)

Nothing here changes what a forward computes, only which kernel sums each dot product; in bf16 that gives the same
bits where this CPU's kernels sum in the same order (packed_matches_plain), and the README's Speed section has the
measurements behind every choice, on an AMD EPYC (AVX512-BF16) and an Intel Xeon (AMX).
"""
from __future__ import annotations    # "Transformer" in annotations is not looked up at run time

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:                        # for the annotations only: model.py imports this file
    from model import Transformer

# Whether this CPU has AMX tiles (Intel Xeon from the 4th generation on), through which SDPA's CPU kernel and
# oneDNN's large bf16 products multiply. Two choices follow from it, each measured on both machines (SmolLM2, 2 cores):
# - attention: with AMX, SDPA is the faster kernel at every size (bf16: a compiled 16x128 forward 275 against 358 ms,
#   decode 481 against 422 tok/s at batch 16, 42 against 36 at batch 1; fp32 decode the same). Without AMX (an AMD
#   EPYC with AVX512-BF16) its bf16 path is slow, and model.plain_attention takes decode steps and compiled forwards;
# - packed weights: with AMX, bf16 products of more than 32 rows keep the plain weights (see packed_weight).
AMX = hasattr(torch.cpu, "_is_amx_tile_supported") and torch.cpu._is_amx_tile_supported()   # private: guarded


# -------------------------------------------------------------------------- a copy of the weights in oneDNN's layout
def blocked(weights):
    """[(out_i, in)] weights -> one (sum out_i, in) matrix in oneDNN's blocked layout, laid out for one row (1)."""
    return torch.ops.mkldnn._reorder_linear_weight(torch.cat(weights), 1)


def onednn_linear(x, packed):
    """x (..., in) @ a weight that blocked() made -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def project(x, packed, *linears):
    """[linear(x) for each linear], from pack()'s one blocked matrix for all of them while it still stands in for
    their weights (see packed_weight; the same numbers), else from each linear as written."""
    P = packed_weight(packed, x)
    if P is None:
        return [m(x) for m in linears]
    return onednn_linear(x, P).split([m.out_features for m in linears], -1)


def packed_weight(p, x):
    """p: None or pack()'s (blocked matrix, [(parent, name, linear, weight, its version and address then)]); x the
    input (..., in). The matrix, or None where it cannot stand in for the linears: while gradients are recorded (it
    has none), under torch.compile, or once something changed since packing: a linear swapped for another module (a
    LoRA wrapper), given module hooks, its weight replaced or moved (.to(), .double(): a new address), or edited in
    place (steering's ablation, a LoRA merge, an optimizer step: each bumps the tensor's version). The one edit it
    cannot see is one through `.data` (w.data.copy_ keeps the version): unpack before that.
    Also None for a bf16 product of more than 32 rows on a CPU with AMX: there the plain layout's AMX kernels are as
    fast or faster (SmolLM2's gate/up at 2048 rows: 2.05 against 2.34 ms) and round as transformers' do, where the
    packed ones do not (packed_matches_plain); the blocked layout pays at decode sizes (gate/up at 16 rows: 0.06
    against 0.12 ms). Attribute and dict lookups only: this runs 5 times per layer per decode step (~1 us each)."""
    if p is None or torch.is_grad_enabled() or torch.compiler.is_compiling() \
            or AMX and x.dtype == torch.bfloat16 and x.numel() > 32 * x.shape[-1]:
        return None
    for parent, name, m, w, version, address in p[1]:
        if parent._modules[name] is not m or m._parameters["weight"] is not w or w._version != version \
                or w.data_ptr() != address or m._forward_hooks or m._forward_pre_hooks:
            return None
    return p[0]


def prepackable(model) -> bool:
    """Whether pack() can pack this model: a Transformer (not a compiled wrapper) on a CPU with oneDNN, in
    fp32, or in bf16 where oneDNN has bf16 kernels for this CPU."""
    from model import Transformer        # here, not at the top: model.py imports this file
    if not isinstance(model, Transformer) or not torch.backends.mkldnn.is_available():
        return False
    w = model.output_weight
    try:       # private ops: another torch version may lack them
        torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
        bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False
    return w.device.type == "cpu" and (w.dtype == torch.float32 or w.dtype == torch.bfloat16 and bf16)


def can_prepack(model, rows: int) -> bool:
    """generate's default for its decode steps of `rows` rows: pack a bf16 model where this CPU's packed products
    equal the plain ones bit for bit at that many rows (packed_matches_plain), when free memory holds the copy
    twice over (free pages only: a copy that pushed the machine into swap would cost more than it saves)."""
    if not prepackable(model) or model.output_weight.dtype != torch.bfloat16:
        return False
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")     # not every OS has these
    except (ValueError, OSError, AttributeError):
        return False
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return free > 2 * weights and packed_matches_plain(model, rows)


MATCHES = {}    # (weight shapes, rows, dtype) -> packed_matches_plain's verdict on this CPU


def packed_matches_plain(model, rows: int) -> bool:
    """Whether pack()'s copies give this CPU's plain products bit for bit on `rows` rows (each output is the same
    dot product, but two kernels may sum it in different orders). oneDNN picks its kernel by the shapes, the
    layout and the CPU, not the values, so one product per matrix shape with random rows tells, once per process.
    Seen here in bf16: an AMD EPYC (AVX512-BF16) agreed at every size tried (1-2048 rows on SmolLM2's shapes,
    1-200 on Llama-2-7B's); an Intel Xeon with AMX agreed at up to 32 rows on SmolLM2's widths, not beyond, and
    not even at 1 row for Llama-2-7B's down_proj (11008 inputs)."""
    groups = [[parent._modules[name].weight for parent, name in names]
              for _, _, names in pack_slots(model)[:5]]     # the head and the first block's four: every shape
    key = (tuple(tuple(w.shape) for ws in groups for w in ws), rows, groups[0][0].dtype)
    if key not in MATCHES:
        g = torch.Generator().manual_seed(0)

        def same(ws):
            x = torch.randn(rows, ws[0].shape[1], generator=g).to(ws[0].dtype)
            return torch.equal(onednn_linear(x, blocked(ws)), torch.cat([F.linear(x, w) for w in ws], -1))
        with torch.no_grad():
            MATCHES[key] = all(same(ws) for ws in groups)
    return MATCHES[key]


def pack(model: Transformer) -> bool:
    """Give the forward a copy of every projection weight in oneDNN's blocked layout (q/k/v and gate/up each as
    one matrix), which it multiplies by instead of the plain (out, in) weights, until unpack(model). Returns
    whether it packed (see prepackable). Scripts pack through evaluate.setup (--prepack); prepacked() scopes it.

    Why: on a CPU, oneDNN reads its blocked layout at about twice the memory bandwidth it reaches on the plain
    one when it multiplies one vector per row by a matrix, as a decode step does (2 cores, SmolLM2, bf16: a step
    46 -> 34 ms on an AMD EPYC, 36 -> 28 on an Intel Xeon), and at scoring sizes its blocked fp32 products beat
    MKL's plain ones (AMD ~15%, Intel ~3%), as do bf16 ones without AMX (AMD ~5%; with AMX, bf16 products of more
    than 32 rows keep the plain weights: see packed_weight). transformers uses the plain layout. Each output is the
    same dot product, summed by another kernel: in fp32 the last bits differ; in bf16 the results are bit-identical
    where this CPU's kernels sum in the same order (packed_matches_plain: always on the AMD EPYC tried, up to 32
    rows on SmolLM2's widths with Intel AMX, all it uses there), else a bf16 step off here and there. The cost: a
    second copy of the weights (made in ~0.1 s for SmolLM2 in bf16). Only plain projections without module hooks
    are packed, and packed_weight checks before every use that nothing changed.
    """
    if not prepackable(model) or model.packed_head is not None:
        return False
    with torch.no_grad():
        for owner, attr, names in pack_slots(model):
            mods = [parent._modules[name] for parent, name in names]
            if all(type(x) in (nn.Linear, nn.Embedding) and not x._forward_hooks and not x._forward_pre_hooks
                   for x in mods):
                checks = [(parent, name, x, x.weight, x.weight._version, x.weight.data_ptr())
                          for (parent, name), x in zip(names, mods)]
                setattr(owner, attr, (blocked([x.weight for x in mods]), checks))
    return True


def pack_slots(model: Transformer) -> list:
    """[(module, attribute that holds a packed matrix, the (parent, name) of each linear it stands for)]."""
    head = (model.model, "embed_tokens") if model.config.tie_word_embeddings else (model, "lm_head")
    slots = [(model, "packed_head", [head])]
    for block in model.layers:
        a, m = block.self_attn, block.mlp
        slots += [(a, "packed_qkv", [(a, "q_proj"), (a, "k_proj"), (a, "v_proj")]), (a, "packed_o", [(a, "o_proj")]),
                  (m, "packed_gate_up", [(m, "gate_proj"), (m, "up_proj")]), (m, "packed_down", [(m, "down_proj")])]
    return slots


def unpack(model: Transformer):
    """Drop pack()'s copies (the forward goes back to the plain weights)."""
    for owner, attr, _ in pack_slots(model):
        setattr(owner, attr, None)


@contextmanager
def prepacked(model: Transformer):
    """pack(model) for the body of a `with`, unpacked afterwards, also if the body raises. Inside a packed model
    (an outer `with`, or a script's --prepack) it changes nothing."""
    packed = pack(model)
    try:
        yield model
    finally:
        if packed:
            unpack(model)
