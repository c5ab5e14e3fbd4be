"""efficiency.py: Table 3's sizes, memory and speeds on tiny random decoders, both modes."""
import argparse
import json

import pytest

import qwen2
from experiments import efficiency


def args_for(model_dir="", paper_shapes=False):
    return argparse.Namespace(cloud_model=str(model_dir), device_model=str(model_dir), lora_r=16, lora_alpha=8,
                              device="cpu", runs=1, new_tokens=3, paper_shapes=paper_shapes, rows=None)


def test_efficiency_rows_sizes_and_ratios(tiny_model_dir, tmp_path):
    rep = efficiency.efficiency(args_for(tiny_model_dir), prompt_tokens=16, isolate=False, partial=tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["rows"] == rep["rows"]  # written as the rows finish
    cloud, device, deployed = rep["rows"]["cloud"], rep["rows"]["device"], rep["rows"]["deployed"]
    for row in (cloud, device, deployed):
        assert row["size_mb"] > 0 and row["ttft_s"] > 0 and row["decode_tok_s"] > 0
        assert isinstance(row["peak_mb"], float)  # in process (isolate=False) earlier rows' memory blurs it
    model, _ = qwen2.load(str(tiny_model_dir))
    linear = sum(p.numel() for n, p in model.model.layers.named_parameters() if n.endswith("proj.weight"))
    nf4_bytes = (device["nf4 codes mb"] + device["nf4 absmax mb"]) * 1e6
    assert nf4_bytes == pytest.approx(linear * (0.5 + 4 / 64))  # 4 bits + one fp32 absmax per 64
    assert cloud["size_mb"] * 1e6 == pytest.approx(sum(p.numel() * 4 for p in model.parameters()))
    assert device["lora mb"] > 0 and cloud["nf4 codes mb"] == 0
    assert deployed["int4 codes mb"] * 1e6 == pytest.approx(linear / 2)  # 4 bits, + 2 x bf16 per 32 weights:
    assert deployed["int4 scales+zeros mb"] * 1e6 == pytest.approx(linear / 32 * 4)
    assert deployed["size_mb"] < device["size_mb"] < cloud["size_mb"]
    assert [line.split(":")[0] for line in rep["ratios"]] == ["deployed vs the cloud model", "deployed vs NF4 + LoRA"]


def test_paper_shapes_mode_on_tiny_shapes(monkeypatch):
    tiny = dict(efficiency.QWEN25, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4)
    monkeypatch.setattr(efficiency, "PAPER_SHAPES", {"Qwen2.5-3B-Instruct": dict(tiny, hidden_size=128),
                                                     "Qwen2.5-0.5B-Instruct": tiny})
    rep = efficiency.efficiency(args_for(paper_shapes=True), prompt_tokens=8, isolate=False)
    expected = {"cloud", "device", "deployed", "device-bf16", "device-fp32", "bnb-nf4"}
    ran = set(rep["rows"])
    assert ran == expected or (ran == expected - {"bnb-nf4"} and rep["skipped"])  # the anchor needs bitsandbytes
    rows = rep["rows"]
    assert rows["device-fp32"]["size_mb"] == pytest.approx(2 * rows["device-bf16"]["size_mb"])
    assert rows["cloud"]["size_mb"] > rows["device-bf16"]["size_mb"] > rows["deployed"]["size_mb"]
    assert "random weights" in rep["models"]["setup"] and len(rep["ratios"]) == len(ran & {"cloud", "device",
                                                                                         "device-bf16", "bnb-nf4"})


def test_rows_option_picks_rows(tiny_model_dir):
    args = args_for(tiny_model_dir)
    args.rows = ["deployed"]
    assert list(efficiency.efficiency(args, prompt_tokens=8, isolate=False)["rows"]) == ["deployed"]
