"""Running at scale, beyond the paper's method: what a run will cost before it runs (plan.py).

Sharding a run over processes is the core's (runner.py); this estimates its size and time.
"""
