"""Synthetic data selection: the three filters of the paper's sec. 4 (equations 2-4).

A synthetic sample (x_syn, y_syn) generated from an original (x, y) is kept only if
  SCF (eq. 2)  M(x => x_syn) >= eps_scf  and  M(x_syn => x) >= eps_scf   same meaning
  TDF (eq. 3)  ROUGE-L(x, x_syn) <= eps_tdf                               different wording
  LSF (eq. 4)  eps_min_len * len(x) <= len(x_syn) <= eps_max_len * len(x)  sensible length
As in the equations only the inputs are compared, without the task instruction (`cdcda.upload`);
len() counts words. The judge M: `NLIJudge` (the paper's) or `EmbeddingJudge` (the offline
proxy, a cosine: symmetric, not entailment). The paper gives no thresholds; README says where
the defaults come from."""
from dataclasses import asdict, dataclass, field, replace

import encoder
import metrics

EPS_SCF_NLI = 0.5
EPS_SCF_EMBEDDING = 0.6
EPS_TDF = 0.75
EPS_MIN_LEN = 0.5
EPS_MAX_LEN = 2.0


@dataclass(frozen=True)
class Thresholds:
    """The thresholds of eq. 2-4, named as cdcda.py's options; eps_scf None: the judge's own
    `default_eps_scf` (NLI and the embedding proxy need different ones)."""
    eps_scf: float | None = None
    eps_tdf: float = EPS_TDF
    eps_min_len: float = EPS_MIN_LEN
    eps_max_len: float = EPS_MAX_LEN


class NLIJudge:
    """M_NLI(premise => hypothesis) = P(entailment) of an NLI cross-encoder (the paper's WANLI)."""
    default_eps_scf = EPS_SCF_NLI

    def __init__(self, source: str, dtype: str = "float32", device: str = "cpu", batch_size: int = 16):
        self.model, self.tokenizer = encoder.load(source, dtype, device)
        encoder.entailment_index(self.model.config)  # fail now, not mid-selection
        self.batch_size = batch_size
        self.name = f"nli:{source}"

    def __call__(self, premises: list[str], hypotheses: list[str]) -> list[float]:
        return encoder.entailment_probs(self.model, self.tokenizer, premises, hypotheses, self.batch_size).tolist()


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
        e = encoder.sentence_embeddings(self.model, self.tokenizer, unique, self.batch_size)  # (U, H)
        p = e[[row[t] for t in premises]]  # (N, H)
        h = e[[row[t] for t in hypotheses]]  # (N, H)
        return (p * h).sum(-1).clamp(-1.0, 1.0).tolist()


def semantic_consistency(forward: float, backward: float, eps_scf: float) -> bool:
    """Eq. 2: M(x => x_syn) >= eps_scf and M(x_syn => x) >= eps_scf; both directions must pass."""
    return forward >= eps_scf and backward >= eps_scf


def entailment_both_ways(judge, xs: list[str], xs_syn: list[str]) -> tuple[list[float], list[float]]:
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


def length_ratio(x: str, x_syn: str, eps_min_len: float, eps_max_len: float) -> tuple[bool, float | None]:
    """Eq. 4 -> (passed, len(x_syn) / len(x), None when x is empty). Tested in the
    equation's product form, so an empty x keeps only an empty x_syn."""
    n, n_syn = length(x), length(x_syn)
    passed = eps_min_len * n <= n_syn <= eps_max_len * n
    return passed, (n_syn / n if n else None)


@dataclass
class Selection:
    """What `select` returns: the kept (x_syn, y_syn) pairs in input order, one JSON-ready record per
    candidate, the counts (a candidate failing two filters counts under both "rejected_*")."""
    kept: list[tuple[str, str]]
    records: list[dict]
    counts: dict
    thresholds: dict = field(default_factory=dict)


def select(originals: list[tuple[str, str]], candidates: list[tuple[str, str]], judge,
           thresholds: Thresholds = Thresholds()) -> Selection:
    """Apply SCF, TDF and LSF to every candidate (paper sec. 4, "Synthetic data selection").

    candidates[i] = (x_syn, y_syn) was generated from originals[i] = (x, y); eps_scf None is the
    judge's default. Every filter runs on every candidate (the counts say what each alone rejects),
    the judge once over the batch, both directions. Each record: {"input", "output", "syn_input",
    "syn_output", "scf_forward", "scf_backward", "rouge_l", "length_ratio", "scf", "tdf", "lsf", "kept"}."""
    if len(originals) != len(candidates):
        raise ValueError(f"select: {len(originals)} originals but {len(candidates)} candidates")
    t = replace(thresholds, eps_scf=judge.default_eps_scf) if thresholds.eps_scf is None else thresholds
    xs = [x for x, _ in originals]
    xs_syn = [x_syn for x_syn, _ in candidates]
    forwards, backwards = entailment_both_ways(judge, xs, xs_syn)
    kept, records = [], []
    counts = {"candidates": len(candidates), "kept": 0, "rejected": 0, "rejected_scf": 0, "rejected_tdf": 0,
              "rejected_lsf": 0}
    for (x, y), (x_syn, y_syn), forward, backward in zip(originals, candidates, forwards, backwards):
        scf = semantic_consistency(forward, backward, t.eps_scf)  # eq. 2
        tdf, rouge = token_diversity(x, x_syn, t.eps_tdf)  # eq. 3
        lsf, ratio = length_ratio(x, x_syn, t.eps_min_len, t.eps_max_len)  # eq. 4
        ok = scf and tdf and lsf
        records.append({"input": x, "output": y, "syn_input": x_syn, "syn_output": y_syn,
                        "scf_forward": forward, "scf_backward": backward, "rouge_l": rouge,
                        "length_ratio": ratio, "scf": scf, "tdf": tdf, "lsf": lsf, "kept": ok})
        counts["rejected_scf"] += not scf
        counts["rejected_tdf"] += not tdf
        counts["rejected_lsf"] += not lsf
        if ok:
            kept.append((x_syn, y_syn))
    counts["kept"] = len(kept)
    counts["rejected"] = len(candidates) - len(kept)
    return Selection(kept, records, counts, {"judge": judge.name, **asdict(t)})
