"""The offline stages, each a ``python -m tritonrlhf.engine.cli STAGE`` command: SFT, reward modelling,
DPO, best-of-n and evaluation, and what they share (``common``)."""
