"""Two processes, one ``split`` launch without vLLM: trainer 0 broadcasts a model in many small
buckets (``BroadcastWeightSync``); the rollout rank receives them (``receive_weights``) into a
recording engine and writes what arrived. Run by ``tests/engine/rl/test_weight_sync.py``.

Usage (env RANK, WORLD_SIZE=2, MASTER_ADDR, MASTER_PORT set): ``broadcast_sync.py OUT_DIR BUCKET_BYTES``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tritonrlhf.engine.rl.placement import setup_split  # noqa: E402
from tritonrlhf.engine.rl.weight_sync import BroadcastWeightSync, receive_weights  # noqa: E402


class Recorder:
    """A rollout engine that keeps copies of what it is given."""

    def __init__(self) -> None:
        self.got: dict[str, torch.Tensor] = {}
        self.policy_version = 0
        self.calls = 0

    def load_weights(self, named):
        self.calls += 1
        for name, t in named:
            self.got[name] = t.clone()

    def finish_sync(self, version: int) -> None:
        self.policy_version = version


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 33), torch.nn.Linear(33, 7))


def main(out: Path, bucket_bytes: int) -> None:
    pl = setup_split(rollout_ranks=1, timeout_s=60)
    if pl.role == "trainer":
        m = model()
        sync = BroadcastWeightSync(m, pl, bucket_bytes=bucket_bytes)
        stats = sync.push(version=3)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(-2.0)
        stats2 = sync.push(version=4)
        torch.save({"stats": [stats, stats2], "params": dict(m.named_parameters())}, out / "trainer.pt")
    else:
        ch = pl.to_rollout(0)
        rec = Recorder()
        for _ in range(2):
            msg = ch.recv()
            assert msg["kind"] == "weights", msg
            receive_weights(pl, msg["specs"], rec, msg["version"])
            torch.save(
                {"got": rec.got, "version": rec.policy_version, "calls": rec.calls},
                out / f"rollout_v{msg['version']}.pt",
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
