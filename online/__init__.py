"""The second system, beyond the paper: on-device online data selection (Qin et al., DAC'24).

buffer.py (EOE, DSS, IDD, the buffer, the ROUGE-1 synthesis check) and `python -m online`,
cdcda.py's run with the device keeping only what its buffer holds, and the comparison of
buffers against the whole history.
"""
