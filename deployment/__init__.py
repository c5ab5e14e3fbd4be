"""Deployment, beyond the paper's method: the personalized model merged and stored in int4.

deploy.py (int4 groups of 32 on torch's fused kernels, int8 embedding), gptq.py (GPTQ
rounding), gridtune.py (the int4 grids tuned toward the personalized model), and
`python -m deployment`, cdcda.py's run with each fine-tuned row also answered deployed.
gguf_export.py writes a deployed model as a GGUF file for llama.cpp (`python -m deployment
--export gguf`); llama_check.py (`make llama-check`) has llama.cpp run it against ours.
"""
