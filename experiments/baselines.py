"""The personalized baselines of Table 1 (paper sec. 5.1), each as a small function.

- RAG: one history item retrieved into the prompt, by Okapi BM25 (`BM25`, `retrieve_bm25`) or
  by a dense encoder (`retrieve_dense`; MiniLM by default, Contriever one flag away).
- EDA-FT: Easy Data Augmentation (Wei and Zou, 2019) of the user's texts (`eda`), synonyms
  from Princeton WordNet 3.0 read straight from Debian's `wordnet-base` files (`load_wordnet`).
- Speculative decoding is speculative.py.
- RKD-FT: distillation from the cloud model with the token-level reverse KL of MiniLLM
  (Gu et al., 2024) (`reverse_kl`, `rkd_finetune`).
"""
import math
import random
import re
from collections import Counter
from pathlib import Path

import torch

import train
from errors import InputError
from experiments import speculative

# ----------------------------------------------------------------------------------------
# Retrieval (RAG baselines)


def words(text: str) -> list[str]:
    """BM25 tokenisation: lowercase runs of unicode word characters (`\\w+`), no stemming,
    no stop-word removal. "Don't stop!" -> ["don", "t", "stop"]."""
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 (Robertson et al.; the variant in Trotman et al., 2014) over a fixed corpus.

    score(D, Q) = sum_{t in Q} idf(t) * f(t,D) (k1 + 1) / (f(t,D) + k1 (1 - b + b |D| / avgdl))
    idf(t) = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))      (Lucene's idf: never negative)
    with f(t,D) the count of t in D, |D| the length of D in tokens, avgdl the mean length,
    N the number of documents and n(t) the number that contain t. A term repeated in the
    query counts once per repetition.
    """

    def __init__(self, documents: list[str], k1: float = 1.2, b: float = 0.75):
        if not documents:
            raise ValueError("BM25: the corpus is empty (need at least one document)")
        self.k1, self.b = k1, b
        self.counts = [Counter(words(d)) for d in documents]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.avgdl = sum(self.lengths) / len(documents) or 1.0  # all-empty corpus: scores are 0
        n_containing = Counter(t for c in self.counts for t in c)
        N = len(documents)
        self.idf = {t: math.log(1 + (N - n + 0.5) / (n + 0.5)) for t, n in n_containing.items()}

    def scores(self, query: str) -> list[float]:
        out = []
        for counts, length in zip(self.counts, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avgdl)
            out.append(sum(self.idf[t] * counts[t] * (self.k1 + 1) / (counts[t] + norm)
                           for t in words(query) if counts[t]))
        return out


def top_k(scores, k: int) -> list[int]:
    """Indices of the k highest scores, best first; ties go to the earlier document."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def retrieve_bm25(query: str, documents: list[str], k: int = 1) -> list[int]:
    """Indices of the k documents BM25 ranks highest for `query` (k1=1.2, b=0.75)."""
    return top_k(BM25(documents).scores(query), k)


def retrieve_dense(query: str, documents: list[str], embed, k: int = 1) -> list[int]:
    """Indices of the k documents whose embeddings have the largest dot product with the query's.

    `embed(texts) -> (N, H)` tensor. With the pipeline's MiniLM embeddings (mean pooling,
    L2-normalised) the dot product is the cosine similarity; Contriever (Izacard et al.,
    2021) also mean-pools but scores with the raw, unnormalised dot product, so its `embed`
    should skip the normalisation and this function stays the same.
    """
    if not documents:
        raise ValueError("retrieve_dense: the corpus is empty (need at least one document)")
    e = embed([query] + list(documents))  # (1 + N, H)
    scores = e[1:] @ e[0]  # (N,)
    return top_k(scores.tolist(), k)


# ----------------------------------------------------------------------------------------
# EDA (Wei and Zou, 2019) with WordNet synonyms

WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")

STOP_WORDS = frozenset("""
a an the and or but nor so yet if then than as of at by for from in into on onto to with
without about over under up down out off is am are was were be been being do does did have
has had having i me my mine we us our you your he him his she her it its they them their
this that these those who whom whose which what when where why how all any each both some
no not only very just too can will would shall should may might must s t
""".split())


def check_wordnet(directory) -> None:
    """One line (InputError) naming what is missing of WordNet 3.0's data.* files in `directory`
    and how to get them: EDA-FT's runs call it before any work."""
    root = Path(directory)
    missing = [name for name in WORDNET_FILES if not (root / name).is_file()]
    if missing:
        raise InputError(f"EDA needs WordNet 3.0: {root} lacks {', '.join(missing)}; install Debian's wordnet-base "
                         "(`make wordnet`, i.e. `apt-get install wordnet-base`), or leave eda-ft out of --methods")


def load_wordnet(directory: str = "/usr/share/wordnet") -> dict[str, list[str]]:
    """lemma -> synonyms (the other lemmas of every synset it belongs to), from WordNet's
    `data.{noun,verb,adj,adv}` files.

    A synset line reads `offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] ...`
    with w_cnt in hexadecimal; lines that start with a space are the licence header.
    Lemmas are lowercased, `_` becomes a space, and adjective markers like `big(a)` lose
    their `(a)`. Debian installs the files with `apt-get install wordnet-base`.
    """
    root = Path(directory)
    check_wordnet(root)
    synonyms: dict[str, dict[str, None]] = {}  # dicts as ordered sets: deterministic order
    for name in WORDNET_FILES:
        for line_no, line in enumerate((root / name).read_text(encoding="utf-8").splitlines(), 1):
            if not line or line.startswith(" "):
                continue
            fields = line.split()
            try:
                n_words = int(fields[3], 16)
                lemmas = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ").lower()
                          for w in fields[4:4 + 2 * n_words:2]]
            except (IndexError, ValueError):
                raise InputError(f"{root / name}:{line_no}: not a WordNet synset line") from None
            for lemma in lemmas:
                entry = synonyms.setdefault(lemma, {})
                entry.update((other, None) for other in lemmas if other != lemma)
    return {lemma: list(others) for lemma, others in synonyms.items()}


