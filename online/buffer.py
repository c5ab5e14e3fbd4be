"""On-device online data selection (Qin et al., DAC'24): which items a small device keeps.

The device sees the user's items one at a time and may store only `capacity` of them (64 in
the authors' setup). Each item gets three self-supervised scores, none needing a label:

  EOE  entropy of embedding: how spread out the device model's last-token hidden state is,
       normalised by log2 of the item's token count                       -> `eoe`
  DSS  domain-specific score: the share of the item's words found in the best-matching
       domain lexicon (which also gives the item its domain)              -> `dss`
  IDD  in-domain dissimilarity: 1 - mean cosine similarity to the buffer items of the same
       domain                                                             -> `idd`

`OnlineBuffer` keeps everything until it is full; then a new item replaces the buffer's
lowest-scoring item only if the new item scores higher (the paper's intent: keep the most
representative data; the authors' released script compares the other way round, which
would fill the buffer with the least representative items). Only the kept items are later
annotated and expanded by the LLM; `rouge1_filter` is the paper's ROUGE-1 check on the
synthesized pairs. `random_buffer` (reservoir sampling) is the random baseline.
`keep_history` is the device's pass over a user's history (`python -m online --buffer N`) and
`rouge1_select` the synthesis check in the shape of `filters.select` (`--synthesis-filter rouge1`).

Definitions the paper leaves open are made here and named where they are made: the histogram
bins and range (`eoe`), the single-token case (`eoe`), the word tokenizer and the lexicons
(`dss`, `LAMP_LEXICONS`), the empty-domain case (`idd`), how the three scores combine and
when IDD is recomputed (`OnlineBuffer`).
"""
import math
import random

import torch
import torch.nn.functional as F

from filters import Selection
from generate import left_pad
from metrics import rouge_1, rouge_tokens

EOE_BINS = 64  # histogram bins for EOE; max entropy log2(64) = 6 bits
GENERAL = "general"  # domain of an item that matches no lexicon word
EPS_ROUGE1 = 0.2  # rouge1_select's default threshold; see its docstring

# Hand-written seed lexicons, one domain per kind of LaMP profile text (LaMP-1 and LaMP-5
# both hold paper titles/abstracts, so they share "science"). The authors' lexicons are not
# public: these lists were written for this implementation from what each task's profile
# text talks about (paper abstracts, movie plot summaries, product reviews, HuffPost news,
# tweets), not learned from data. The domains share no word, so a hit names one domain.
LAMP_LEXICONS = {
    "science": {  # lamp1 (citation), lamp5 (scholarly title): titles and abstracts
        "algorithm", "algorithms", "model", "models", "method", "methods", "network",
        "networks", "learning", "data", "analysis", "proposed", "propose", "approach",
        "performance", "experimental", "experiments", "evaluation", "framework",
        "optimization", "theory", "theoretical", "simulation", "computational", "empirical",
        "novel", "paper", "estimation", "distributed", "neural", "parameters",
        "probabilistic", "graph", "efficient", "scheme", "protocol",
    },
    "movies": {  # lamp2 (movie tagging): plot descriptions
        "film", "films", "movie", "movies", "story", "character", "characters", "director",
        "plot", "scene", "hero", "villain", "murder", "detective", "alien", "planet",
        "kingdom", "revenge", "haunted", "survival", "quest", "romance", "comedy", "drama",
        "thriller", "horror", "starring", "sequel", "adventure", "discovers", "mysterious",
        "battle", "escape", "journey", "falls",
    },
    "products": {  # lamp3 (product rating): product reviews
        "product", "quality", "price", "bought", "buy", "purchase", "purchased",
        "recommend", "recommended", "works", "worked", "easy", "fit", "size", "battery",
        "shipping", "delivered", "arrived", "return", "returned", "stars", "review", "cheap",
        "money", "worth", "amazon", "item", "ordered", "box", "sturdy", "broke",
        "disappointed", "durable", "excellent",
    },
    "news": {  # lamp4 (news headline): news articles
        "president", "government", "officials", "police", "report", "reported", "said",
        "city", "country", "million", "billion", "percent", "election", "campaign",
        "senate", "congress", "court", "law", "policy", "economy", "market", "company",
        "health", "according", "announced", "public", "national", "federal", "trump",
        "obama", "state", "states", "women", "school",
    },
    "social": {  # lamp7 (tweet paraphrasing): tweets
        "lol", "im", "u", "love", "today", "tonight", "tomorrow", "morning", "night", "haha",
        "omg", "gonna", "wanna", "happy", "sad", "miss", "tired", "sleep", "twitter",
        "tweet", "followers", "follow", "fun", "hate", "weekend", "bed", "wish", "thanks",
        "ur", "yay", "cant", "dont", "ugh", "hope",
    },
}


