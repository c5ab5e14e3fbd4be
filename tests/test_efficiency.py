"""efficiency.py: Table 3's sizes and speeds on the tiny random decoder."""
import argparse

import pytest

import efficiency
import qwen2


def test_efficiency_numbers_are_positive_and_nf4_is_smaller(tiny_model_dir):
    args = argparse.Namespace(cloud_model=str(tiny_model_dir), device_model=str(tiny_model_dir), lora_r=16,
                              lora_alpha=8, device="cpu")
    rep = efficiency.efficiency(args, prompt_tokens=16, new_tokens=4, runs=1)
    cloud, device = rep["rows"]["cloud"], rep["rows"]["device"]
    for row in (cloud, device):
        assert row["size_mb"] > 0 and row["ttft_s"] > 0 and row["decode_tok_s"] > 0
    model, _ = qwen2.load(str(tiny_model_dir))
    linear_fp32 = sum(p.numel() * 4 for n, p in model.model.layers.named_parameters() if n.endswith("proj.weight"))
    nf4_bytes = (device["nf4 codes mb"] + device["nf4 absmax mb"]) * 1e6
    assert nf4_bytes == pytest.approx(linear_fp32 * (0.5 + 4 / 64) / 4)  # 4 bits + one fp32 absmax per 64
    assert cloud["size_mb"] * 1e6 == pytest.approx(sum(p.numel() * 4 for p in model.parameters()))
    assert device["size_mb"] < cloud["size_mb"] and device["lora mb"] > 0 and cloud["nf4 codes mb"] == 0
