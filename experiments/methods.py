"""The rows of the paper's Table 1 and Table 2 that are not the method's own (sec. 5.1-5.3).

Each row is a function of a `cdcda.Run` (one target user) in `METHODS`; the pipeline runs,
caches and scores them like its own three:
- cloud: M_cloud answers the appendix-B prompt, not personalized ("base": M_base does).
- RAG (sec. 5.1, "one retriever item"): the user's profile item that ranks first for the
  query's content (the query input without the task instruction, as `cdcda.upload` cuts it
  from the pairs) goes into the prompt's {RETRIEVED USER HISTORY}. BM25: Okapi, k1 = 1.2,
  b = 0.75 (baselines.BM25). Dense: the embedded MiniLM, cosine; "+contriever" rows use
  facebook/contriever, unnormalised dot product (a hub download: not in `--methods all`).
- speculative: M_cloud drafts gamma = 4 tokens, the personalized device model (Direct-FT's
  adapter on M_base: the row sits among the on-device personalized ones) verifies by exact
  rejection sampling, so the output is distributed as Direct-FT's (speculative.py says why);
  the acceptance rate is reported.
- eda-ft: Direct-FT on D_u plus EDA variants of each pair's input (response kept): k variants
  per pair (the augmentation budget CDCDA-PLM gets), alpha = 0.1, WordNet 3.0 from Debian's
  wordnet-base.
- rkd-ft: LoRA on M_base trained with the token-level reverse KL to M_cloud on D_u's responses
  (needs one tokenizer for both models).
- ablations: rs keeps as many random parsed candidates as the filters kept (seeded); no-ds
  trains on all parsed candidates; -LDA is Direct-FT and -FT is M_base (cdcda.METHODS).
"""
import copy
import functools
import json
import random

import torch

import cdcda
import encoder
import generate
import hub
import lora
import qwen2
from cdcda import Method
from deployment.methods import load_adapter
from experiments import baselines, speculative as spec

WORDNET_DIR = "/usr/share/wordnet"  # Debian's wordnet-base
CONTRIEVER = "facebook/contriever"
GAMMA = 4  # drafted tokens per verification
EDA_ALPHA = 0.1

# ---------------------------------------------------------------- models, loaded once per process
@functools.cache
def load_cloud(source: str, dtype: str, device: str):
    print(f"loading the cloud model {source} ({dtype}) in process for the cloud baselines")
    return qwen2.load(source, dtype, device)


def cloud_lm(run: cdcda.Run):
    """(model, tokenizer) of M_cloud: the run's, or loaded here when the pipeline did not load it
    (no method needed synthetic data) or only has its tokenizer (--cloud-api)."""
    if run.cloud is not None and run.cloud.model is not None:
        return run.cloud.model, run.cloud.tokenizer
    return load_cloud(run.settings.models.cloud_model, run.settings.models.cloud_dtype, run.device)


load_encoder = functools.cache(encoder.load)  # (source, dtype, device) -> (model, tokenizer)
wordnet = functools.cache(baselines.load_wordnet)  # directory -> {lemma: synonyms}


# ---------------------------------------------------------------- Table 1
def reply(model, tokenizer, run: cdcda.Run, conversations, method: str) -> list[str]:
    return generate.chat(model, tokenizer, conversations, max_new_tokens=cdcda.ANSWER_TOKENS[run.task.name],
                      temperature=run.settings.augmentation.temperature, seed=run.seed, desc=f"answer {method}")


def retrieve(run: cdcda.Run, retriever: str) -> list[dict]:
    """The one profile item each query retrieves: ranked by BM25 or by a dense encoder for the
    query's content, over each item's field values."""
    documents = [" ".join(str(item[f]) for f in run.task.profile_fields) for item in run.user.profile]
    prefix = run.task.instruction
    picked = []
    for q in run.user.queries:
        query = q.input.removeprefix(prefix)
        if retriever == "bm25":
            (i,) = baselines.retrieve_bm25(query, documents, k=1)
        else:
            model, tok = load_encoder(retriever, "float32", run.device)
            embed = functools.partial(encoder.sentence_embeddings, model, tok, normalize=retriever != CONTRIEVER)
            (i,) = baselines.retrieve_dense(query, documents, embed, k=1)
        picked.append(run.user.profile[i])
    return picked


def prompted(where: str, retriever: str | None = None):
    """A row where M_cloud or the device's M_base answers the appendix-B prompt as it is, or
    with one retrieved item in it (RAG) when a retriever is named."""
    def method(run: cdcda.Run) -> list[str]:
        model, tok = cloud_lm(run) if where == "cloud" else (run.device_model, run.tokenizer)
        items = retrieve(run, retriever) if retriever else [None] * len(run.user.queries)
        conversations = [run.task.messages(q.input, retrieved=[item] if item else [])
                         for q, item in zip(run.user.queries, items)]
        return reply(model, tok, run, conversations, where + (f"+{retriever}" if retriever else ""))
    return method


def direct_ft_model(run: cdcda.Run):
    """The Direct-FT personalized device model: its adapter from this user's directory when the
    direct-ft row already trained it (same settings: cdcda.main checks), else trained here."""
    path = run.user_dir / "direct-ft.adapter.safetensors"
    if path.is_file():
        model = lora.add_lora(copy.deepcopy(run.device_model), r=run.training.lora_r,
                              alpha=run.training.lora_alpha, seed=run.seed)
        return load_adapter(model, path).eval()
    model, run.losses["direct-ft"] = cdcda.personalize(run.device_model, run.tokenizer, run.task, run.pairs,
                                                       run.training, run.seed, f"direct-ft {run.user.user_id}")
    lora.save_adapter(model, path)
    return model


