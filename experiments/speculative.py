"""Speculative decoding, Table 1's row (sec. 5.1): a drafter proposes gamma tokens, the target
verifies them by exact rejection sampling (Leviathan et al., 2023), so the output follows the
target's distribution. Both models keep a `qwen2.KVCache`, cut back after each verification.
"""
import torch
import torch.nn.functional as F

from qwen2 import KVCache


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., V) logits -> (..., V) sampling distribution; temperature 0 gives the one-hot argmax,
    so greedy decoding is the special case where every distribution is a point mass."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


def speculative_step(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[int, int]:
    """Verify gamma drafted tokens by rejection sampling (Leviathan et al., 2023, Algorithm 1).

    p: (gamma + 1, V) target distributions at each drafted position and one past the last;
    q: (gamma, V) draft distributions the tokens were sampled from; draft_tokens: (gamma,).
    Token i is accepted with probability min(1, p_i(x) / q_i(x)); at the first rejection the
    next token is drawn from norm(max(0, p_i - q_i)); if all are accepted a bonus token is
    drawn from p_gamma. Every emitted token is then distributed exactly as under p.
    Returns (number of drafted tokens accepted, the next token).
    """
    for i, x in enumerate(draft_tokens.tolist()):
        r = torch.rand((), generator=generator).item()  # U[0, 1)
        if r * q[i, x] < p[i, x]:  # r < p/q without dividing (q[i, x] > 0: x was drawn from q_i)
            continue
        residual = (p[i] - q[i]).clamp(min=0)  # (V,) nonzero: a rejection implies p_i != q_i
        return i, torch.multinomial(residual / residual.sum(), 1, generator=generator).item()
    return len(draft_tokens), torch.multinomial(p[-1], 1, generator=generator).item()


@torch.no_grad()
def speculative_generate(target, draft, input_ids: torch.Tensor, max_new_tokens: int,
                         gamma: int = 4, temperature: float = 0.7, eos_token_id=None,
                         generator: torch.Generator | None = None, vocab_size: int | None = None):
    """Speculative decoding at batch size 1: `draft` proposes gamma tokens, `target` scores them
    all in one forward, `speculative_step` keeps a prefix; output ~ target's distribution.

    Roles (our reading of sec. 5.1): "a non-personalized LLM on cloud to assist a personalized
    LM on device", run with HF's assisted generation, where the assistant model drafts and the
    assisted model is the target. So the cloud model drafts and the personalized device model
    verifies: only then is the output the personalized model's, as the row's place among the
    on-device personalized methods requires (device drafts / cloud verifies would reproduce
    M_cloud's distribution). Roles are arguments; `target=cloud, draft=device` is the standard
    small-drafts reading. Exact sampling makes the output distribution the target's alone: the
    drafter changes the acceptance rate and the speed, not the quality.

    Both models must share a tokenizer; vocab sizes may differ only by padding rows, and then
    `vocab_size` (the tokenizer's size) cuts both distributions to the real tokens.
    Both models keep a `qwen2.KVCache`; after each verification the caches are cut back to the
    accepted prefix (its seq_len cut back), nothing is recomputed.
    input_ids: (1, T). Returns (ids (1, T + new), stats dict with acceptance_rate =
    accepted / drafted tokens).
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate: batch size 1 only, got input_ids {tuple(input_ids.shape)}")
    V_t, V_d = target.config.vocab_size, draft.config.vocab_size
    if vocab_size is None and V_t != V_d:
        raise ValueError(f"speculative_generate: target vocab {V_t} != draft vocab {V_d}; the models "
                         f"must share a tokenizer, then pass vocab_size=<the tokenizer's size>")
    V = vocab_size or V_t
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    ids = input_ids[0].tolist()
    max_len = len(ids) + max_new_tokens + gamma + 1
    cache_t, cache_d = (KVCache(m.config, 1, max_len, m.model.norm.weight.dtype, input_ids.device)
                        for m in (target, draft))

    def forward(model, cache, tokens):  # tokens after the cached prefix -> (len(tokens), V) logits
        x = torch.tensor([tokens], dtype=torch.long, device=input_ids.device)
        return model(x, cache=cache)[0, :, :V]

    # Each cache holds a prefix of `ids`; every forward feeds the tokens it has not seen yet
    # (the whole prompt at the first round, then one or two tokens).
    n_new = drafted = accepted = target_calls = 0
    while n_new < max_new_tokens:
        g = min(gamma, max_new_tokens - n_new - 1)  # so accepted + bonus never overshoots
        drafts, q = [], []
        for _ in range(g):
            q_i = probabilities(forward(draft, cache_d, (ids + drafts)[cache_d.seq_len:])[-1], temperature)
            drafts.append(torch.multinomial(q_i, 1, generator=generator).item())
            q.append(q_i)  # (V,)
        logits = forward(target, cache_t, ids[cache_t.seq_len:] + drafts)[-(g + 1):]  # (g + 1, V)
        p = probabilities(logits, temperature)
        q = torch.stack(q) if q else p.new_zeros(0, V)  # (g, V)
        n_accepted, next_token = speculative_step(p, q, torch.tensor(drafts, dtype=torch.long), generator)
        new = drafts[:n_accepted] + [next_token]
        ids += new
        n_new += len(new)
        drafted, accepted, target_calls = drafted + g, accepted + n_accepted, target_calls + 1
        # Roll back: positions past the accepted prefix hold rejected drafts (cut back, no recompute).
        for cache in (cache_t, cache_d):
            cache.seq_len = min(cache.seq_len, len(ids) - 1)  # forget the rejected positions
        hit = [i for i, t in enumerate(new) if t in eos]
        if hit:
            del ids[len(ids) - len(new) + hit[0] + 1:]
            break
    stats = {"drafted": drafted, "accepted": accepted, "target_calls": target_calls,
             "acceptance_rate": accepted / drafted if drafted else float("nan"),
             "new_tokens": len(ids) - input_ids.shape[1]}
    return torch.tensor([ids], dtype=torch.long, device=input_ids.device), stats


def check_shared_tokenizer(tokenizer, other, what: str = "teacher") -> None:
    """Distillation and speculative decoding compare distributions token id by token id, so
    both models must use one vocabulary (Qwen2.5-0.5B and -3B do; SmolLM2 and Qwen2.5 do not)."""
    if tokenizer.tokenizer.get_vocab() != other.tokenizer.get_vocab():
        raise ValueError(f"the {what} model's tokenizer differs from the device model's "
                         f"({other.tokenizer.get_vocab_size()} vs {tokenizer.tokenizer.get_vocab_size()} "
                         f"tokens, or other ids): both models must share one tokenizer")
