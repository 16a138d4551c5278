"""Scoring primitives: how logits become the numbers the evaluators in evaluate.py report.

Answer-letter probabilities after a prefill (batched by length, only the last position's logits computed), summed
log-probabilities of answer options (the context read once, its KV cache forked for every option), greedy replies,
and a local model as a judge (lab/judge.py holds the rubrics and their strict parsers).
"""
import re

import torch

from model import KVCache, generate, pad_left, pad_right, unhooked
from probes import LETTERS


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def letter_ids(tok, letters, after="("):
    """Token id of each letter as it follows `after` in running text ("(" -> "A", "Answer:" -> " A"), checked
    to be one token.

    Encoding "(A" and dropping the ids of "(" gives the token the model really sees, whatever the tokenizer's
    prefix-space rules (byte-level "A" vs sentencepiece "▁A").
    """
    base = tok.encode(after)
    out = []
    for letter in letters:
        ids = tok.encode(after + letter)
        if ids[: len(base)] != base or len(ids) != len(base) + 1:
            raise ValueError(f"answer letter {letter!r} after {after!r} is not a single token: {ids}")
        out.append(ids[-1])
    return out


def pick_letter(letters, p) -> str:
    """The item's letter with the highest probability; p is indexed like LETTERS (letter_probs over LETTERS)."""
    return max(letters, key=lambda x: p[LETTERS.index(x)].item())