def eoe(embedding: torch.Tensor, n_tokens: int, bins: int = EOE_BINS) -> float:
    """Entropy of embedding (EOE): H(histogram of the embedding's values) / log2(n_tokens).

    embedding: (H,), the device model's last-token hidden state of the item. Its H values
    are put into `bins` equal-width bins spanning min..max of this vector (the maximum goes
    into the last bin); p_b = count_b / H and H = -sum_b p_b log2 p_b bits (0 log 0 = 0).
    A constant vector has entropy 0. The divisor is log2(n_tokens), defined as 1 when
    n_tokens = 1 (log2 1 = 0), so a one-token item gets its unnormalised entropy.
    Worked example: [0, 1, 2, 3], 4 bins, 4 tokens -> one value per bin, 2 bits / 2 = 1.0.
    """
    x = embedding.detach().reshape(-1).double().cpu()  # (H,)
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise ValueError(f"eoe: embedding must be non-empty and finite, got shape {tuple(embedding.shape)}")
    if n_tokens < 1:
        raise ValueError(f"eoe: n_tokens must be >= 1, got {n_tokens}")
    lo, hi = x.min(), x.max()
    if hi == lo:
        return 0.0
    index = ((x - lo) / (hi - lo) * bins).floor().long().clamp(max=bins - 1)  # (H,) bin of each value
    p = torch.bincount(index, minlength=bins).double() / x.numel()  # (bins,)
    p = p[p > 0]
    entropy = -(p * p.log2()).sum().item()
    return entropy / max(math.log2(n_tokens), 1.0)


def dss(text: str, lexicons: dict[str, set[str]] = LAMP_LEXICONS) -> tuple[str, float]:
    """Domain-specific score (DSS): the item's best domain and the share of its words in it.

    Words are `metrics.rouge_tokens` (lowercase runs of [a-z0-9]: "I'm" -> "i", "m").
    score_d = (number of the item's words, counted with repetition, that are in lexicon d)
    / (number of the item's words). The item's domain is the d with the highest score (ties:
    the first domain in `lexicons` order). An item with no lexicon word at all (or no word)
    gets (GENERAL, 0.0), so items that fit no domain are compared with each other by IDD.
    Example: "The film plot is a murder story" -> 7 words, 4 in "movies" -> 4/7.
    """
    tokens = rouge_tokens(text)  # lowercase runs of [a-z0-9], as ROUGE splits words
    best, best_score = GENERAL, 0.0
    for domain, lexicon in lexicons.items():
        score = sum(t in lexicon for t in tokens) / len(tokens) if tokens else 0.0
        if score > best_score:
            best, best_score = domain, score
    return best, best_score


