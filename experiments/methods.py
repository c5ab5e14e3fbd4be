"""The rows of the paper's Table 1 and Table 2 that are not the method's own (sec. 5.1-5.3).

Each row is a function of (`cdcda.Shared`, a target user, the user's seed) -> `cdcda.Answers`,
built from the method's own steps, in `METHODS`; the harness (runner.py) runs, keeps and scores
them like the method's own three:
- cloud: M_cloud answers the appendix-B prompt, not personalized ("base": M_base does).
- RAG (sec. 5.1, "one retriever item"): the user's profile item that ranks first for the
  query's content (the query input without the task instruction, as `data.Task.pair` leaves it
  out of the pairs) goes into the prompt's {RETRIEVED USER HISTORY}. BM25: Okapi, k1 = 1.2,
  b = 0.75 (baselines.BM25). Dense: the embedded MiniLM, cosine; "+contriever" rows use
  facebook/contriever, unnormalised dot product (a hub download: not in `--methods all`).
- speculative: M_cloud drafts gamma = 4 tokens, the personalized device model (Direct-FT's
  adapter on M_base: the row sits among the on-device personalized ones) verifies by exact
  rejection sampling, so the output is distributed as Direct-FT's (speculative.py says why);
  the acceptance rate is reported (speculative.json in the user's directory).
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
from pathlib import Path

import torch

import cdcda
import encoder
import generate
import hub
import lora
import qwen2
import runner
from augment import augment
from cdcda import Answers, Method, answer, download, personalize, upload
from deployment.methods import load_adapter
from experiments import baselines, speculative as spec
from filters import select

WORDNET_DIR = "/usr/share/wordnet"  # Debian's wordnet-base
CONTRIEVER = "facebook/contriever"
GAMMA = 4  # drafted tokens per verification
EDA_ALPHA = 0.1


# ---------------------------------------------------------------- models, loaded once per process
@functools.cache
def load_cloud(source: str, dtype: str, device: str):
    print(f"loading the cloud model {source} ({dtype}) in process for the cloud baselines")
    return qwen2.load(source, dtype, device)


def cloud_lm(s: cdcda.Shared):
    """(model, tokenizer) of M_cloud: the run's, or loaded here when the run did not load it (no
    row asked it for steps 2-3) or only has its tokenizer (--cloud-api)."""
    if s.cloud is not None and s.cloud.model is not None:
        return s.cloud.model, s.cloud.tokenizer
    return load_cloud(s.settings.cloud_model, s.settings.cloud_dtype, s.settings.torch_device)


load_encoder = functools.cache(encoder.load)  # (source, dtype, device) -> (model, tokenizer)
wordnet = functools.cache(baselines.load_wordnet)  # directory -> {lemma: synonyms}


def user_dir(s: cdcda.Shared, user) -> Path:
    return runner.user_dir(s.settings, user)


# ---------------------------------------------------------------- Table 1
def retrieve(s: cdcda.Shared, user, retriever: str) -> list[dict]:
    """The one profile item each query retrieves: ranked by BM25 or by a dense encoder for the
    query's content, over each item's field values."""
    documents = [" ".join(str(item[f]) for f in s.task.profile_fields) for item in user.profile]
    picked = []
    for q in user.queries:
        query = q.input.removeprefix(s.task.instruction)
        if retriever == "bm25":
            (i,) = baselines.retrieve_bm25(query, documents, k=1)
        else:
            model, tok = load_encoder(retriever, "float32", s.settings.torch_device)
            embed = functools.partial(encoder.sentence_embeddings, model, tok, normalize=retriever != CONTRIEVER)
            (i,) = baselines.retrieve_dense(query, documents, embed, k=1)
        picked.append(user.profile[i])
    return picked


def prompted(where: str, retriever: str | None = None):
    """A row where M_cloud or the device's M_base answers the appendix-B prompt as it is, or
    with one retrieved item in it (RAG) when a retriever is named."""
    def method(s: cdcda.Shared, user, seed: int) -> Answers:
        model, tok = cloud_lm(s) if where == "cloud" else (s.device.model, s.device.tokenizer)
        items = retrieve(s, user, retriever) if retriever else [None] * len(user.queries)
        conversations = [s.task.messages(q.input, retrieved=[item] if item else [])
                         for q, item in zip(user.queries, items)]
        chat = generate.chat if where == "cloud" else s.device.family.chat or generate.chat
        texts = chat(model, tok, conversations, max_new_tokens=cdcda.ANSWER_TOKENS[s.task.name],
                     temperature=s.settings.answer_temperature, seed=seed, desc=f"answer {where}")
        return Answers(texts)
    return method


def direct_ft_model(s: cdcda.Shared, user, seed: int):
    """The Direct-FT personalized device model: its adapter from the user's directory when the
    direct-ft row already trained it (same settings: the harness checks), else trained here."""
    path = user_dir(s, user) / "direct-ft.adapter.safetensors"
    if path.is_file():
        model = lora.add_lora(copy.deepcopy(s.device.model), r=s.settings.lora_r, alpha=s.settings.lora_alpha,
                              seed=seed)
        return load_adapter(model, path).eval()
    return personalize(s.device, s.task, upload(s.task, user, s.rewrites), s.settings, seed)[0]


def speculative(s: cdcda.Shared, user, seed: int) -> Answers:
    """Speculative decoding, one query at a time: M_cloud drafts, Direct-FT's model verifies."""
    target, tok = direct_ft_model(s, user, seed), s.device.tokenizer
    draft, cloud_tok = cloud_lm(s)
    spec.check_shared_tokenizer(tok, cloud_tok, "cloud")
    same = target.config.vocab_size == draft.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    answers, totals = [], {"drafted": 0, "accepted": 0, "target_calls": 0, "new_tokens": 0}
    for q in user.queries:
        prompt = tok.encode(tok.apply_chat_template(s.task.messages(q.input)))
        ids, stats = spec.speculative_generate(
            target, draft, torch.tensor([prompt]), cdcda.ANSWER_TOKENS[s.task.name], gamma=GAMMA,
            temperature=s.settings.answer_temperature, eos_token_id=tok.eos_token_ids, generator=generator,
            vocab_size=None if same else tok.tokenizer.get_vocab_size())
        answers.append(tok.decode(ids[0, len(prompt):].tolist()).strip())  # up to the eos (special: dropped)
        totals = {key: totals[key] + stats[key] for key in totals}
    user_dir(s, user).mkdir(parents=True, exist_ok=True)
    hub.write_atomic(user_dir(s, user) / "speculative.json", json.dumps(totals))
    return Answers(answers)


