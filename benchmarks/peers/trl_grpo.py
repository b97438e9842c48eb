"""TRL's ``GRPOTrainer`` on the benchmark's work, run inside TRL's own virtual environment.

``python benchmarks/peers/trl_grpo.py SPEC.json OUT.json`` (started by ``benchmarks/bench_grpo.py``
with the peer environment's interpreter; it imports nothing from this repository). SPEC gives the
model directory (saved by the benchmark, the same weights our engine loads), the prompts, the
batch (prompts per step, group size), new tokens, beta, learning rate and step count. Every step
is timed from ``on_step_begin`` to ``on_step_end`` (generation, reference and policy forward,
reward, loss, backward, optimizer step); OUT gets the per-step seconds and TRL's own metrics.
"""

from __future__ import annotations

import json
import re
import sys
import time

from _result import write_result  # beside this script


def toy_reward(prompts, completions, **_):
    """The engine's ``tritonrlhf.engine.tasks:toy_reward``, restated (this process cannot import the engine):
    the fraction of the response's characters equal to the letter in the prompt's ``say c:``."""
    out = []
    for prompt, completion in zip(prompts, completions):
        found = re.findall(r"say (\S):", prompt)
        target = found[-1].lower() if found else ""
        text = completion.lower()
        out.append(text.count(target) / len(text) if text and target else 0.0)
    return out


def main(spec_path: str, out_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    spec = json.loads(open(spec_path).read())
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], torch_dtype=torch.float32)
    n, prompts_per_step = spec["group_size"], spec["prompts_per_step"]
    args = GRPOConfig(
        output_dir=spec["work_dir"],
        per_device_train_batch_size=prompts_per_step * n,  # completions per optimizer step
        gradient_accumulation_steps=1,
        num_generations=n,
        num_iterations=1,  # one optimizer step per generated batch
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0,
        beta=spec["beta"],  # > 0: TRL builds the reference model
        loss_type="grpo",  # sequence mean of token means, as our grpo's default
        scale_rewards="group",
        epsilon=0.2,
        epsilon_high=0.28,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        max_steps=spec["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=spec["seed"],
    )
    dataset = Dataset.from_dict({"prompt": spec["prompts"]})
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=toy_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[StepTimer()],
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "reward" in r]
    write_result(
        out_path,
        step_s=times,
        reward=[r["reward"] for r in logs],
        completion_len=[r.get("completions/mean_length") for r in logs],
        kl=[r.get("kl") for r in logs],
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
