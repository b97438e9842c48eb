"""TRL's ``PPOTrainer`` (``trl.experimental.ppo``, TRL 1.12) on the benchmark's work, run inside TRL's
own virtual environment.

``python benchmarks/peers/trl_ppo.py SPEC.json OUT.json`` (started by ``benchmarks/bench_ppo.py
--peer trl`` with the peer environment's interpreter; it imports nothing from this repository).
SPEC gives the policy directory and the reward-model directory (both saved by the benchmark, the
same weights our engine loads), the prompts, prompts per step, response length, temperature, KL
coefficient, learning rate, value coefficient and step count.

The policy and the reference are ``AutoModelForCausalLM`` from the policy directory; the reward
and value models are ``AutoModelForSequenceClassification`` (``num_labels=1``) from the reward
directory (TRL reads their backbone through ``base_model_prefix``, ``model`` for Llama, and their
``score`` head). One PPO epoch, one mini-batch: one optimizer step per generated batch.

``PPOTrainer.train`` runs every update in one call and fires ``on_step_end`` after each update's
optimizer step and logging (it never fires ``on_step_begin``), so update k's seconds are the time
from the previous ``on_step_end`` (``on_train_begin`` for the first) to its own: generation, the
reference, value and reward forwards, GAE, the update, and the loop's own ``gc.collect``.
``num_sample_generations=0`` keeps TRL's sample printing out of the timed loop. OUT gets the
per-update seconds and TRL's own metrics.
"""

from __future__ import annotations

import json
import sys
import time

from _result import write_result  # beside this script


def main(spec_path: str, out_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    spec = json.loads(open(spec_path).read())
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    tok.padding_side = "left"  # TRL generates from left-padded queries
    fp32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **fp32)
    ref_policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **fp32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        spec["reward_dir"], num_labels=1, **fp32
    )
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1, **fp32)
    per_step, steps = spec["prompts_per_step"], spec["steps"]
    args = PPOConfig(
        output_dir=spec["work_dir"],
        per_device_train_batch_size=per_step,  # prompts per update
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=1,  # with one mini-batch: one optimizer step per generated batch
        total_episodes=per_step * steps,
        local_rollout_forward_batch_size=per_step,  # the whole batch in one generate call
        response_length=spec["max_new_tokens"],
        stop_token="eos",  # responses end at <eos>, as ours do
        temperature=spec["temperature"],
        kl_coef=spec["kl_coef"],
        kl_estimator="k1",
        whiten_rewards=False,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=spec["vf_coef"],
        gamma=1.0,
        lam=0.95,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        num_sample_generations=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=spec["seed"],
    )
    # Our PromptDataset's ids: no special tokens from the tokenizer, <bos> prepended.
    ids = [[tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]] for p in spec["prompts"]]
    dataset = Dataset.from_dict({"input_ids": ids})
    ends: list[float] = []

    class UpdateTimer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(per_step)),  # unused (no sample generations); TRL wants one
        callbacks=[UpdateTimer()],
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "objective/scores" in r]
    write_result(
        out_path,
        step_s=[b - a for a, b in zip(ends, ends[1:])],
        reward=[r["objective/scores"] for r in logs],
        kl=[r.get("objective/kl") for r in logs],
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