def _split(word: str) -> tuple[str, str, str]:
    """'"Happy,' -> ('"', 'Happy', ','): leading punctuation, core, trailing punctuation."""
    lead, core, trail = re.fullmatch(r"(\W*)(.*?)(\W*)", word).groups()
    return lead, core, trail


# WordNet's rules of detachment (morphy, without its exception lists): "watched" -> "watch".
DETACH = [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
          ("ing", "e"), ("ing", ""), ("er", ""), ("est", ""), ("er", "e"), ("est", "e")]


def _synonyms(word: str, wordnet: dict[str, list[str]]) -> list[str]:
    """WordNet synonyms of a word's core, or of its first base form WordNet knows (then the
    base form too, as EDA's NLTK lookup gives); [] for stop words and unknown words."""
    core = _split(word)[1].lower()
    if core in STOP_WORDS:
        return []
    bases = [core] + [core[:-len(s)] + e for s, e in DETACH if core.endswith(s) and len(core) > len(s) + 1]
    base = next((b for b in bases if b in wordnet), None)
    return [] if base is None else wordnet[base] + ([base] if base != core else [])


def n_changes(alpha: float, n_words: int) -> int:
    """EDA's number of edited words: n = alpha * l, at least one."""
    return max(1, round(alpha * n_words))


def synonym_replacement(tokens: list[str], wordnet, alpha: float, rng: random.Random) -> list[str]:
    """SR: choose n distinct non-stop words that have synonyms, in random order, and replace
    every occurrence of each (any case) with one random synonym, punctuation around it kept."""
    out = list(tokens)
    candidates = list(dict.fromkeys(_split(t)[1].lower() for t in tokens if _synonyms(t, wordnet)))
    rng.shuffle(candidates)
    for word in candidates[:n_changes(alpha, len(tokens))]:
        synonym = rng.choice(_synonyms(word, wordnet))
        out = [lead + synonym + trail if core.lower() == word else lead + core + trail
               for lead, core, trail in map(_split, out)]
    return out


def random_insertion(tokens: list[str], wordnet, alpha: float, rng: random.Random) -> list[str]:
    """RI, n times: a synonym of a random non-stop word is inserted at a random position.
    As in EDA, at most 10 words are tried per insertion; none with synonyms -> no insertion."""
    out = list(tokens)
    for _ in range(n_changes(alpha, len(tokens))):
        for _ in range(10):
            synonyms = _synonyms(rng.choice(out), wordnet)
            if synonyms:
                out.insert(rng.randint(0, len(out)), rng.choice(synonyms))
                break
    return out


def random_swap(tokens: list[str], alpha: float, rng: random.Random) -> list[str]:
    """RS, n times: two random positions swap their words (the multiset of words is kept)."""
    out = list(tokens)
    if len(out) < 2:
        return out
    for _ in range(n_changes(alpha, len(tokens))):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(tokens: list[str], alpha: float, rng: random.Random) -> list[str]:
    """RD: each word is deleted with probability p = alpha (EDA's RD uses alpha as a
    probability, not a count); if all go, one random word stays, so the result is never empty."""
    if len(tokens) <= 1:
        return list(tokens)
    out = [t for t in tokens if rng.random() >= alpha]
    return out or [rng.choice(tokens)]