def idd(embedding: torch.Tensor, others: torch.Tensor) -> float:
    """In-domain dissimilarity (IDD): 1 - mean cosine similarity of `embedding` (H,) to
    `others` (M, H), the buffer items of the same domain. With no such item (M = 0) IDD is
    defined as 1.0 (as if the mean similarity were 0): the item is new to its domain.
    Range [0, 2]; example: e = [1, 0] vs [[1, 0], [0, 1]] -> 1 - (1 + 0) / 2 = 0.5."""
    others = others.reshape(-1, embedding.numel()).float()  # (M, H)
    if others.shape[0] == 0:
        return 1.0
    cos = F.cosine_similarity(embedding.reshape(1, -1).float(), others, dim=-1)  # (M,)
    return 1.0 - cos.mean().item()


def _rank01(scores: torch.Tensor) -> torch.Tensor:
    """Ranks of each row's entries scaled to [0, 1], ties sharing their average rank.
    scores: (S, n) -> (S, n); the lowest gets 0, the highest 1 (n = 1: all 0)."""
    less = (scores[:, None, :] < scores[:, :, None]).sum(-1)  # (S, n) how many are lower
    equal = (scores[:, None, :] == scores[:, :, None]).sum(-1)  # (S, n) counts itself
    return (less + 0.5 * (equal - 1)).double() / max(scores.shape[1] - 1, 1)


class OnlineBuffer:
    """A fixed-capacity buffer filled online by EOE, DSS and IDD (Qin et al., DAC'24).

    `add` takes one item at a time. While the buffer has fewer than `capacity` items, every
    item is kept. Once it is full, the new item and the `capacity` buffer items (the pool
    of capacity + 1 candidates) are scored:
      - EOE and DSS are the item's own, computed once on arrival;
      - IDD is recomputed at every comparison from the current buffer: a buffer item against
        the other buffer items of its domain, the new item against all buffer items of its
        domain. So after a replacement the remaining items' IDD reflects the new buffer.
    The three scores live on different scales (EOE in bits per log2-token, DSS a share,
    IDD in [0, 2]), so they are combined by rank: each score is ranked within the pool and
    scaled to [0, 1] (ties share their average rank), and the combined score is
    w_eoe * rank(EOE) + w_dss * rank(DSS) + w_idd * rank(IDD) with `weights` = (w_eoe,
    w_dss, w_idd), default (1, 1, 1). The new item replaces the lowest-combined buffer item
    only if its own combined score is strictly HIGHER (the paper's intent; the authors'
    released script compares the other way round). If several buffer items share the lowest
    score, one of them is chosen with a `random.Random(seed)` generator, so the same stream
    and seed always give the same buffer.

    `.items` holds the kept items in arrival order; `.scores()` their current scores.
    """

    def __init__(self, capacity: int = 64, lexicons: dict[str, set[str]] = LAMP_LEXICONS,
                 weights: tuple[float, float, float] = (1.0, 1.0, 1.0), bins: int = EOE_BINS,
                 seed: int = 0):
        if capacity < 1:
            raise ValueError(f"OnlineBuffer: capacity must be >= 1, got {capacity}")
        if len(weights) != 3:
            raise ValueError(f"OnlineBuffer: weights must be (w_eoe, w_dss, w_idd), got {weights}")
        self.capacity, self.lexicons, self.bins = capacity, lexicons, bins
        self.weights = torch.tensor(weights, dtype=torch.float64)  # (3,)
        self.rng = random.Random(seed)
        self._items, self._domains, self._eoe, self._dss, self._emb = [], [], [], [], []
        self.n_seen = 0  # items offered to `add`
        self.n_replaced = 0  # buffer items evicted by a higher-scoring new item

    @property
    def items(self) -> list:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def _buffer_idd(self) -> list[float]:
        """IDD of every buffer item against the other buffer items of its domain."""
        emb = torch.stack(self._emb)  # (C, H)
        return [idd(emb[i], emb[[j for j, d in enumerate(self._domains) if d == domain and j != i]])
                for i, domain in enumerate(self._domains)]

    def scores(self) -> list[dict]:
        """Per kept item, in arrival order: domain, EOE, DSS and IDD against the buffer now."""
        idd_now = self._buffer_idd() if self._items else []
        return [{"domain": d, "eoe": e, "dss": s, "idd": i}
                for d, e, s, i in zip(self._domains, self._eoe, self._dss, idd_now)]

    def add(self, item, embedding: torch.Tensor, n_tokens: int, text: str | None = None) -> bool:
        """Offer one item; returns whether the buffer kept it.

        item: anything (kept as is); text: the text DSS reads (default: `item`, which must
        then be a str); embedding: (H,) the device model's last-token hidden state of the
        text (`embed_items`); n_tokens: the text's token count (for EOE).
        """
        if text is None:
            if not isinstance(item, str):
                raise ValueError(f"OnlineBuffer.add: item {self.n_seen} is a {type(item).__name__}, "
                                 "not a str: pass its text as text=")
            text = item
        e = embedding.detach().reshape(-1).float().cpu()  # (H,)
        if embedding.dim() != 1 or (self._emb and e.numel() != self._emb[0].numel()):
            raise ValueError(f"OnlineBuffer.add: item {self.n_seen} embedding has shape "
                             f"{tuple(embedding.shape)}, expected ({self._emb[0].numel() if self._emb else 'H'},)")
        eoe_new = eoe(e, n_tokens, self.bins)
        domain_new, dss_new = dss(text, self.lexicons)
        self.n_seen += 1
        if len(self._items) < self.capacity:  # not full: keep everything
            self._append(item, domain_new, eoe_new, dss_new, e)
            return True

        emb = torch.stack(self._emb)  # (C, H)
        idd_new = idd(e, emb[[i for i, d in enumerate(self._domains) if d == domain_new]])
        raw = torch.tensor([self._eoe + [eoe_new], self._dss + [dss_new],
                            self._buffer_idd() + [idd_new]], dtype=torch.float64)  # (3, C+1)
        combined = self.weights @ _rank01(raw)  # (C+1,)
        lowest = combined[:-1].min()
        if not combined[-1] > lowest + 1e-12:  # the new item must score strictly higher
            return False
        tied = (combined[:-1] <= lowest + 1e-12).nonzero().flatten().tolist()
        victim = tied[0] if len(tied) == 1 else self.rng.choice(tied)
        for store in (self._items, self._domains, self._eoe, self._dss, self._emb):
            del store[victim]
        self._append(item, domain_new, eoe_new, dss_new, e)  # newest arrival goes last
        self.n_replaced += 1
        return True

    def _append(self, item, domain: str, eoe_value: float, dss_value: float, e: torch.Tensor):
        self._items.append(item)
        self._domains.append(domain)
        self._eoe.append(eoe_value)
        self._dss.append(dss_value)
        self._emb.append(e)


