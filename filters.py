"""Synthetic data selection: the three filters of the paper's sec. 4 (equations 2-4).

A synthetic sample (x_syn, y_syn) generated from an original (x, y) is kept only if
  SCF (eq. 2)  M(x => x_syn) >= eps_scf  and  M(x_syn => x) >= eps_scf   same meaning
  TDF (eq. 3)  ROUGE-L(x, x_syn) <= eps_tdf                               different wording
  LSF (eq. 4)  eps_min_len * len(x) <= len(x_syn) <= eps_max_len * len(x)  sensible length
As in the equations only the inputs are compared, without the task instruction (`cdcda.upload`);
len() counts words. The judge M: `NLIJudge` (the paper's) or `EmbeddingJudge` (the offline
proxy, a cosine: symmetric, not entailment), made by `make_judge` from --judge. The paper gives
no thresholds; they are options (options.Settings), and README says where the defaults come from."""
from dataclasses import dataclass, field

import data
import encoder
import metrics
import options

EPS_SCF_NLI = 0.5  # P(entailment) at least the other labels' mass
EPS_SCF_EMBEDDING = 0.6  # a cosine (README: where the defaults come from)


class NLIJudge:
    """M_NLI(premise => hypothesis) = P(entailment) of an NLI cross-encoder (the paper's WANLI)."""
    default_eps_scf = EPS_SCF_NLI

    def __init__(self, source: str, dtype: str = "float32", device: str = "cpu",
                 batch_size: int = 16):
        self.model, self.tokenizer = encoder.load(source, dtype, device)
        encoder.entailment_index(self.model.config)  # fail now, not mid-selection
        self.batch_size = batch_size
        self.name = f"nli:{source}"

    def __call__(self, premises: list[str], hypotheses: list[str]) -> list[float]:
        probs = encoder.entailment_probs(self.model, self.tokenizer, premises, hypotheses,
                                         self.batch_size)
        return probs.tolist()


class EmbeddingJudge:
    """PROXY for M_NLI when no NLI model is available: the cosine of mean-pooled sentence
    embeddings, as-is; symmetric (both directions of eq. 2 alike) and topical, not entailment."""
    default_eps_scf = EPS_SCF_EMBEDDING

    def __init__(self, source: str = encoder.EMBEDDED, dtype: str = "float32", device: str = "cpu",
                 batch_size: int = 32):
        self.model, self.tokenizer = encoder.load(source, dtype, device)
        self.batch_size = batch_size
        self.name = f"embedding-cosine-proxy:{source} (not NLI)"

    def __call__(self, premises: list[str], hypotheses: list[str]) -> list[float]:
        if len(premises) != len(hypotheses):
            raise ValueError(f"{len(premises)} premises but {len(hypotheses)} hypotheses")
        unique = list(dict.fromkeys(premises + hypotheses))  # each text embedded once
        row = {t: i for i, t in enumerate(unique)}
        # (U, H)
        e = encoder.sentence_embeddings(self.model, self.tokenizer, unique, self.batch_size)
        p = e[[row[t] for t in premises]]  # (N, H)
        h = e[[row[t] for t in hypotheses]]  # (N, H)
        return (p * h).sum(-1).clamp(-1.0, 1.0).tolist()


def semantic_consistency(forward: float, backward: float, eps_scf: float) -> bool:
    """Eq. 2: M(x => x_syn) >= eps_scf and M(x_syn => x) >= eps_scf; both directions must pass."""
    return forward >= eps_scf and backward >= eps_scf


def entailment_both_ways(judge, xs: list[str],
                         xs_syn: list[str]) -> tuple[list[float], list[float]]:
    """The scores eq. 2 compares, M(x => x_syn) and M(x_syn => x) for every pair, from one
    batched call of the judge: ([forward] * N, [backward] * N)."""
    if not xs:
        return [], []
    scores = judge(xs + xs_syn, xs_syn + xs)  # (2N,): forward, then backward
    return [float(v) for v in scores[:len(xs)]], [float(v) for v in scores[len(xs):]]


