"""The split placement's control messages as JSON: nothing read from the network can run code.

Control messages (hello, generate requests, samples, weight-sync headers, probes, errors) travel
through the launch's TCP store, which on more than one node listens on the network: any host that
reaches ``MASTER_PORT`` during a run can write a key. They used to be pickled, so such a key was
code execution in the trainer or a rollout rank. Now a message is a JSON document of plain values
(dicts with string keys, lists, strings, numbers, NaN/inf, booleans, None) plus two tagged types,
rebuilt field by field from a whitelist: a rollout ``Sample`` and a weight-sync ``BucketSpec``.
Anything else (a pickle, malformed JSON, an unknown tag, a wrong field) raises ``WireError``: the
receiver refuses it with a message naming the channel, and the run stops; nothing in it is executed.
Weights themselves go through the weight group's collective (raw tensor bytes), not the store.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

_TAG = "__wire__"
_DTYPES = {
    str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
}


class WireError(ValueError):
    """A control message that is not one this engine sends."""


def _to_wire(obj: Any) -> Any:
    from tritonrlhf.engine.rl.rollout import Sample
    from tritonrlhf.engine.rl.weight_sync import BucketSpec

    if isinstance(obj, Sample):
        return {_TAG: "sample", **{f.name: _to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, BucketSpec):
        dtype = str(obj.dtype).removeprefix("torch.")
        return {
            _TAG: "bucket",
            "names": list(obj.names),
            "shapes": [list(s) for s in obj.shapes],
            "dtype": dtype,
        }
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj) or _TAG in obj:
            raise WireError(f"cannot send a dict with keys {list(obj)[:5]}: string keys only, not {_TAG!r}")
        return {k: _to_wire(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_wire(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise WireError(f"cannot send a {type(obj).__name__} as a control message")


def _from_wire(d: dict[str, Any]) -> Any:
    """``json.loads``' object hook: plain dicts as they are, the two tagged types rebuilt strictly."""
    tag = d.get(_TAG)
    if tag is None:
        return d
    if tag == "sample":
        from tritonrlhf.engine.rl.rollout import Sample

        fields = {f.name for f in dataclasses.fields(Sample)}
        body = {k: v for k, v in d.items() if k != _TAG}
        if not set(body) <= fields:
            raise WireError(f"a sample with unknown fields {sorted(set(body) - fields)}")
        try:
            return Sample(**body)
        except TypeError as e:
            raise WireError(f"a malformed sample: {e}") from None
    if tag == "bucket":
        from tritonrlhf.engine.rl.weight_sync import BucketSpec

        if set(d) != {_TAG, "names", "shapes", "dtype"} or d["dtype"] not in _DTYPES:
            raise WireError(f"a malformed weight-bucket header: {sorted(d)}")
        names, shapes = d["names"], d["shapes"]
        if not (
            isinstance(names, list)
            and isinstance(shapes, list)
            and len(names) == len(shapes)
            and all(isinstance(n, str) for n in names)
            and all(isinstance(s, list) and all(isinstance(x, int) and x >= 0 for x in s) for s in shapes)
        ):
            raise WireError("a malformed weight-bucket header: names and shapes do not match")
        return BucketSpec(tuple(names), tuple(torch.Size(s) for s in shapes), _DTYPES[d["dtype"]])
    raise WireError(f"an unknown tagged value {tag!r}")


def encode(obj: Any) -> bytes:
    """A control message (plain values, ``Sample``s, ``BucketSpec``s) as UTF-8 JSON."""
    return json.dumps(_to_wire(obj), separators=(",", ":")).encode()


def decode(data: bytes) -> Any:
    """The message ``encode`` wrote; ``WireError`` for anything else (never evaluates what it reads)."""
    try:
        return json.loads(data.decode("utf-8"), object_hook=_from_wire)
    except WireError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError(f"not a JSON control message ({type(e).__name__}: {str(e)[:120]})") from None
