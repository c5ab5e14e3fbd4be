"""LaMP's evaluation metrics, written out by hand (paper sec. 5.1 "Evaluation Metrics"), as
LaMP's own code computes them: LaMP-1/2 accuracy and macro F1 over the task's labels (a
prediction off the list becomes -1: wrong, not a class of its own); LaMP-3 MAE and RMSE (a
non-number counts as the worst case for its gold: 1 if |1 - gold| > |5 - gold| else 5);
LaMP-4/5/7 ROUGE-1 and ROUGE-L F (rouge_score's tokenizer, no stemming; the same numbers to the
last bit, tests/test_metrics.py) and BERTScore-F1 (Zhang et al., 2020)."""
import math
import re
from collections import Counter

import torch

import data
import encoder

# lamp1, lamp2
LABELS = {name: list(task.labels) for name, task in data.TASKS.items() if task.labels}
TASKS = tuple(data.TASKS)

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")


# ---------------------------------------------------------------- ROUGE (Lin, 2004)
def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, every run outside [a-z0-9] a space, split; so
    anything non-ASCII separates ("café" -> ["caf"], "北京" -> []), exactly as rouge_score does."""
    return _NON_ALPHANUM.sub(" ", text.lower()).split()


def _fmeasure(precision: float, recall: float) -> float:
    # rouge_score.scoring.fmeasure, same expression so the floats are identical; BERTScore's F too
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_1(prediction: str, reference: str) -> float:
    """ROUGE-1 F: unigram overlap with clipped counts. Worked example: prediction "a a b",
    reference "a c": overlap min(2,1)=1, P=1/3, R=1/2, F=2*(1/3)*(1/2)/(5/6)=0.4."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    overlap = sum((Counter(pred) & Counter(ref)).values())  # each token's smaller count
    return _fmeasure(overlap / max(len(pred), 1), overlap / max(len(ref), 1))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) with one DP row."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, start=1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F: P = LCS/len(prediction), R = LCS/len(reference), in rouge tokens; 0 when
    either side has no token. Worked example: "the cat sat" vs "the cat ran": LCS=2, F=2/3."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(ref, pred)
    return _fmeasure(lcs / len(pred), lcs / len(ref))


# ---------------------------------------------------------------- classification (LaMP-1, 2)
def _check_lists(predictions, golds, what: str) -> None:
    if len(predictions) == 0:
        raise ValueError(f"{what}: no predictions (empty list)")
    if len(predictions) != len(golds):
        raise ValueError(f"{what}: {len(predictions)} predictions but {len(golds)} golds")


def _label_indices(predictions, golds, labels: list[str]) -> tuple[list[int], list[int]]:
    """Strip, map to the label list's index; a prediction outside the list -> -1. A gold
    outside the list is a data error, not a prediction error, so it raises."""
    index = {label: i for i, label in enumerate(labels)}
    gold_ids = []
    for n, g in enumerate(golds):
        if g.strip() not in index:
            raise ValueError(f"gold #{n} {g!r} is not one of the task's labels {labels}")
        gold_ids.append(index[g.strip()])
    return [index.get(p.strip(), -1) for p in predictions], gold_ids