def batches_by_length(lengths: list[int], token_budget: int):
    """Indices grouped into batches of similar length (less padding), each at most `token_budget` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch, longest = [], 0
    for i in order:
        if batch and max(longest, lengths[i]) * (len(batch) + 1) > token_budget:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    if batch:
        yield batch


MIN_SHARED = 8    # tokens every prompt must share before letter_probs reads them once for all


def letter_probs(model, prompts: list[list[int]], ids: list[int], token_budget: int = 2048) -> torch.Tensor:
    """(N, len(ids)) probabilities of each answer letter at the next position, renormalized over the letters.

    Prompts are batched by length; only the last position's logits are computed. On the CPU, a prefix that every
    prompt shares (a chat format's system turn) is read once, and each batch continues a fork of its KV cache. Not
    on a GPU, where a small model waits on host time per call and the extra pass and forks cost more than they save
    (docs/speed.md). Not with hooks installed either: a hook may expect one call per batch of rows.
    """
    dev = model.model.embed_tokens.weight.device
    out = torch.empty(len(prompts), len(ids))
    n, shared = read_shared_prefix(model, prompts)
    for batch in batches_by_length([len(p) for p in prompts], token_budget):
        if shared is not None:
            out[batch] = letter_probs_after(model, shared, [prompts[i][n:] for i in batch], ids, [0] * len(batch))
            continue
        x, mask = pad_left([prompts[i] for i in batch], dev)
        with torch.no_grad():
            logp = model(x, attention_mask=mask, logits_to_keep=1)[:, -1].float().log_softmax(-1)
        out[batch] = logp[:, ids].softmax(-1).cpu()      # p(A) / (p(A) + p(B)): the CAA convention
    return out


def read_shared_prefix(model, prompts: list[list[int]]) -> tuple[int, KVCache | None]:
    """(n, a one-row KV cache of the first n tokens) when every prompt shares at least MIN_SHARED tokens, the model
    is on the CPU and no hook is installed (see letter_probs); else (0, None)."""
    dev = model.model.embed_tokens.weight.device
    n = shared_prefix_len(prompts) if len(prompts) > 1 else 0
    if n < MIN_SHARED or model.hooked or dev.type != "cpu":
        return 0, None
    shared = KVCache(model.config, 1, n, model.model.embed_tokens.weight.dtype, dev)
    with torch.no_grad():
        model(torch.tensor([prompts[0][:n]], device=dev), cache=shared, logits_to_keep=1, return_hidden=True)
    return n, shared


def shared_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest prefix common to every sequence, leaving each at least one token of its own."""
    n = 0
    for column in zip(*seqs):
        if any(t != column[0] for t in column):
            break
        n += 1
    return min(n, min(len(s) for s in seqs) - 1)


def letter_probs_after(model, cache: KVCache, continuations: list[list[int]], ids: list[int],
                       rows: list[int] | None = None) -> torch.Tensor:
    """letter_probs after row rows[i] (default: row i) of the cache continued by continuations[i]: only the new
    tokens are read, from a fork (the cache itself is left as it was). The continuations are right-padded; each
    row's own last token is where its letter is read."""
    dev = model.model.embed_tokens.weight.device
    x, mask = pad_right(continuations, dev)
    fork = cache.fork(list(range(len(continuations))) if rows is None else rows, x.shape[1])
    with torch.no_grad():
        logits = model(x, attention_mask=mask, cache=fork, logits_to_keep=(mask.sum(1) - 1)[:, None])[:, 0]
    return logits.float().log_softmax(-1)[:, ids].softmax(-1).cpu()


LOGITS_BUDGET = 2 ** 25   # floats of (rows, positions, vocab) logits held at once while scoring options (128 MB)


def split_continuation(tok, context: str, continuation: str, ctx=None) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as the model reads them joined (the lm-evaluation-harness rule:
    encode the whole, then cut at the length of the encoded context). ctx: tok.encode(context), if already made."""
    ctx = tok.encode(context) if ctx is None else ctx
    whole = tok.encode(context + continuation)
    if not continuation or len(whole) <= len(ctx):
        raise ValueError(f"continuation {continuation!r} adds no tokens after {context[-40:]!r}")
    return ctx, whole[len(ctx):]


def option_logprobs(model, contexts: list[list[int]], options: list[list[list[int]]],
                    token_budget: int = 4096) -> list[list[float]]:
    """Summed log-probability of every option's tokens after its context: [[logp(option j | context i)]].

    Each context is read once (left-padded batches, KV cache kept); then all its options continue from copies
    of that cache as right-padded rows, instead of one pass over context + option per option.
    """
    dev = model.model.embed_tokens.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    out = [[0.0] * len(o) for o in options]
    for batch in batches_by_length([len(c) for c in contexts], token_budget):
        longest_opt = max(len(o) for i in batch for o in options[i])
        x, mask = pad_left([contexts[i] for i in batch], dev)
        cache = KVCache(model.config, len(batch), x.shape[1], dtype, dev)
        with torch.no_grad():
            first = model(x, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1].float().log_softmax(-1)
        rows = [(b, i, j) for b, i in enumerate(batch) for j in range(len(options[i]))]
        step = max(1, LOGITS_BUDGET // (longest_opt * first.shape[-1]))   # rows whose fp32 logits fit the budget
        for r0 in range(0, len(rows), step):
            chunk = rows[r0: r0 + step]
            opts = [options[i][j] for _, i, j in chunk]
            ids, omask = pad_right(opts, dev)
            L = ids.shape[1]
            src = torch.tensor([b for b, _, _ in chunk], device=dev)
            lp = first[src].gather(1, ids[:, :1]).squeeze(1)                   # option token 0 | context
            if L > 1:   # token t | context + option[:t], read from a fork of the context's cache
                fork = cache.fork(src, L)
                with torch.no_grad():
                    logits = model(ids[:, :-1], attention_mask=omask[:, :-1], cache=fork).float()
                tok_lp = logits.gather(2, ids[:, 1:, None]).squeeze(2) - logits.logsumexp(-1)   # (R, L-1)
                lp = lp + (tok_lp * omask[:, 1:]).sum(1)
            for (_, i, j), v in zip(chunk, lp.tolist()):
                out[i][j] = v
    return out


def mc_loglik(model, tok, contexts: list[str], options: list[list[str]]):
    """Log-likelihood of each option string after its context (shared-prefix scoring)."""
    ctx_ids = [tok.encode(c) for c in contexts]                 # once per context, not once per option
    opt_ids = [[split_continuation(tok, c, o, ctx)[1] for o in opts]
               for c, ctx, opts in zip(contexts, ctx_ids, options)]
    return option_logprobs(model, ctx_ids, opt_ids)


def replies(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy replies to token-id prompts, generated in batches of similar length, stopped at end of turn, decoded.
    A prefix every prompt shares (a judge's rubric) is read once and each batch continues a fork of its cache, where
    letter_probs would (read_shared_prefix)."""
    n, shared = read_shared_prefix(model, prompts)
    out = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for batch in (order[b: b + batch_size] for b in range(0, len(order), batch_size)):
        rest = [prompts[i][n:] for i in batch]
        cache = None if shared is None else shared.fork([0] * len(batch), max(map(len, rest)) + max_new_tokens)
        new = generate(model, rest, max_new_tokens=max_new_tokens, stop_ids=tok.eos_ids, cache=cache)
        for i, r in zip(batch, new):
            out[i] = tok.decode(r, skip_special=True)
    return out


# A local judge: the model under test (--judge=self) or another checkpoint, asked as lab.judge.Judge asks any judge:
# one prompt per chat, its rubric's system message first, greedy, a few tokens. Its forward runs unhooked, so a self
# judge grades a steered model's replies as the unsteered model.
def local_ask(model, tok, fmt, batch_size: int = 16):
    """ask(prompts, system, max_tokens, prefill) -> [(reply, None)] for lab.judge.Judge: each reply is what follows
    the rubric's prefill in the judge's answer. fmt: the judge's chat format, without the model-under-test's --system
    (the rubric brings its own)."""
    def ask(prompts: list[str], system: str = "", max_tokens: int = 16, prefill: str = "") -> list[tuple[str, None]]:
        head = [{"role": "system", "content": system}] if system else []
        ids = [tok.encode(fmt(head + user(p), prefill=prefill)) for p in prompts]
        with unhooked(model):
            return [(r, None) for r in replies(model, tok, ids, max_tokens, batch_size)]
    ask.fmt = fmt     # the chat format the judge is asked in (tests check it carries no --system)
    return ask



def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, punctuation and the articles a/an/the removed, spaces collapsed;
    thousands separators dropped first ("1,250" -> "1250")."""
    text = re.sub(r"[^\w\s]", " ", re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower()))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def gold_match(text: str, aliases: list[str]) -> bool:
    """Whether a free-form answer states a gold answer: some alias, normalized, appears in the normalized text as
    whole words ("The capital is Paris." matches "Paris"; "Parisian" does not)."""
    said = f" {normalize_answer(text)} "
    return any(f" {a} " in said for a in map(normalize_answer, aliases) if a)
