"""The demo: a task with a hidden gold scorer (``task``), the pipeline that runs every stage on it
(``python -m tritonrlhf.engine.demo.pipeline``), and its studies (``kl_sweep``, ``rm_probe``)."""