def eda(sentence: str, wordnet: dict[str, list[str]], alpha: float = 0.1, n_aug: int = 4, *,
        rng: random.Random) -> list[str]:
    """`n_aug` EDA variants of `sentence` (Wei and Zou, 2019, sec. 2): n_aug // 4 + 1 per
    operation (SR, RI, RS, RD), shuffled, the first n_aug kept. The original is not included.

    Words are whitespace-separated tokens, case and punctuation kept (EDA itself lowercases
    and strips punctuation first; we keep the user's style, which is what LaMP measures).
    """
    tokens = sentence.split()
    if not tokens:
        return []
    operations = [lambda: synonym_replacement(tokens, wordnet, alpha, rng),
                  lambda: random_insertion(tokens, wordnet, alpha, rng),
                  lambda: random_swap(tokens, alpha, rng), lambda: random_deletion(tokens, alpha, rng)]
    out = [operation() for operation in operations for _ in range(n_aug // 4 + 1)]
    rng.shuffle(out)
    return [" ".join(t) for t in out[:n_aug]]


# ----------------------------------------------------------------------------------------
# RKD-FT: token-level reverse KL distillation (Gu et al., 2024)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """KL(q_student || p_teacher) per position, averaged over the positions where mask is 1.

    student_logits, teacher_logits: (..., V), e.g. (B, T, V); mask: (...), e.g. (B, T). Per position
    sum_v q(v) (log q(v) - log p(v)) with q = softmax(student), p = softmax(teacher).
    MiniLLM (Gu et al., 2024) minimises the sequence-level reverse KL by policy gradient on
    student samples; RKD-FT uses its token-level form on the prefixes of the user's responses
    (teacher forcing), differentiated exactly. Computed in fp32.
    """
    log_q = torch.log_softmax(student_logits.float(), dim=-1)  # (..., V)
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)  # (..., V)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # (...)
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def response_reverse_kl(student, teacher, ids: torch.Tensor, labels: torch.Tensor, vocab_size: int):
    """`train.response_loss` with the reverse KL to the frozen teacher: ids, labels (B, T); only
    the N positions that predict a labelled (response) token go through the output heads."""
    keep = labels[:, 1:] != train.IGNORE  # (B, T-1): position t predicts token t + 1
    student_logits = student.lm_head(student.model(ids)[:, :-1][keep])[:, :vocab_size]  # (N, V)
    with torch.no_grad():
        device = next(teacher.parameters()).device
        hidden = teacher.model(ids.to(device))[:, :-1][keep.to(device)]  # (N, H)
        teacher_logits = teacher.lm_head(hidden)[:, :vocab_size].to(student_logits.device)  # (N, V)
    return reverse_kl(student_logits, teacher_logits, torch.ones(len(student_logits), device=student_logits.device))


def rkd_finetune(student, teacher, tokenizer, examples: list[tuple[list[dict], str]], settings,
                 seed: int = 0, desc: str | None = None, teacher_tokenizer=None) -> list[float]:
    """RKD-FT: `train.finetune` with the reverse KL to the teacher's next-token distributions on
    the response positions (`response_reverse_kl`) in place of the cross-entropy to the response
    tokens: same examples, batching, seeded order, AdamW, clipping and divergence check.

    The student is the device model with LoRA adapters (`lora.add_lora`), the teacher the frozen
    cloud model. Both must share `tokenizer` (checked against `teacher_tokenizer` when given);
    their logits are cut to the tokenizer's size, which drops padding rows of a padded
    vocabulary (Qwen2.5 pads to 151936). Returns the mean loss of each epoch.
    """
    if teacher_tokenizer is not None:
        speculative.check_shared_tokenizer(tokenizer, teacher_tokenizer)
    V = tokenizer.tokenizer.get_vocab_size()
    for name, model in (("student", student), ("teacher", teacher)):
        if model.config.vocab_size < V:
            raise ValueError(f"rkd_finetune: the {name} has {model.config.vocab_size} logits but the "
                             f"tokenizer has {V} tokens: the models do not share this tokenizer")
    teacher.eval()
    return train.finetune(student, tokenizer, examples, settings, seed=seed, desc=desc or "RKD fine-tune",
                          loss=lambda model, ids, labels: response_reverse_kl(model, teacher, ids, labels, V))