def accuracy(predictions: list[str], golds: list[str], labels: list[str]) -> float:
    """Share of predictions equal to their gold after LaMP's strip-and-map rule."""
    _check_lists(predictions, golds, "accuracy")
    pred, gold = _label_indices(predictions, golds, labels)
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def f1(predictions: list[str], golds: list[str], labels: list[str]) -> float:
    """Macro F1 over every label, as sklearn's
    `f1_score(average="macro", labels=range(len(labels)))`: F1_k = 2 tp / (2 tp + fp + fn), 0 for
    a label nobody gave or predicted (still in the mean)."""
    _check_lists(predictions, golds, "f1")
    pred, gold = _label_indices(predictions, golds, labels)
    scores = []
    for k in range(len(labels)):
        tp = sum(p == k and g == k for p, g in zip(pred, gold))
        n_pred, n_gold = pred.count(k), gold.count(k)
        scores.append(2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- rating (LaMP-3)
def _ratings(predictions: list[str], golds: list[str],
             what: str) -> tuple[list[float], list[float]]:
    """LaMP's mapping: float(prediction), or the worst case for that gold if it is not a number;
    "nan" and "inf" count as not a number too (one would turn the whole MAE into nan or inf)."""
    _check_lists(predictions, golds, what)
    pred, gold = [], []
    for n, (p, g) in enumerate(zip(predictions, golds)):
        try:
            g = float(g)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: gold #{n} {g!r} is not a number") from None
        try:
            p = float(p.strip())
            ok = math.isfinite(p)
        except ValueError:
            ok = False
        pred.append(p if ok else (1.0 if abs(1 - g) > abs(5 - g) else 5.0))
        gold.append(g)
    return pred, gold


def mae(predictions: list[str], golds: list[str]) -> float:
    """Mean absolute error. Example: preds ["4", "oops"], golds ["5", "2"]: "oops" -> 5.0
    (|1-2| = 1 is not > |5-2| = 3), so MAE = (1 + 3) / 2 = 2.0."""
    pred, gold = _ratings(predictions, golds, "mae")
    return sum(abs(p - g) for p, g in zip(pred, gold)) / len(gold)


def rmse(predictions: list[str], golds: list[str]) -> float:
    """Root mean squared error, same worst-case rule. Same example: sqrt((1 + 9) / 2)."""
    pred, gold = _ratings(predictions, golds, "rmse")
    return math.sqrt(sum((p - g) ** 2 for p, g in zip(pred, gold)) / len(gold))


# ---------------------------------------------------------------- BERTScore (Zhang et al., 2020)
# bert_score's layer per backbone (its `model2layers` table, bert-score 0.3.13: the layer whose
# BERTScore correlated best with human judgements on WMT16), for the BERT / RoBERTa backbones
# encoder.py runs. The Hub moved these legacy names under owners; both spellings are looked up.
BERTSCORE_LAYERS = {"roberta-large": 17, "roberta-base": 10, "roberta-large-mnli": 19,
                    "distilroberta-base": 5, "bert-base-uncased": 9, "bert-large-uncased": 18,
                    "bert-base-multilingual-cased": 9}
_LEGACY_OWNERS = ("FacebookAI/", "google-bert/", "distilbert/")


def default_bertscore_layer(model) -> int:
    """The layer bert_score reads for a backbone of that name (roberta-large 17, also as
    FacebookAI/roberta-large); any other backbone (the embedded MiniLM, a directory) its last."""
    name, n = model.name_or_path, model.config.num_hidden_layers
    legacy = name.split("/", 1)[1] if name.startswith(_LEGACY_OWNERS) else name
    layer = BERTSCORE_LAYERS.get(legacy, n)
    if layer > n:
        raise ValueError(f"BERTScore backbone {name!r} reads layer {layer} (bert_score's choice "
                         f"for that name), but the checkpoint has only {n} layers")
    return layer


def bertscore_f1(predictions: list[str], references: list[str], model, tokenizer,
                 layer: int | None = None, batch_size: int = 32) -> list[float]:
    """BERTScore-F1 per pair (Zhang et al., 2020, eq. 1-3), as the `bert-score` package computes it.

    Texts stripped; a RoBERTa backbone's text gets one leading space (bert_score's
    add_prefix_space). The hidden states of `layer` (default `default_bertscore_layer`) are
    L2-normalised and every token matched greedily to its most similar token on the other side,
    special tokens matched but not averaged: R = mean_ref max_pred cos, P = mean_pred max_ref cos,
    F = 2PR / (P + R). No idf, no baseline rescaling (bert_score's defaults); an empty side
    scores 0."""
    _check_lists(predictions, references, "bertscore_f1")
    layer = default_bertscore_layer(model) if layer is None else layer
    prefix = " " if model.config.model_type == "roberta" else ""
    texts = [prefix + t.strip() if t.strip() else "" for t in list(predictions) + list(references)]
    embedded = encoder.token_embeddings(model, tokenizer, texts, layer, batch_size)
    scores, n = [], len(predictions)
    for (p, p_special), (r, r_special) in zip(embedded[:n], embedded[n:]):
        if p_special.all() or r_special.all():  # no real token on a side
            scores.append(0.0)
            continue
        # (n_pred, H), (n_ref, H)
        p, r = (torch.nn.functional.normalize(t.float(), dim=-1) for t in (p, r))
        sim = p @ r.T  # (n_pred, n_ref)
        precision = sim.max(dim=1).values[~p_special].mean().item()
        recall = sim.max(dim=0).values[~r_special].mean().item()
        scores.append(_fmeasure(precision, recall))
    return scores


# ---------------------------------------------------------------- one task's report
def evaluate(task: str, predictions: list[str], golds: list[str], bertscore_model=None,
             bertscore_layer: int | None = None) -> dict:
    """All of a LaMP task's metrics: lamp1/2 {"accuracy", "f1"}, lamp3 {"mae", "rmse"}, lamp4/5/7
    {"rouge1", "rougeL", "bertscore_f1"} and the BERTScore backbone and layer that gave it
    (`bertscore_model` an `encoder.load` pair, None the embedded MiniLM; the layer None:
    `default_bertscore_layer`). Generated texts are stripped first, as LaMP does."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    _check_lists(predictions, golds, f"evaluate({task})")
    if task in LABELS:
        return {"accuracy": accuracy(predictions, golds, LABELS[task]),
                "f1": f1(predictions, golds, LABELS[task])}
    if task == "lamp3":
        return {"mae": mae(predictions, golds), "rmse": rmse(predictions, golds)}
    preds, refs = [p.strip() for p in predictions], [g.strip() for g in golds]
    if bertscore_model is None:
        bertscore_model = encoder.load("all-minilm-l6-v2")
    model, tokenizer = bertscore_model
    layer = default_bertscore_layer(model) if bertscore_layer is None else bertscore_layer
    n = len(preds)
    return {"rouge1": sum(rouge_1(p, r) for p, r in zip(preds, refs)) / n,
            "rougeL": sum(rouge_l(p, r) for p, r in zip(preds, refs)) / n,
            "bertscore_f1": sum(bertscore_f1(preds, refs, model, tokenizer, layer)) / n,
            "bertscore_model": model.name_or_path, "bertscore_layer": layer}
