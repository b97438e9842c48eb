"""Weight sync: bucket packing, the in-process swap, and the 2-rank DeepSpeed ZeRO swap."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import GAP_MAX_TOL_FP32
from tests.engine._scripts.launch import deepspeed_cmd, free_port, run
from tritonrlhf.engine.config import RolloutConfig
from tritonrlhf.engine.rl.rollout import processed_logprobs
from tritonrlhf.engine.rl.weight_sync import (
    ColocatedWeightSync,
    hf_name,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)

SCRIPTS = Path(__file__).parents[1] / "_scripts"
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(SCRIPTS))
from rollout_tiny import build_tiny_llama, save_tiny_llama  # noqa: E402

T = 0.7
PROMPT = [72, 101, 108, 108, 111, 44, 32]
RESPONSE = [119, 111, 114, 108, 100, 33, 10, 65, 66, 67, 256, 5]


# --------------------------------------------------------------------------- packing
def test_plan_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5, generator=g),
        "a.bias": torch.randn(5, generator=g),
        "big": torch.randn(40, 40, generator=g),  # larger than a bucket: alone
        "half": torch.randn(3, 4, generator=g).to(torch.bfloat16),  # dtype change: new bucket
        "b": torch.randn(2, 3, 4, generator=g),
        "c": torch.randn(9, generator=g),
    }
    specs = plan_buckets(((n, t.shape, t.dtype) for n, t in tensors.items()), bucket_bytes=256)
    assert [s.names for s in specs] == [("a.weight", "a.bias"), ("big",), ("half",), ("b", "c")]
    assert all(len({tensors[n].dtype for n in s.names}) == 1 for s in specs)
    assert sum(s.nbytes for s in specs) == sum(t.numel() * t.element_size() for t in tensors.values())
    got = {}
    for spec in specs:
        flat = pack_bucket([tensors[n] for n in spec.names], spec)
        assert flat.dim() == 1 and flat.numel() == spec.numel and flat.dtype == spec.dtype
        views = unpack_bucket(flat, spec)
        assert all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for _, v in views)
        got.update(views)
    assert list(got) == list(tensors)
    for n, t in tensors.items():
        assert torch.equal(got[n], t)
    with pytest.raises(ValueError):
        unpack_bucket(torch.zeros(specs[0].numel + 1), specs[0])


def test_hf_name_strips_wrappers():
    assert hf_name("module.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("module._orig_mod.lm_head.weight") == "lm_head.weight"
    assert hf_name("model.embed_tokens.weight") == "model.embed_tokens.weight"


class _Recorder:
    """A RolloutEngine stand-in that records what a sync delivers."""

    def __init__(self):
        self.buckets, self.version = [], None

    def load_weights(self, named_tensors):
        self.buckets.append([(n, t.clone()) for n, t in named_tensors])

    def finish_sync(self, version):
        self.version = version


def test_colocated_sync_delivers_every_weight_once_in_buckets():
    model = build_tiny_llama()
    wrapped = torch.nn.Module()
    wrapped.module = model  # like DeepSpeedEngine.module
    rec = _Recorder()
    stats = ColocatedWeightSync(wrapped, rec, bucket_bytes=48 << 10).push(version=4)
    sent = [(n, t) for b in rec.buckets for n, t in b]
    params = dict(model.named_parameters())
    assert rec.version == 4 and len(rec.buckets) == stats["sync/buckets"] > 2
    assert [n for n, _ in sent] == list(params)
    assert all(torch.equal(t, params[n]) for n, t in sent)
    assert stats["sync/bytes"] == sum(p.numel() * 4 for p in params.values())


# --------------------------------------------------------------------------- in-process swap
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_sync"))


def _logprobs(model, response=RESPONSE) -> torch.Tensor:
    ids = torch.tensor([PROMPT + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(PROMPT) - 1 : -1]
    return processed_logprobs(logits, ids[0, len(PROMPT) :], T)


def test_in_process_swap_one_rank(tiny_dir, monkeypatch):
    """Plain python, one vLLM engine: an optimizer step, a bucketed push, vLLM follows the trainer."""
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoModelForCausalLM

    from tritonrlhf.engine.rl.rollout import VLLMRollout

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    original = copy.deepcopy(model.state_dict())
    rollout = VLLMRollout(
        str(tiny_dir), RolloutConfig(temperature=T, max_new_tokens=12), seed=0, max_model_len=128
    )
    try:
        # 48 KiB buckets split q/k/v and gate/up of one layer across buckets.
        sync = ColocatedWeightSync(model, rollout, bucket_bytes=48 << 10)
        before = torch.tensor(rollout.sequence_logprobs(PROMPT, RESPONSE))
        cached = rollout.generate([PROMPT], seed=1)[0][0]  # fills the prefix cache with old-weight KV

        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.eval()

        stats = sync.push(version=1)
        after = torch.tensor(rollout.sequence_logprobs(PROMPT, RESPONSE))
        want = _logprobs(model)
        print(f"in-process swap: max gap {(after - want).abs().max():.1e}")
        assert stats["sync/buckets"] > 2 and rollout.policy_version == 1
        assert (after - want).abs().max() < GAP_MAX_TOL_FP32, (
            "vLLM does not follow the trainer after the swap"
        )
        assert (after - before).abs().max() > 5e-2, "the step did not change vLLM's log-probs"
        s = rollout.generate([PROMPT], seed=1)[0][0]
        assert s.policy_version == 1
        assert (torch.tensor(s.logprobs) - _logprobs(model, s.response_ids)).abs().max() < GAP_MAX_TOL_FP32
        assert s.response_ids != cached.response_ids or s.logprobs != cached.logprobs

        model.load_state_dict(original)  # and back: the first weights give the first numbers
        sync.push(version=2)
        assert (torch.tensor(rollout.sequence_logprobs(PROMPT, RESPONSE)) - before).abs().max() < 1e-4
    finally:
        rollout.close()


# --------------------------------------------------------------------------- DeepSpeed, 2 ranks
@pytest.mark.slow
def test_deepspeed_two_ranks_swap(tiny_dir, tmp_path):
    """``deepspeed --num_gpus 2``: each rank's own vLLM engine follows its ZeRO-3/ZeRO-2 actor."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("vllm")
    out = tmp_path / "out"
    port = free_port()
    script = [str(SCRIPTS / "sync_swap_ds.py"), "--model_dir", str(tiny_dir), "--out", str(out)]
    cmd = deepspeed_cmd(2, port, *script, "--stages", "3", "2")
    t0 = time.perf_counter()
    proc = run(cmd, timeout_s=420, port=port, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert proc.returncode == 0, proc.stdout[-8000:]
    print(f"deepspeed 2-rank swap run: {time.perf_counter() - t0:.1f}s")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for res in results:
        assert res["world"] == 2 and res["vllm_world"] == 2 and res["vllm_tp"] == 1
        for stage, st in res["stages"].items():
            pre, pre_t = torch.tensor(st["pre"]), torch.tensor(st["pre_trainer"])
            post, post_t = torch.tensor(st["post"]), torch.tensor(st["post_trainer"])
            assert (pre - pre_t).abs().max() < GAP_MAX_TOL_FP32, (
                f"rank {res['rank']} stage {stage}: pre-step mismatch"
            )
            assert (post - post_t).abs().max() < GAP_MAX_TOL_FP32, (
                f"rank {res['rank']} stage {stage}: vLLM != trainer"
            )
            assert (post - pre).abs().max() > 5e-2, f"rank {res['rank']} stage {stage}: weights did not move"
            assert st["sample_version"] == 1
            assert (
                torch.tensor(st["sample_logprobs"]) - torch.tensor(st["sample_trainer"])
            ).abs().max() < GAP_MAX_TOL_FP32
            assert st["stats"]["sync/buckets"] > 2
            print(f"rank {res['rank']} zero{stage}: {st['stats']}")
    # Both ranks trained on different data but DeepSpeed averages gradients: same weights, same numbers.
    for stage in results[0]["stages"]:
        a, b = (torch.tensor(r["stages"][stage]["post"]) for r in results)
        assert (a - b).abs().max() < 1e-4
    # The ranks generated different amounts independently (no lockstep in generate).
    assert len(results[0]["generated"]) == 1 and len(results[1]["generated"]) == 2


def test_split_broadcast_many_buckets_arrive_intact(tmp_path) -> None:
    """``split``: trainer 0 broadcasts 5 tensors in ~1 KiB buckets over a gloo weight group; the
    rollout rank loads each bucket as it arrives (two in flight). Twice, with changed weights."""
    script = Path(__file__).parents[1] / "_scripts" / "broadcast_sync.py"
    port = free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), "1024"],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    trainer = torch.load(tmp_path / "trainer.pt")
    stats = trainer["stats"][0]
    assert stats["sync/buckets"] >= 4 and stats["sync/bytes"] == sum(
        p.numel() * 4 for p in trainer["params"].values()
    )
    for version, scale in ((3, -0.5), (4, 1.0)):  # v3 was sent before the weights were scaled by -2
        got = torch.load(tmp_path / f"rollout_v{version}.pt")
        assert got["version"] == version and got["calls"] == stats["sync/buckets"] * (version - 2)
        assert set(got["got"]) == set(trainer["params"])
        for name, p in trainer["params"].items():
            torch.testing.assert_close(got["got"][name], p.detach() * scale, rtol=0, atol=0)
