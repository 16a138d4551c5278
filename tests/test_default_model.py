"""The real embedded default model (SmolLM2-135M-Instruct): ours against transformers, token for token."""
import pytest
import torch

from chat import get_chat_format, load_tokenizer
from model import generate, load
from runtime import accelerate
from runtime.cpu import packed

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "I think 7 x 8 = 54. Am I right?", "List three uses of a paperclip."]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_greedy_continuations_equal_transformers(default_model, dtype):
    import transformers
    ours, tok = load(default_model, dtype=dtype), load_tokenizer(default_model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        default_model, dtype=ours.model.embed_tokens.weight.dtype).eval()
    fmt = get_chat_format("chatml")
    prompts = [tok.encode(fmt([{"role": "user", "content": p}])) for p in PROMPTS]
    # Ours as the scripts run it: this machine's attention kernel and decode steps (runtime.accelerate).
    # fp32: one left-padded batch, token for token. bf16: row by row, the way transformers' generate runs here. In
    # bf16 a near-tie (two logits a bf16 step apart) can flip between equivalent computations: transformers' own
    # cached decode and full forward disagree on such ties on some CPUs, and without AMX our decode steps use
    # plain_attention, not SDPA. So in bf16 the tokens must agree up to the first such tie (docs/speed.md).
    accelerate(ours, prepack=False)
    if dtype == "fp32":
        outs = generate(ours, prompts, max_new_tokens=24, stop_ids={tok.eos_id})
    else:
        outs = [generate(ours, [p], max_new_tokens=24, stop_ids={tok.eos_id})[0] for p in prompts]
    for p, got in zip(prompts, outs):
        want = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id)[0, len(p):].tolist()
        if dtype == "bf16" and got != want:
            i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            with torch.no_grad():     # both candidates scored by transformers' full forward on the shared prefix
                logits = hf(torch.tensor([p + want[:i]])).logits[0, -1].float()
            step = 2.0 ** (torch.floor(torch.log2(logits.abs().max())).item() - 7)     # bf16 spacing there
            assert abs(logits[want[i]] - logits[got[i]]) <= 2 * step, (i, tok.decode(got), tok.decode(want))
        else:
            assert got == want, (tok.decode(got), tok.decode(want))
    if dtype == "fp32":
        ids = torch.tensor([prompts[0]])
        with torch.no_grad():
            assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_paris(default_model):
    ours, tok = load(default_model, dtype="bf16"), load_tokenizer(default_model)
    ids = tok.encode(get_chat_format("chatml")([{"role": "user", "content": "What is the capital of France?"}]))
    out = tok.decode(generate(ours, [ids], max_new_tokens=20, stop_ids=tok.eos_ids)[0], skip_special=True)
    assert "Paris" in out


@pytest.mark.slow
def test_bf16_scoring_forward_equals_transformers_bit_for_bit(default_model):
    """The scoring forward make bench times (16 x 128 tokens, the last position's logits), left-padded too: in bf16
    the very bits of transformers', on any CPU, because the eager forward runs their ops on the same shapes.
    (A forward that ran the last block's output projection and MLP at the kept rows only would not be: with AMX
    a product of 16 rows takes another kernel than one of 2048.)"""
    import transformers
    ours = load(default_model, dtype="bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, ours.config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[3, :40] = mask[9, :100] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(ids, logits_to_keep=1).logits
        assert torch.equal(ours(ids, logits_to_keep=1), want)
        assert torch.equal(ours(ids, attention_mask=mask, logits_to_keep=1),
                           hf(ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits)
        # Packed as the scripts run it (--prepack): the same bits too, where this CPU's packed products equal the
        # plain ones or, with AMX, products this large keep the plain weights (docs/speed.md).
        with packed(ours):
            assert torch.equal(ours(ids, logits_to_keep=1), want)
