"""Decoding with the decoder of `qwen2.py`: sampling, `generate`, `chat`.

As gpt-fast splits them, the model file holds the network and its loading; this file holds
what runs it token by token:
- `sample`: greedy at temperature 0, else softmax(logits / T) with optional nucleus (top-p).
- `generate`: batched, left-padded decoding with a preallocated `qwen2.KVCache`.
- `chat`: ChatML conversations in, the replies' text out (the end-of-turn cut in `reply_text`).
Speculative decoding (Table 1's row) is experiments/speculative.py.
"""
import functools

import torch
from tqdm import tqdm

from qwen2 import KVCache, Qwen2, Tokenizer


def left_pad(sequences: list[list[int]], pad_token_id: int, device="cpu"):
    """Token lists -> ids (B, T_max) padded on the left, attention_mask (B, T_max) 1 = token."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for row, s in enumerate(sequences):
        if s:
            ids[row, T - len(s):], mask[row, T - len(s):] = torch.tensor(s), 1
    return ids.to(device), mask.to(device)



def sample(logits, temperature: float, top_p: float = 1.0, generator=None):
    """Next token (B,) from logits (B, V): argmax at temperature 0; else multinomial sampling
    (§5.1: tau_temp = 0.7) from softmax(logits / temperature), restricted to the smallest set of
    most likely tokens whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # the tokens before it already reach top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Qwen2, input_ids, max_new_tokens: int, temperature: float = 0.7, top_p: float = 1.0,
             eos_token_id=..., attention_mask=None, generator=None):
    """Continue input_ids (B, T), left padded, -> (B, T + n), n <= max_new_tokens.

    eos_token_id: int or list; `...` = model.config.eos_token_id; None = never stop. A row that
    produced an eos id is continued with the first eos id; decoding ends when all rows have.
    """
    if eos_token_id is ...:
        eos_token_id = model.config.eos_token_id
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    B, T = input_ids.shape
    device = input_ids.device
    cache = KVCache(model.config, B, T + max_new_tokens, model.model.norm.weight.dtype, device)  # the compute dtype
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: plain causal attention is faster
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.long(), attention_mask.new_ones(B, max_new_tokens)], 1)
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)
    out[:, :T] = input_ids
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, n = input_ids, T
    for _ in range(max_new_tokens):
        hidden = model.model(tokens, None if attention_mask is None else attention_mask[:, :n], cache)
        next_token = sample(model.lm_head(hidden[:, -1]), temperature, top_p, generator)  # (B,)
        if eos:
            next_token = torch.where(done, eos[0], next_token)
            done |= torch.isin(next_token, eos_ids)
        out[:, n] = next_token
        n += 1
        if eos and bool(done.all()):
            break
        tokens = next_token[:, None]
    return out[:, :n]


@functools.lru_cache(maxsize=8)
def stop_token_ids(tokenizer: Tokenizer, stop: str) -> tuple[int, ...]:
    """Every vocabulary id whose text contains `stop` ("]" is also in "].", "])"): a reply asked
    to stop at `stop` ends at any of them, however the model tokenizes the closing text."""
    return tuple(i for i in range(tokenizer.tokenizer.get_vocab_size()) if stop in tokenizer.decode([i]))


def end_ids(tokenizer: Tokenizer, stop: str = "") -> list[int]:
    """The ids that end a reply: the end-of-turn / eos ids first (`generate` fills a finished
    row with the first), then those of `stop`'s text."""
    return list(tokenizer.eos_token_ids) + list(stop_token_ids(tokenizer, stop) if stop else ())


def reply_text(tokenizer: Tokenizer, new_ids: list[int], stop: str = "") -> tuple[str, int | None]:
    """The end-of-turn cut: (the text of the generated ids before the first end-of-turn / eos id,
    or before the first `stop` text; the index of the id that ended it, None when the reply ran
    out of tokens first)."""
    ends = set(end_ids(tokenizer, stop))
    end = next((j for j, t in enumerate(new_ids) if t in ends), None)
    text = tokenizer.decode(new_ids if end is None else new_ids[:end + 1])  # an eos id decodes to ""
    return (text.split(stop)[0] if stop else text), end


def chat(model: Qwen2, tokenizer: Tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
         temperature: float = 0.7, seed: int = 0, batch_size: int = 8, desc: str | None = None,
         reply_prefix: str | list[str] = "", stop: str = "") -> list[str]:
    """Reply to each conversation (ChatML messages); the text up to the end-of-turn token, stripped.

    Conversations are batched by prompt length (less padding); one generator seeded with `seed`.
    `reply_prefix` (one for all, or one per conversation) is written as the start of the
    assistant's turn and kept in the reply: it steers a small model into a format. `stop` ends
    a reply before the first occurrence of that text (OpenAI's `stop`).
    """
    new_tokens = getattr(model, "new_tokens", None)  # an encoder-decoder (t5.T5) decodes its own way
    prefixes = [reply_prefix] * len(conversations) if isinstance(reply_prefix, str) else list(reply_prefix)
    if new_tokens and any(prefixes):
        raise ValueError("generate.chat: a reply prefix needs a decoder-only model")
    device = next(model.parameters()).device
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(c) + p) for c, p in zip(conversations, prefixes)]
    ends = end_ids(tokenizer, stop)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    generator = torch.Generator(device).manual_seed(seed)
    replies = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="conv") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = left_pad([prompts[i] for i in rows], tokenizer.pad_token_id, device)
            kwargs = dict(eos_token_id=ends, attention_mask=mask, generator=generator)
            out = (new_tokens(ids, max_new_tokens, temperature, **kwargs) if new_tokens
                   else generate(model, ids, max_new_tokens, temperature, **kwargs)[:, ids.shape[1]:])
            for i, new in zip(rows, out.tolist()):
                replies[i] = (prefixes[i] + reply_text(tokenizer, new, stop)[0]).strip()
            bar.update(len(rows))
    return replies
