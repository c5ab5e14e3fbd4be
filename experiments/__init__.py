"""The paper's other tables and figures (sec. 5.2-5.6, appendices), on top of the method.

`python -m experiments`: Table 1 (methods.py: cloud, RAG, speculative decoding, EDA-FT, RKD-FT),
Table 2 (the ablations), Figure 2 (the k sweep) and Table 4 (t5.py: a T5 device model);
`python -m experiments.efficiency`: Table 3. baselines.py and speculative.py hold the
baselines' own pieces.
"""