def random_buffer(items: list, capacity: int, seed: int = 0) -> list:
    """The random baseline: a uniform sample of `capacity` items from the stream, drawn
    online by reservoir sampling (Vitter's algorithm R: item i >= capacity replaces a random
    slot with probability capacity / (i + 1)); returned in arrival order."""
    if capacity < 1:
        raise ValueError(f"random_buffer: capacity must be >= 1, got {capacity}")
    rng = random.Random(seed)
    reservoir = []  # arrival indices
    for i in range(len(items)):
        if i < capacity:
            reservoir.append(i)
        else:
            j = rng.randrange(i + 1)
            if j < capacity:
                reservoir[j] = i
    return [items[i] for i in sorted(reservoir)]


@torch.inference_mode()
def embed_items(model, tokenizer, texts: list[str], batch_size: int = 8) -> torch.Tensor:
    """The device model's embedding of each text: the final-norm hidden state at its last
    token, (N, H) float32 on the CPU. Texts are batched by length and left padded, so the
    last position of every row is its last real token; pad positions are masked out."""
    ids = [tokenizer.encode(t) for t in texts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"embed_items: text {i} encodes to no tokens: {texts[i]!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError("embed_items: the tokenizer has no pad_token_id")
    device = next(model.parameters()).device
    out = torch.empty(len(texts), model.config.hidden_size)  # (N, H)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        input_ids, mask = left_pad([ids[i] for i in batch], tokenizer.pad_token_id, device)  # (B, T) each
        hidden = model.model(input_ids, attention_mask=mask)  # (B, T, H)
        out[batch] = hidden[:, -1].float().cpu()
    return out


def rouge1_filter(source: str, generated: list[str], threshold: float) -> tuple[list[float], list[bool]]:
    """The synthesis check of Qin et al.: a generated text is kept when its ROUGE-1 F-measure
    against the source text it was generated from is above `threshold` (strictly).
    Returns (ROUGE-1 of each generated text, whether it is kept), both in input order."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"rouge1_filter: threshold must be in [0, 1], got {threshold}")
    scores = [rouge_1(g, source) for g in generated]
    return scores, [s > threshold for s in scores]


def rouge1_select(pairs: list[tuple[str, str]], candidates, judge=None, settings=None,
                  threshold: float = EPS_ROUGE1) -> Selection:
    """`rouge1_filter` over step 2's candidates (`data.Candidates`), in the shape of
    `filters.select` (same arguments, the judge and settings unused; same record and count keys
    for the fields both have), so a row can take either as its step 3.

    As in eq. 2-4 the inputs are compared: x_syn is kept when ROUGE-1 F(x_syn, x) > threshold
    (the response of LaMP-1/2/3 is a label). Qin et al. give no threshold; EPS_ROUGE1 = 0.2
    sits between what `bench/bench_filters.py` measures for paraphrases and for unrelated
    texts of the same genre (figures in RESULTS.md).
    Unlike TDF (eq. 3), a high ROUGE-1 is never rejected: near-copies are kept.
    Each record: {"input", "output", "syn_input", "syn_output", "rouge_1", "kept"}."""
    records, kept = [], []
    for i, (x_syn, y_syn) in zip(candidates.source, candidates.pairs):
        x, y = pairs[i]
        (score,), (ok,) = rouge1_filter(x, [x_syn], threshold)
        records.append({"input": x, "output": y, "syn_input": x_syn, "syn_output": y_syn,
                        "rouge_1": score, "kept": ok})
        if ok:
            kept.append((x_syn, y_syn))
    n = len(candidates.pairs)
    counts = {"candidates": n, "kept": len(kept), "rejected": n - len(kept), "rejected_rouge1": n - len(kept)}
    return Selection(kept, records, counts | candidates.counts, {"filter": "rouge1", "eps_rouge1": threshold})


def keep_history(model, tokenizer, texts: list[str], capacity: int, policy: str = "scores",
                 seed: int = 0) -> tuple[list[int], dict]:
    """The device's pass over a user's history, oldest item first, through a buffer of
    `capacity` items: returns (indices of the kept items in arrival order, summary).

    policy "scores": `OnlineBuffer` on the device model's embeddings (`embed_items`, which
    sees all texts at once only to batch the forward passes; the buffer still decides one
    item at a time, in order). policy "random": `random_buffer` (reservoir sampling).
    The summary holds the counts and, for "scores", each kept item's EOE, DSS, IDD."""
    if policy not in ("scores", "random"):
        raise ValueError(f"keep_history: policy must be 'scores' or 'random', got {policy!r}")
    summary = {"policy": policy, "capacity": capacity, "seen": len(texts)}
    if policy == "random":
        kept = random_buffer(list(range(len(texts))), capacity, seed)
        return kept, summary | {"kept": len(kept)}
    buffer = OnlineBuffer(capacity, seed=seed)
    for i, (text, e) in enumerate(zip(texts, embed_items(model, tokenizer, texts))):
        buffer.add(i, e, len(tokenizer.encode(text)), text=text)
    return buffer.items, summary | {"kept": len(buffer), "replaced": buffer.n_replaced, "scores": buffer.scores()}
