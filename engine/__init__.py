"""The RLHF engine: config, data, models and checkpoints (this folder), RL (``rl/``), the offline stages
(``stages/``) and the demo (``demo/``). Imported as ``tritonrlhf.engine``."""

if __name__ == "engine":  # this folder reached by its bare name from a checkout's root: not ours to take
    from tritonrlhf import _yield_bare_name

    _yield_bare_name(__name__, globals())