def token_diversity(x: str, x_syn: str, eps_tdf: float) -> tuple[bool, float]:
    """Eq. 3 -> (passed, ROUGE-L F(x, x_syn)); passes when the overlap is at most eps_tdf."""
    score = metrics.rouge_l(x_syn, x)
    return score <= eps_tdf, score


def length(text: str) -> int:
    """len() of eq. 4: whitespace-separated words."""
    return len(text.split())


def length_ratio(x: str, x_syn: str, eps_min_len: float,
                 eps_max_len: float) -> tuple[bool, float | None]:
    """Eq. 4 -> (passed, len(x_syn) / len(x), None when x is empty). Tested in the
    equation's product form, so an empty x keeps only an empty x_syn."""
    n, n_syn = length(x), length(x_syn)
    passed = eps_min_len * n <= n_syn <= eps_max_len * n
    return passed, (n_syn / n if n else None)


@dataclass
class Selection:
    """What `select` returns: the kept (x_syn, y_syn) pairs in input order, one JSON-ready record
    per candidate, the counts (a candidate failing two filters counts under both "rejected_*";
    step 2's own counts follow)."""
    kept: list[tuple[str, str]]
    records: list[dict]
    counts: dict
    thresholds: dict = field(default_factory=dict)


def select(pairs: list[tuple[str, str]], candidates: data.Candidates, judge, settings) -> Selection:
    """Step 3 (sec. 4, "Synthetic data selection"): SCF, TDF and LSF on every candidate.

    candidates.pairs[i] = (x_syn, y_syn) was generated from pairs[candidates.source[i]] = (x, y);
    `settings` gives eps_scf (None: the judge's default), eps_tdf, eps_min_len, eps_max_len.
    Every filter runs on every candidate (the counts say what each alone rejects), the judge once
    over the batch, both directions. Each record: {"input", "output", "syn_input", "syn_output",
    "scf_forward", "scf_backward", "rouge_l", "length_ratio", "scf", "tdf", "lsf", "kept"}."""
    originals = [pairs[i] for i in candidates.source]
    eps_scf = judge.default_eps_scf if settings.eps_scf is None else settings.eps_scf
    forwards, backwards = entailment_both_ways(judge, [x for x, _ in originals],
                                               [x_syn for x_syn, _ in candidates.pairs])
    kept, records = [], []
    counts = {"candidates": len(candidates.pairs), "kept": 0, "rejected": 0, "rejected_scf": 0,
              "rejected_tdf": 0, "rejected_lsf": 0}
    for (x, y), (x_syn, y_syn), forward, backward in zip(originals, candidates.pairs, forwards,
                                                          backwards):
        scf = semantic_consistency(forward, backward, eps_scf)  # eq. 2
        tdf, rouge = token_diversity(x, x_syn, settings.eps_tdf)  # eq. 3
        lsf, ratio = length_ratio(x, x_syn, settings.eps_min_len, settings.eps_max_len)  # eq. 4
        ok = scf and tdf and lsf
        records.append({"input": x, "output": y, "syn_input": x_syn, "syn_output": y_syn,
                        "scf_forward": forward, "scf_backward": backward, "rouge_l": rouge,
                        "length_ratio": ratio, "scf": scf, "tdf": tdf, "lsf": lsf, "kept": ok})
        counts["rejected_scf"] += not scf
        counts["rejected_tdf"] += not tdf
        counts["rejected_lsf"] += not lsf
        if ok:
            kept.append((x_syn, y_syn))
    counts["kept"], counts["rejected"] = len(kept), len(candidates.pairs) - len(kept)
    thresholds = {"judge": judge.name, "eps_scf": eps_scf, "eps_tdf": settings.eps_tdf,
                  "eps_min_len": settings.eps_min_len, "eps_max_len": settings.eps_max_len}
    return Selection(kept, records, counts | candidates.counts, thresholds)


def make_judge(spec: str, device: str):
    """The eq. 2 judge named by --judge: "nli:MODEL" (`NLIJudge`) or "embedding:MODEL" (the
    proxy)."""
    kind, source = options.judge_source(spec)
    return (NLIJudge if kind == "nli" else EmbeddingJudge)(source, device=device)