def eda_pairs(pairs, k: int, seed: int) -> list[tuple[str, str]]:
    """D_u plus k EDA variants of each pair's input, each with the pair's response."""
    rng, wn = random.Random(seed), wordnet(WORDNET_DIR)
    return list(pairs) + [(variant, y) for x, y in pairs
                          for variant in baselines.eda(x, wn, alpha=EDA_ALPHA, n_aug=k, rng=rng)]


def eda_ft(s: cdcda.Shared, user, seed: int) -> Answers:
    """EDA-FT: Direct-FT on D_u and its EDA variants (`eda_pairs`): k per pair, as CDCDA-PLM's budget."""
    pairs = eda_pairs(upload(s.task, user, s.rewrites), s.settings.k, seed)
    model, losses = personalize(s.device, s.task, pairs, s.settings, seed)
    return Answers(answer(s.device, model, s.task, user.queries, s.settings, seed), model, losses)


def rkd_ft(s: cdcda.Shared, user, seed: int) -> Answers:
    """RKD-FT: a fresh LoRA on M_base distilled from M_cloud with reverse KL on D_u."""
    teacher, cloud_tok = cloud_lm(s)
    student = lora.add_lora(copy.deepcopy(s.device.model), r=s.settings.lora_r, alpha=s.settings.lora_alpha,
                            seed=seed)
    losses = baselines.rkd_finetune(
        student, teacher, s.device.tokenizer, cdcda.examples(s.task, upload(s.task, user, s.rewrites)),
        s.settings, seed=seed, desc=f"rkd-ft {user.user_id}", teacher_tokenizer=cloud_tok)
    return Answers(answer(s.device, student.eval(), s.task, user.queries, s.settings, seed), student, losses)


# ---------------------------------------------------------------- Table 2
def ablation(keep):
    """A row of Table 2: CDCDA-PLM with step 3 replaced by `keep(candidates, selection, seed)`,
    which picks the synthetic pairs the device trains on."""
    def method(s: cdcda.Shared, user, seed: int) -> Answers:
        pairs = upload(s.task, user, s.rewrites)
        candidates = augment(s.cloud, pairs, s.settings, seed, s.task)
        selection = select(pairs, candidates, s.judge, s.settings)
        model, losses = personalize(s.device, s.task, download(pairs, keep(candidates, selection, seed)),
                                    s.settings, seed)
        return Answers(answer(s.device, model, s.task, user.queries, s.settings, seed), model, losses, selection)
    return method


def random_selection(candidates, selection, seed: int) -> list[tuple[str, str]]:
    """RS: as many parsed candidates as the filters kept, drawn at random (seeded per user)."""
    return random.Random(seed).sample(candidates.pairs, len(selection.kept))


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
    "eda-ft": Method("EDA-FT", eda_ft, False),
    "rkd-ft": Method("RKD-FT", rkd_ft, False),
    "rs": Method("CDCDA-PLM, random selection (RS)", ablation(random_selection), True),
    "no-ds": Method("CDCDA-PLM, no selection (-DS)", ablation(lambda candidates, _, __: candidates.pairs), True),
}
