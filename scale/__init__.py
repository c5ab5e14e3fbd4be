"""Running at scale, beyond the paper's one-machine method: shards of a run's users over many
processes (shards.py) and what a run will cost before it runs (plan.py), both `python -m scale`.
"""
