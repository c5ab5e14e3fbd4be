"""Fixtures shared by the pipeline, cloud and experiments tests."""
import pytest
import torch

import qwen2


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random decoder (2 layers of width 32) with SmolLM2's real tokenizer, saved
    hub-style. Untied: a tied random model echoes its last input token (always the same
    newline here), so every reply would come out empty."""
    tokenizer = qwen2.Tokenizer.from_dir(qwen2.embedded_dir())
    torch.manual_seed(0)
    config = qwen2.Config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                          model_type="llama", rms_norm_eps=1e-5)
    directory = tmp_path_factory.mktemp("tiny")
    qwen2.save_pretrained(qwen2.Qwen2(config), tokenizer, directory)
    return directory
