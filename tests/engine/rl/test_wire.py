"""Split placement's control messages are JSON: every message kind round-trips, and a message forged
into the launch's TCP store by another process is refused with a clear error and never run."""

from __future__ import annotations

import datetime
import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist

from tests.engine._scripts.launch import free_port
from tritonrlhf.engine.rl import wire
from tritonrlhf.engine.rl.placement import Channel, RolloutLinkError
from tritonrlhf.engine.rl.rollout import Sample
from tritonrlhf.engine.rl.weight_sync import BucketSpec


def _same(a, b) -> bool:
    """Equality with NaN equal to NaN (samples carry NaN rewards and log-probs)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, Sample):
        return isinstance(b, Sample) and _same(vars(a), vars(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_every_message_kind_round_trips():
    sample = Sample(
        [1, 5, 9],
        [7, 2],
        [-0.25, float("nan")],
        "length",
        4,
        ref_logprobs=[-1.0, -2.0],
        score=float("nan"),
        score_valid=False,
        kept_logmass=[0.0, -0.1],
        columns={"answer": "3", "tests": [{"input": "1", "output": "2"}], "level": 2},
        reward_parts={"match": 1.0, "len": float("inf")},
        reward_info={"expected": "3", "got": None},
    )
    spec = BucketSpec(("a.weight", "b.bias"), (torch.Size([2, 3]), torch.Size([4])), torch.bfloat16)
    messages = [
        {
            "kind": "hello",
            "policy_dir": "/x",
            "scoring": "rollout",
            "seed": 1,
            "max_len": 64,
            "dtype": "float32",
        },
        {
            "kind": "generate",
            "batch": -2,
            "prompts": [[1, 2], [3]],
            "columns": [{"target": "a"}, {}],
            "n": 4,
            "seed": 9,
        },
        {
            "kind": "samples",
            "batch": 3,
            "samples": [sample],
            "events": [{"phase": "generate", "t0": 1.5, "t1": 2.0}],
        },
        {"kind": "weights", "version": 7, "specs": [spec]},
        {"kind": "probe", "logprobs": [-0.5]},
        {"error": "rollout rank 1:\nTraceback ..."},
    ]
    for msg in messages:
        got = wire.decode(wire.encode(msg))
        assert _same(got, msg), (got, msg)
    assert wire.decode(wire.encode({"specs": [spec]}))["specs"][0] == spec  # tuples of torch.Size again


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x80\x04\x95\x00", "not a JSON control message"),
        (b'{"kind": "samples"', "not a JSON control message"),
        (b'{"__wire__": "module", "name": "os"}', "unknown tagged value 'module'"),
        (b'{"__wire__": "sample", "prompt_ids": [1], "evil": 1}', r"unknown fields \['evil'\]"),
        (b'{"__wire__": "sample", "prompt_ids": [1]}', "malformed sample"),
        (
            b'{"__wire__": "bucket", "names": ["a"], "shapes": [[2]], "dtype": "object"}',
            "malformed weight-bucket",
        ),
    ],
)
def test_anything_else_is_refused(data, match):
    with pytest.raises(wire.WireError, match=match):
        wire.decode(data)


FORGE = """
import os, pickle, sys, datetime
import torch.distributed as tdist

class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))

store = tdist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=datetime.timedelta(seconds=30))
store.set("rlhf/cmd0/0", pickle.dumps({"kind": "generate", "x": Payload()}))
"""


def test_a_message_forged_into_the_store_is_refused_and_never_run(tmp_path):
    """Another process on the network writes a pickle that would run ``touch`` when unpickled into
    the slot a rollout rank reads next: the rank refuses it (RolloutLinkError, which stops the run)
    and the file is never created. (With the former pickled channel the command ran.)"""
    port = free_port()
    store = tdist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=30))
    marker = tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", FORGE, str(port), str(marker)], check=True, timeout=60)
    inbox = Channel(store, "cmd0", timeout_s=10, peer="trainer 0 (for rollout rank 0)")
    with pytest.raises(RolloutLinkError, match=r"refused message 'rlhf/cmd0/0'.*nothing in it was run"):
        inbox.recv()
    assert not marker.exists()
    # The link goes on with the engine's own messages after the refused one.
    sender = Channel(store, "cmd0", timeout_s=10, peer="rollout rank 0")
    sender._sent = 1
    sender.send({"kind": "stop"})
    assert inbox.recv() == {"kind": "stop"}
