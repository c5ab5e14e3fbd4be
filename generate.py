"""Decoding with the decoder of `qwen2.py` (as gpt-fast splits them: the model file holds the
network, this file what runs it token by token): `sample` (greedy, or softmax(logits / T) with
top-p), `generate` (batched, left-padded, a preallocated `qwen2.KVCache`; a prompt's replies
from one prefill, scaffolds, finished rows leaving; its state a step at a time: `Replies`) and
`chat` (ChatML in, replies' text out). `chat` decodes with `generate` unless handed another
`decode`: the seam two extras share, an encoder-decoder's (experiments/t5.py) and the cloud
service's batcher, which decodes the requests in flight together (cloud/batcher.py).
Speculative decoding (Table 1's row) is experiments/speculative.py."""
import functools
import hashlib

import torch
from tqdm import tqdm

from qwen2 import KVCache, Qwen2, Tokenizer

BATCH = 80  # replies decoded together: batched decoding reads the weights once a step for all rows


def left_pad(sequences: list[list[int]], pad_token_id: int, device="cpu"):
    """Token lists -> ids (B, T_max) padded on the left, attention_mask (B, T_max) 1 = token."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for row, s in enumerate(sequences):
        if s:
            ids[row, T - len(s):], mask[row, T - len(s):] = torch.tensor(s), 1
    return ids.to(device), mask.to(device)


def sample(logits, temperature, top_p=1.0, generator=None):
    """Next token (B,) from logits (B, V): argmax at temperature 0; else a draw from softmax(logits
    / T) (sec. 5.1: T = 0.7), cut to the top-p nucleus (Holtzman et al. 2020). `temperature`,
    `top_p` (in (0, 1]): one, or one per row (B,); `generator`: one, or each row's own (its draws
    then ignore the others). Logits that cannot be sampled (a NaN, +inf, all -inf) raise
    ValueError."""
    B = logits.shape[0]
    temperature = torch.as_tensor(temperature, dtype=torch.float, device=logits.device).expand(B)
    top_p = torch.as_tensor(top_p, dtype=torch.float, device=logits.device).expand(B)
    if not bool(((top_p > 0) & (top_p <= 1)).all()):
        raise ValueError(f"sample: top_p {top_p.tolist()}: each must be in (0, 1]")
    # NaN where a row holds one, +inf where it holds one, -inf where all are -inf
    best = logits.amax(-1)
    if not bool(torch.isfinite(best).all()):
        row = int((~torch.isfinite(best)).nonzero()[0])
        what = ("a NaN" if bool(logits[row].isnan().any()) else "+inf" if float(best[row]) > 0
                else "only -inf: no token has any probability")
        raise ValueError(f"sample: row {row}'s logits hold {what}; nothing can be sampled")
    hot = temperature > 0
    if not bool(hot.any()):
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature.clamp(min=1e-6)[:, None], dim=-1)  # (B, V)
    if bool((top_p < 1).any()):  # only the rows with a nucleus: a row at top_p 1 keeps every token
        rows = (top_p < 1).nonzero().squeeze(1)
        sorted_p, order = probs[rows].sort(dim=-1, descending=True)
        # outside the nucleus: the tokens before it already reach top_p
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p[rows, None]
        kept = sorted_p.masked_fill(outside, 0.0)
        probs[rows] = torch.zeros_like(sorted_p).scatter_(-1, order, kept)
    if isinstance(generator, list):  # one uniform a row, from the row's generator
        u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator])
        u = u.to(probs.device)
    else:
        u = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    # inverse transform: the first token whose cumulative probability passes u
    cdf = probs.cumsum(-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    drawn = drawn.clamp(max=probs.shape[1] - 1)
    return torch.where(hot, drawn, logits.argmax(-1))


class Replies:
    """Replies decoded together, a token a step: `generate` runs them to their ends;
    cloud/batcher.py lets new prompts join between steps. Reply i: budget[i], second[i] (its
    phases' budgets), cap[i] (its most new ids), new[i] (its new ids), resumed[i] (where its second
    phase starts in new[i]), ends[i] (the ids that end it), fill[i] (what fills it once ended),
    scaffold[i], top_p[i], labels[i]. The batch: `live` (the unended replies, in cache order), their
    `cache`, `mask` (None: no padding), the `logits` of their next tokens. Arguments: `generate`'s;
    the prompts are prefilled here, or, with prefill=False, by the caller, a chunk of positions at
    a time (`prefill`: vLLM's chunked prefill). A step is a draw and a forward pass; a caller may
    run the pass itself (`inputs`, `outputs`), as the batcher does to share it among batches."""
    def __init__(self, model: Qwen2, input_ids, max_new_tokens, temperature=0.7, top_p: float = 1.0,
                 eos_token_id=..., attention_mask=None, generator=None, copies=None, scaffold=None,
                 scaffold_tokens: int = 0, labels=None, prefill: bool = True):
        eos = model.config.eos_token_id if eos_token_id is ... else eos_token_id
        ends = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        (B, T), device = input_ids.shape, input_ids.device
        copies = torch.as_tensor(1 if copies is None else copies, device=device)
        # each reply's prompt: prefilled once for all its replies
        self.prompt = torch.arange(B, device=device).repeat_interleave(copies)
        R = len(self.prompt)
        self.budget, self.second = ([n] * R if isinstance(n, int) else list(n)
                                    for n in (max_new_tokens, scaffold_tokens))
        longest = max(map(len, scaffold.values())) if scaffold else 0
        self.cap = [b + (longest + s if scaffold else 0) for b, s in zip(self.budget, self.second)]
        dtype = model.model.norm.weight.dtype
        self.cache = KVCache(model.config, B, T + max(self.cap), dtype, device)
        # else plain causal attention
        padded = attention_mask is not None and not bool(attention_mask.all())
        self.mask = None
        if padded:
            ones = attention_mask.new_ones(B, max(self.cap))
            self.mask = torch.cat([attention_mask.long(), ones], 1)
        self.input_ids, self.logits = input_ids, None  # the logits once the prompts are prefilled
        self.temperature = torch.as_tensor(temperature, dtype=torch.float).expand(R).to(device)
        self.model, self.generator, self.scaffold = model, generator, [scaffold] * R
        self.ends, self.fill = [frozenset(ends)] * R, [ends[0] if ends else 0] * R
        self.top_p = [top_p] * R
        self.labels = [labels] * R  # None, or a labels.LabelTrie its second part must spell
        self.live = list(range(R)) if max(self.cap) else []
        self.new, self.resumed = [[] for _ in range(R)], [None] * R
        self.spent, self.phase, self.forced = [0] * R, [0] * R, [[] for _ in range(R)]
        if prefill:
            self.prefill(T)

    def prefill(self, positions: int) -> bool:
        """The prompts' next `positions` positions into the cache; True once all are in."""
        return self.outputs(self.model.model(*self.inputs(positions), self.cache))

    def step(self):
        """Each live reply's next token (`draw`), then the logits of the token after it."""
        self.draw()
        if self.live:
            self.outputs(self.model.model(*self.inputs(), self.cache))

    def inputs(self, positions: int = 1) -> tuple:
        """The next forward pass's ids and attention mask (None: no padding): the prompts' next
        `positions` positions while they are prefilled, then each live reply's last token."""
        s = self.cache.seq_len
        if self.logits is None:
            ids = self.input_ids[:, s:s + positions]
        else:
            ids = torch.tensor([[self.new[i][-1]] for i in self.live], device=self.input_ids.device)
        return ids, None if self.mask is None else self.mask[:, :s + ids.shape[1]]

    def outputs(self, hidden) -> bool:
        """The forward pass's hidden states (B, T, H) taken in: the logits of each live reply's next
        token, once the whole prompts are in (then the prompts' cache rows are copied to their
        replies). True once prefilled."""
        if self.logits is not None:
            self.logits = self.model.lm_head(hidden[:, -1])
            return True
        if self.cache.seq_len < self.input_ids.shape[1]:
            return False
        rows = self.prompt
        self.logits = self.model.lm_head(hidden[:, -1])[rows]
        self.cache.k, self.cache.v = self.cache.k[:, rows], self.cache.v[:, rows]
        self.mask = None if self.mask is None else self.mask[rows]
        return True

    def draw(self):
        """Each live reply's next token, sampled or a scaffold's; the replies that end leave the
        batch."""
        gens = self.generator
        if isinstance(gens, list):
            gens = [gens[i] for i in self.live]
        labelled = [j for j, i in enumerate(self.live) if self.labels[i] is not None]
        logits = self.constrain(self.logits, labelled) if labelled else self.logits
        top_p = [self.top_p[i] for i in self.live]
        tokens = sample(logits, self.temperature[self.live], top_p, gens).tolist()
        done, forced = set(), self.forced
        for j, i in enumerate(self.live):
            if not forced[i]:
                self.spent[i] += 1
                ended = tokens[j] in self.ends[i]
                budget = self.budget[i] if self.phase[i] == 0 else self.second[i]
                if not (ended or self.spent[i] >= budget):
                    continue
                scaffold = self.scaffold[i]
                if not scaffold or self.phase[i] == 1:
                    done.add(j)
                    continue
                written = scaffold.get(tokens[j] if ended else None, scaffold[None])
                forced[i], self.phase[i], self.spent[i] = list(written), 1, 0
                # the first phase ends: its scaffold is written in place of its end id, or after
                # the last token its budget allowed
                if not ended:
                    continue
            tokens[j] = forced[i].pop(0)  # a scaffold id, written, not sampled
            # where the second phase starts
            self.resumed[i] = None if forced[i] else len(self.new[i]) + 1
        for j, i in enumerate(self.live):
            self.new[i].append(tokens[j])
        # at its cap (a second phase of 0)
        done |= {j for j, i in enumerate(self.live) if len(self.new[i]) >= self.cap[i]}
        self.leave(done)

    def constrain(self, logits, rows):
        """Each of these rows whose reply is past its scaffold may only go on spelling a label: its
        trie (labels.LabelTrie) masks the logits outside the labels' continuations of its second
        part, so the draw is from the softmax renormalized over them."""
        logits = logits.clone()
        for j in rows:
            i = self.live[j]
            if self.phase[i] == 1 and not self.forced[i]:
                spelled = self.new[i][self.resumed[i]:]
                logits[j:j + 1] = self.labels[i].mask(logits[j:j + 1], [spelled])
        return logits

    def leave(self, rows):
        """These rows of the batch (positions in `live`) leave it: their state is dropped, their
        cache rows overwritten in place (ended replies; the batcher's cancelled ones)."""
        if rows:
            keep = [j for j in range(len(self.live)) if j not in rows]
            self.live, self.logits = [self.live[j] for j in keep], self.logits[keep]
            self.mask = None if self.mask is None else self.mask[keep]
            self.cache.keep(keep)

    def new_ids(self, replies) -> torch.Tensor:
        """These replies' new ids, ended ones filled with their first end id: (len(replies), the
        longest)."""
        n = max(len(self.new[i]) for i in replies)
        rows = [self.new[i] + [self.fill[i]] * (n - len(self.new[i])) for i in replies]
        return torch.tensor(rows, device=self.logits.device)


@torch.inference_mode()
def generate(model: Qwen2, input_ids, max_new_tokens, temperature=0.7, top_p: float = 1.0,
             eos_token_id=...,
             attention_mask=None, generator=None, copies=None, scaffold=None,
             scaffold_tokens: int = 0, labels=None):
    """Continue input_ids (B, T), left padded -> (R, T + n), n <= the longest reply's new tokens.

    copies: replies per prompt (default one; R their sum, in order): a prompt is prefilled once and
    its keys and values copied to its replies (vLLM's `n`). max_new_tokens, scaffold_tokens,
    temperature, generator: one, or one per reply. eos_token_id: int or list (`...`: the config's;
    None: never stop); a finished reply leaves the batch, filled with the first. scaffold: {end
    id, or None for a budget run out: the ids written in its place}: at its first end a reply
    writes them and goes on from the same cache for up to scaffold_tokens more (augment.py's
    structured decoding); then the return is (ids, where each reply's second part starts among
    its new ids).
    labels: None, or a labels.LabelTrie: the second part may only spell one of its labels."""
    replies = Replies(model, input_ids, max_new_tokens, temperature, top_p, eos_token_id,
                      attention_mask, generator, copies, scaffold, scaffold_tokens, labels)
    while replies.live:
        replies.step()
    out = torch.cat([input_ids[replies.prompt], replies.new_ids(range(len(replies.new)))], 1)
    return (out, replies.resumed) if scaffold else out


@functools.lru_cache(maxsize=8)
def stop_token_ids(tokenizer: Tokenizer, stop: str) -> tuple[int, ...]:
    """Every vocabulary id whose text contains `stop` ("]" is also in "].", "])"): a reply asked
    to stop at `stop` ends at any of them, however the model tokenizes the closing text."""
    vocab = range(tokenizer.tokenizer.get_vocab_size())
    return tuple(i for i in vocab if stop in tokenizer.decode([i]))


def end_ids(tokenizer: Tokenizer, stop: str = "") -> list[int]:
    """The ids that end a reply: the end-of-turn / eos ids (`generate` fills with the first), then
    `stop`'s."""
    return list(tokenizer.eos_token_ids) + list(stop_token_ids(tokenizer, stop) if stop else ())


def reply_text(tokenizer: Tokenizer, new_ids: list[int], stop: str = "") -> tuple[str, int | None]:
    """(The new ids' text before the first end id or `stop` text, that id's index or None: no
    end.)"""
    ends = set(end_ids(tokenizer, stop))
    end = next((j for j, t in enumerate(new_ids) if t in ends), None)
    # an eos id decodes to ""
    text = tokenizer.decode(new_ids if end is None else new_ids[:end + 1])
    return (text.split(stop)[0] if stop else text), end


def reply_generator(seed: int, index: int, device="cpu") -> torch.Generator:
    """Reply `index`'s own generator, seeded by a hash of (seed, index): nearby ones draw unrelated
    streams."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") >> 1)


def scaffold_ids(tokenizer: Tokenizer, stop: str, scaffold: str) -> dict:
    """`generate`'s scaffold for replies stopped at `stop`: an id holding the stop text keeps its
    own text before it ("foo" of "foo]."), then the scaffold; an end of turn or None, the
    scaffold."""
    alone = tokenizer.encode(scaffold)
    return ({None: alone} | {i: alone for i in tokenizer.eos_token_ids}
            | {i: tokenizer.encode(tokenizer.decode([i]).split(stop)[0] + scaffold)
               for i in (stop_token_ids(tokenizer, stop) if stop else ())})


def chat(model: Qwen2, tokenizer: Tokenizer, conversations: list[list[dict]],
         max_new_tokens: int = 64, temperature=0.7, seed: int = 0, batch_size: int = 8,
         desc: str | None = None, reply_prefix: str | list[str] = "", stop: str = "",
         scaffold: str = "", scaffold_tokens: int = 0, decode=None, labels=None) -> list[str]:
    """Reply to each conversation (ChatML messages): the text up to the end of turn, stripped.

    A prompt's replies (step 2's k samples of one pair) share one prefill; batches hold about
    batch_size replies of prompts of similar length. Reply i draws from `reply_generator(seed, i)`,
    whatever the others and batch_size. `temperature`, `reply_prefix`: one, or one per
    conversation; the prefix starts the assistant's turn and stays in the reply; `stop` ends a reply
    before that text (OpenAI's); `scaffold` is written where a reply first ends (`generate`).
    decode: what decodes a batch (`generate`'s arguments but the model; default `generate` on
    `model`); labels: the scaffold's continuation spells one of them (`generate`; its end ids among
    `stop`'s)."""
    decode = decode or functools.partial(generate, model)
    one_prefix = isinstance(reply_prefix, str)
    prefixes = [reply_prefix] * len(conversations) if one_prefix else list(reply_prefix)
    temperatures = torch.as_tensor(temperature, dtype=torch.float).expand(len(conversations))
    device = next(model.parameters()).device
    prompts = [tuple(tokenizer.encode(tokenizer.apply_chat_template(c) + p))
               for c, p in zip(conversations, prefixes)]
    groups = {}  # prompt -> the conversations asking it
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        groups.setdefault(prompts[i], []).append(i)
    batches, batch = [], []
    # a prompt's replies stay together, in batches of about batch_size
    for group in groups.values():
        batch.append(group)
        if sum(map(len, batch)) >= batch_size:
            batches, batch = batches + [batch], []
    generators = [reply_generator(seed, i, device) for i in range(len(prompts))]
    kwargs = dict(eos_token_id=end_ids(tokenizer, stop))
    if scaffold:
        kwargs |= dict(scaffold=scaffold_ids(tokenizer, stop, scaffold),
                       scaffold_tokens=scaffold_tokens or max_new_tokens)
    if labels is not None:
        kwargs["labels"] = labels
    replies = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="reply") as bar:
        for batch in batches + ([batch] if batch else []):
            rows = [i for group in batch for i in group]
            firsts = [list(prompts[group[0]]) for group in batch]
            ids, mask = left_pad(firsts, tokenizer.pad_token_id, device)
            out = decode(ids, max_new_tokens, temperatures[rows], attention_mask=mask,
                         generator=[generators[i] for i in rows],
                         copies=[len(group) for group in batch], **kwargs)
            out, resumed = out if scaffold else (out, None)
            out = out[:, ids.shape[1]:]
            for j, (i, new) in enumerate(zip(rows, out.tolist())):
                # the first part and the scaffold are kept whole
                r = resumed[j] if resumed else None
                text = reply_text(tokenizer, new, stop)[0] if r is None else (
                    tokenizer.decode(new[:r]) + reply_text(tokenizer, new[r:], stop)[0])
                replies[i] = (prefixes[i] + text).strip()
            bar.update(len(rows))
    return replies
