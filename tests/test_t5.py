"""t5.py: the FlanT5 forward held against transformers' T5ForConditionalGeneration, its
generation, LoRA (against peft) and NF4 on it, eq. 6 for seq2seq, and the pipeline end to end
on a tiny random T5 (Table 4's device model)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import cdcda
import data
import generate
import lora
import nf4
import options
import qwen2
import train
from deployment import __main__ as run_deployment
from errors import InputError
from experiments import __main__ as experiments_main, t5
from online import __main__ as run_online


def test_position_buckets_by_hand():
    rel = torch.tensor([0, -1, 1, -2, -5, -7, -100, 3])
    # bidirectional, 8 buckets -> 4 per side, 2 exact; log bins 2 + floor(log(d/2) / log(20/2) * 2)
    assert t5.position_bucket(rel, True, 8, 20).tolist() == [0, 1, 5, 2, 2, 3, 3, 4 + 2 + 0]
    # causal: the future is bucket 0; 8 buckets, 4 exact; -10: 4 + floor(log(2.5) / log(5) * 4) = 6
    rel = torch.tensor([1, 0, -1, -3, -4, -10, -30])
    assert t5.position_bucket(rel, False, 8, 20).tolist() == [0, 0, 1, 3, 4, 6, 7]


def test_position_buckets_equal_transformers():
    transformers = pytest.importorskip("transformers")
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    rel = torch.arange(-200, 200)[None] - torch.arange(0, 50)[:, None]
    for bidirectional in (True, False):
        ours = t5.position_bucket(rel, bidirectional, 32, 128)
        assert torch.equal(ours, bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128))


def test_layer_norm_by_hand():
    norm = t5.LayerNorm(2, eps=0.0)
    norm.weight.data = torch.tensor([1.0, 2.0])
    out = norm(torch.tensor([[3.0, 4.0]]))  # rms = sqrt((9 + 16) / 2); no mean subtracted
    assert torch.allclose(out, torch.tensor([[3.0, 8.0]]) / math.sqrt(12.5))


def batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 30), generator=g)  # 30 > max_distance 20: the log buckets count
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[2, 21:] = 0  # right padding
    return ids, mask, torch.randint(3, vocab, (3, 25), generator=g)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_transformers(tmp_path, t5_checkpoint, tied):
    ref = t5_checkpoint(tmp_path, tied=tied, num_decoder_layers=3)
    model, tok = t5.load(tmp_path)
    assert model.config.tie_word_embeddings == tied and (model.lm_head.weight is model.shared.weight) == tied
    ids, mask, dec = batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids, dec, mask)
        theirs = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert theirs.abs().max() > 1.0
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
        row = model(ids[1:2, 7:], dec[1:2])  # the padded row alone, without its padding
    assert torch.allclose(row, ours[1:2], atol=1e-5, rtol=0)


def written_forms(tmp_path, t5_checkpoint) -> dict:
    """One tiny FlanT5 in the three forms a loader meets: "hub" (the hub's FlanT5 files:
    tie_word_embeddings false, no scale_decoder_outputs key, its own lm_head.weight), "resaved"
    (that model loaded and written by the installed transformers' save_pretrained: tie true,
    scale_decoder_outputs false, still its own head) and "fresh" (a FlanT5 built and saved by
    transformers 5: tie true, scale false, one shared matrix). name -> directory."""
    transformers = pytest.importorskip("transformers")
    t5_checkpoint(tmp_path / "hub")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    del config["scale_decoder_outputs"]  # the hub's files predate the key
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    ref = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hub")
    ref.save_pretrained(tmp_path / "resaved")
    fresh = transformers.T5ForConditionalGeneration(transformers.T5Config(**config))
    fresh.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}, strict=False)
    fresh.save_pretrained(tmp_path / "fresh")
    for name in ("resaved", "fresh"):
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / name / file).write_bytes((tmp_path / "hub" / file).read_bytes())
    return {name: tmp_path / name for name in ("hub", "resaved", "fresh")}


def test_every_written_form_of_a_flan_t5_loads_as_transformers_reads_it(tmp_path, t5_checkpoint):
    """transformers 5 writes a FlanT5 as `tie_word_embeddings: true, scale_decoder_outputs: false`:
    the decoder output must not be rescaled, and a head stored in the file is the head."""
    transformers = pytest.importorskip("transformers")
    forms = written_forms(tmp_path, t5_checkpoint)
    written = {name: json.loads((d / "config.json").read_text()) for name, d in forms.items()}
    assert written["hub"]["tie_word_embeddings"] is False and "scale_decoder_outputs" not in written["hub"]
    assert all(written[n]["tie_word_embeddings"] is True and written[n]["scale_decoder_outputs"] is False
               for n in ("resaved", "fresh"))
    ids, mask, dec = batch(written["hub"]["vocab_size"])
    for name, directory in forms.items():
        ref = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
        model, tok = t5.load(directory)
        assert model.config.scale_decoder_outputs is False
        assert (model.lm_head.weight is model.shared.weight) == (name == "fresh")
        with torch.no_grad():
            ours = model(ids, dec, mask)
            theirs = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            scale = max(1.0, theirs.abs().max().item())  # the fresh form's tied head gives logits near 30
            assert torch.allclose(ours, theirs, atol=1e-5 * scale, rtol=0), name
            t5.save_pretrained(model, tok, tmp_path / f"ours-{name}")  # and ours, as transformers reads it
            again = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / f"ours-{name}").eval()
            assert torch.allclose(again(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ours,
                                  atol=1e-5 * scale, rtol=0), name
    scaled = t5.Config(vocab_size=8, d_model=4, d_kv=2, d_ff=4, num_layers=1, num_heads=2)
    assert scaled.scale_decoder_outputs is True  # no key, tied (HF's default): the original T5's rescaling
    assert t5.Config(**scaled.to_dict() | {"scale_decoder_outputs": False}).scale_decoder_outputs is False


def test_save_and_load_round_trip(tmp_path, t5_checkpoint):
    t5_checkpoint(tmp_path / "a")
    model, tok = t5.load(tmp_path / "a")
    t5.save_pretrained(model, tok, tmp_path / "b")
    again, tok2 = t5.load(tmp_path / "b")
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    assert tok2.encode("the cat sat") == tok.encode("the cat sat")
    assert t5.family(tmp_path / "b") == cdcda.Family(t5.load, t5.save_pretrained, t5.Config.from_json, t5.chat,
                                                     t5.response_loss)
    assert t5.family(qwen2.EMBEDDED) == cdcda.Family()  # the decoder's


def test_cached_decoding_equals_the_full_forward(tmp_path, t5_checkpoint):
    t5_checkpoint(tmp_path)
    model, _ = t5.load(tmp_path)
    ids, mask, dec = batch(model.config.vocab_size)
    with torch.no_grad():
        full = model(ids, dec, mask)
        cross = model.cross_kv(model.encode(ids, mask))
        cache = qwen2.KVCache(type("C", (), dict(num_hidden_layers=2, num_key_value_heads=4, head_dim=8)), 3, 25)
        steps = [model.lm_head(model.decode(dec[:, i:i + 1], cross, mask, cache)) for i in range(25)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_greedy_generation_equals_transformers(tmp_path, t5_checkpoint):
    ref = t5_checkpoint(tmp_path)
    model, _ = t5.load(tmp_path)
    ids, mask, _ = batch(model.config.vocab_size, seed=3)
    theirs = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, 1:]
    ours = t5.generate_ids(model, ids, 12, temperature=0, attention_mask=mask)[:, ids.shape[1]:]
    def upto_eos(row):  # a finished row: HF pads it with <pad>, we repeat </s>
        return row[:row.index(1) + 1] if 1 in row else row
    assert [upto_eos(r) for r in ours.tolist()] == [upto_eos(r) for r in theirs.tolist()]
    assert len(set(ours[0].tolist())) > 1


def test_sampled_generation_is_seeded_and_varies(tmp_path, t5_checkpoint):
    t5_checkpoint(tmp_path)
    model, _ = t5.load(tmp_path)
    ids, mask, _ = batch(model.config.vocab_size)

    def draw(seed):
        return t5.generate_ids(model, ids, 10, temperature=1.0, attention_mask=mask, eos_token_id=[],
                               generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))


def test_plain_text_prompt_and_chat(tmp_path, t5_checkpoint):
    t5_checkpoint(tmp_path)
    model, tok = t5.load(tmp_path)
    task = data.get_task("lamp7")
    messages = task.messages(task.pair_input.format(text="the cat sat"))
    text = tok.apply_chat_template(messages)
    assert text == task.system + task.pair_input.format(text="the cat sat") + task.user_end + "</s>"
    assert tok.encode(text)[-1] == 1 and tok.eos_token_ids == [1] and tok.pad_token_id == 0
    replies = t5.chat(model, tok, [messages] * 3, max_new_tokens=6, temperature=0.0)
    ids, mask = generate.left_pad([tok.encode(text)], 0)
    expected = t5.generate_ids(model, ids, 6, temperature=0.0, eos_token_id=[1], attention_mask=mask)
    assert replies == [generate.reply_text(tok, expected[0, ids.shape[1]:].tolist())[0].strip()] * 3
    with pytest.raises(ValueError, match="reply prefix"):  # the cloud's priming is for a decoder
        t5.chat(model, tok, [messages], max_new_tokens=2, reply_prefix="Input: [")


def test_response_loss_equals_transformers_labels_loss(tmp_path, t5_checkpoint):
    ref = t5_checkpoint(tmp_path)
    model, tok = t5.load(tmp_path)
    examples = [([{"role": "user", "content": "the cat sat on the mat"}], "a dog ran"),
                ([{"role": "user", "content": "hello"}], "rain again this weekend ugh")]
    encoded = [train.encode_example(tok, m, r, 64) for m, r in examples]
    assert all(ids[n - 1] == 1 and ids[-1] == 1 for ids, n in encoded)  # prompt and response end in </s>
    ids, labels = train.right_pad(encoded, tok.pad_token_id)
    ours = t5.response_loss(model, ids, labels)  # the loss t5.family hands train.finetune
    enc, mask = generate.left_pad([i[:n] for i, n in encoded], 0)
    answers = [i[n:] for i, n in encoded]
    hf_labels = torch.full((2, max(map(len, answers))), -100)
    for row, a in enumerate(answers):
        hf_labels[row, :len(a)] = torch.tensor(a)
    with torch.no_grad():
        theirs = ref(input_ids=enc, attention_mask=mask, labels=hf_labels).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.1


def test_lora_equals_peft_on_every_linear_layer(tmp_path, t5_checkpoint):
    peft = pytest.importorskip("peft")
    ref = t5_checkpoint(tmp_path)
    model, _ = t5.load(tmp_path)
    lora.add_lora(model, r=4, alpha=8)
    assert lora.lora_settings(model)["targets"] == sorted(t5.T5.lora_targets)
    assert sum(isinstance(m, lora.LoRALinear) for m in model.modules()) == 2 * 7 + 2 * 11  # encoder, decoder
    reference = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(t5.T5.lora_targets)))
    randomize_b(model)
    for name, m in model.named_modules():
        if isinstance(m, lora.LoRALinear):
            theirs = reference.get_submodule("base_model.model." + name)
            theirs.lora_A["default"].weight.data.copy_(m.lora_A)
            theirs.lora_B["default"].weight.data.copy_(m.lora_B)
    ids, mask, dec = batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids, dec, mask)
        theirs = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    keys = set(lora.merge(model).state_dict())
    assert keys == set(t5.load(tmp_path)[0].state_dict())  # merged: the checkpoint's own keys


def test_nf4_quantizes_block_linears_and_finetuning_lowers_the_loss(tmp_path, t5_checkpoint):
    t5_checkpoint(tmp_path)
    model, tok = t5.load(tmp_path)
    ids, mask, dec = batch(model.config.vocab_size)
    dequantized = t5.load(tmp_path)[0]  # the fp32 model with each block weight replaced by its NF4 values
    for block in dequantized.blocks():
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = nf4.NF4Linear(m, torch.float32).dequantized()
    with torch.no_grad():
        ref, expected = model(ids, dec, mask), dequantized(ids, dec, mask)
    nf4.quantize_model(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, nf4.NF4Linear))}
    assert kinds.pop("lm_head") == "Linear" and set(kinds.values()) == {"NF4Linear"} and len(kinds) == 2 * 7 + 2 * 11
    assert model.shared.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(ids, dec, mask)
    assert F.cosine_similarity(logits.float().flatten(), expected.flatten(), dim=0) > 0.999  # bf16 compute only
    assert F.cosine_similarity(logits.float().flatten(), ref.flatten(), dim=0) > 0.9  # 4-bit weights of a tiny model
    lora.add_lora(model)
    examples = [([{"role": "user", "content": "the cat sat"}], "a dog ran fast")] * 4
    losses = train.finetune(model, tok, examples, options.Settings(epochs=4, lr=1e-2, batch_size=2, max_length=32),
                            loss=t5.response_loss)
    assert losses[-1] < losses[0] / 2
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_pipeline_end_to_end_on_a_tiny_t5(tmp_path, monkeypatch, tiny_model_dir, t5_checkpoint, fake_cloud,
                                          tiny_args):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    task = data.get_task("lamp7")
    corpus = [task.system, task.instruction] + [item["text"] for u in data.load_users("lamp7") for item in u.profile]
    t5_checkpoint(tmp_path / "flan", corpus=corpus)
    argv = tiny_args(tiny_model_dir, tmp_path / "run")
    argv[argv.index("--device-model") + 1] = str(tmp_path / "flan")
    argv[argv.index("--max-length") + 1] = "160"
    rep = experiments_main.main(argv + ["--table4", "lamp7"])["table4"]
    assert set(rep["lamp7"]["rows"]) == {"device+bm25", "cdcda"}
    for row in rep["lamp7"]["rows"].values():
        assert 0 <= row["rouge1"] <= 1
    assert rep["lamp7"]["rows"]["cdcda"]["gold_nll"] > 0
    text = (tmp_path / "run" / "table4.md").read_text()
    assert "LaMP-7 (R-1)" in text and "| LaMP-2 (Acc) | - | - |" in text
    user = json.loads((tmp_path / "run" / "lamp7" / "run.json").read_text())
    assert user["device_model"] == str(tmp_path / "flan")
    adapters = list((tmp_path / "run" / "lamp7" / "users").glob("*/cdcda.adapter/adapter_config.json"))
    assert adapters
    assert json.loads(next((tmp_path / "cache" / "base").glob("lamp7-*/config.json")).read_text())["model_type"] == "t5"
    argv[argv.index("--out") + 1] = str(tmp_path / "plain")  # cdcda.py's own rows, on the cached M_base
    rep = experiments_main.main(argv + ["--methods", "base,direct-ft"])["table1"]
    assert set(rep["rows"]) == {"base", "direct-ft"} and all(r["gold_nll"] > 0 for r in rep["rows"].values())


@pytest.mark.parametrize("entry, extra, message", [
    (cdcda.main, [], "model_type 't5'"), (run_online.main, ["--buffer", "16"], "model_type 't5'"),
    (run_deployment.main, [], "model_type 't5'"), (experiments_main.main, ["--methods", "base,rkd-ft"], "is a T5")])
def test_a_t5_device_is_refused_where_a_decoder_is_needed_before_any_work(tmp_path, t5_checkpoint, capsys, entry,
                                                                          extra, message):
    """The core, the buffer and deployment run a decoder; Table 4's T5 runs from experiments/."""
    t5_checkpoint(tmp_path / "flan")
    argv = ["--task", "lamp2", "--device-model", str(tmp_path / "flan"), "--out", str(tmp_path / "run")] + extra
    with pytest.raises((InputError, SystemExit)) as raised:
        entry(argv)
    said = str(raised.value) if raised.type is InputError else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in said and "--device-model" in said and not (tmp_path / "run").exists()