def speculative(run: cdcda.Run) -> list[str]:
    """Speculative decoding, one query at a time: M_cloud drafts, Direct-FT's model verifies."""
    target, tok = direct_ft_model(run), run.tokenizer
    draft, cloud_tok = cloud_lm(run)
    spec.check_shared_tokenizer(tok, cloud_tok, "cloud")
    same = target.config.vocab_size == draft.config.vocab_size
    generator = torch.Generator().manual_seed(run.seed)
    answers, totals = [], {"drafted": 0, "accepted": 0, "target_calls": 0, "new_tokens": 0}
    for q in run.user.queries:
        prompt = tok.encode(tok.apply_chat_template(run.task.messages(q.input)))
        ids, stats = spec.speculative_generate(
            target, draft, torch.tensor([prompt]), cdcda.ANSWER_TOKENS[run.task.name], gamma=GAMMA,
            temperature=run.settings.augmentation.temperature, eos_token_id=tok.eos_token_ids, generator=generator,
            vocab_size=None if same else tok.tokenizer.get_vocab_size())
        answers.append(tok.decode(ids[0, len(prompt):].tolist()).strip())  # up to the eos (special: dropped)
        totals = {key: totals[key] + stats[key] for key in totals}
    hub.write_atomic(run.user_dir / "speculative.json", json.dumps(totals))
    return answers


def eda_pairs(run: cdcda.Run) -> list[tuple[str, str]]:
    """D_u plus k EDA variants of each pair's input, each with the pair's response."""
    rng, wn = random.Random(run.seed), wordnet(WORDNET_DIR)
    k = run.settings.augmentation.k
    return list(run.pairs) + [(variant, y) for x, y in run.pairs
                              for variant in baselines.eda(x, wn, alpha=EDA_ALPHA, n_aug=k, rng=rng)]


def rkd_ft(run: cdcda.Run) -> list[str]:
    """RKD-FT: a fresh LoRA on M_base distilled from M_cloud with reverse KL on D_u."""
    teacher, cloud_tok = cloud_lm(run)
    student = lora.add_lora(copy.deepcopy(run.device_model), r=run.training.lora_r,
                            alpha=run.training.lora_alpha, seed=run.seed)
    run.losses["rkd-ft"] = baselines.rkd_finetune(
        student, teacher, run.tokenizer, cdcda.training_examples(run.task, run.pairs), run.training, seed=run.seed,
        desc=f"rkd-ft {run.user.user_id}", teacher_tokenizer=cloud_tok)
    lora.save_adapter(student, run.user_dir / "rkd-ft.adapter.safetensors")
    return run.answer(student.eval(), "rkd-ft")


# ---------------------------------------------------------------- Table 2
def candidates(run: cdcda.Run) -> list[tuple[str, str]]:
    """Every parsed candidate of this user (kept or not), from the synthesize step's cache."""
    return [(r["syn_input"], r["syn_output"]) for r in cdcda.synthetic_records(run.user_dir)]


def random_selection(run: cdcda.Run) -> list[tuple[str, str]]:
    """RS: as many parsed candidates as the filters kept, drawn at random (seeded per user)."""
    return random.Random(run.seed).sample(candidates(run), len(run.kept))


TABLE1 = ["cloud", "base", "cloud+bm25", "device+bm25", "cloud+dense", "device+dense", "direct-ft",
          "speculative", "eda-ft", "rkd-ft", "cdcda"]  # direct-ft first: speculative reuses its adapter
ABLATIONS = {"cdcda": "Full model (DS)", "rs": "Full model (RS)", "no-ds": "-DS",
             "direct-ft": "-DS -LDA", "base": "-DS -LDA -FT"}  # Table 2's rows, its labels
METHODS = {
    **cdcda.METHODS,
    "cloud": Method("M_cloud (non-personalized)", prompted("cloud"), False),
    "cloud+bm25": Method("M_cloud + BM25", prompted("cloud", "bm25"), False),
    "device+bm25": Method("M_device + BM25", prompted("device", "bm25"), False),
    "cloud+dense": Method(f"M_cloud + dense ({encoder.EMBEDDED})", prompted("cloud", encoder.EMBEDDED), False),
    "device+dense": Method(f"M_device + dense ({encoder.EMBEDDED})", prompted("device", encoder.EMBEDDED), False),
    "cloud+contriever": Method("M_cloud + Contriever", prompted("cloud", CONTRIEVER), False),
    "device+contriever": Method("M_device + Contriever", prompted("device", CONTRIEVER), False),
    "speculative": Method("Speculative (M_cloud drafts, Direct-FT verifies)", speculative, False),
    "eda-ft": Method("EDA-FT", lambda run: run.personalized("eda-ft", eda_pairs(run)), False),
    "rkd-ft": Method("RKD-FT", rkd_ft, False),
    "rs": Method("CDCDA-PLM, random selection (RS)", lambda run: run.personalized(
        "rs", cdcda.download(run.pairs, random_selection(run))), True),
    "no-ds": Method("CDCDA-PLM, no selection (-DS)", lambda run: run.personalized(
        "no-ds", cdcda.download(run.pairs, candidates(run))), True),
}


