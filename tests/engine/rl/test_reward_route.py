"""Reward models with their own tokenizer: mismatch detection, the text route, the refusals, the
critic's calibration onto normalised rewards, and ``configs/ppo_7b_8gpu.yaml``'s start-up checks.

The RM tokenizer is ``_scripts/other_tokenizer.py``'s (89 tokens, other special tokens and chat
template); the policy's is the toy one (64 tokens).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.engine._scripts.other_tokenizer import build_other_tokenizer, save_tiny_reward_model
from tritonrlhf.engine.config import (
    ConfigError,
    OptimConfig,
    PPOAlgoConfig,
    PPOConfig,
    TinyModelConfig,
    load_config,
)
from tritonrlhf.engine.models import (
    build_tiny_model,
    build_tiny_reward_model,
    build_tokenizer,
    load_reward_model,
)
from tritonrlhf.engine.rl.critic import CriticWorker, ValueModel, check_critic_init
from tritonrlhf.engine.rl.experience import Experience
from tritonrlhf.engine.rl.reward_route import TextRoute, resolve_reward_route, tokenizer_differences
from tritonrlhf.engine.rl.scoring import RewardScorer

REPO = Path(__file__).resolve().parents[3]
PROMPTS = ["say b:", "say q: then stop", "x"]
RESPONSES = ["b", "q q q", "hello there, world!"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Tiny reward models on disk: on the other tokenizer (with and without a chat template), on
    the toy tokenizer, and one with the toy tokenizer's 64 embedding rows but no tokenizer files."""
    root = tmp_path_factory.mktemp("rms")
    out = {
        "other": save_tiny_reward_model(root / "other", build_other_tokenizer()),
        "other_plain": save_tiny_reward_model(
            root / "other_plain", build_other_tokenizer(chat_template=False)
        ),
        "toy": save_tiny_reward_model(root / "toy", build_tokenizer()),
        # trained by the rm stage (its config.json records rm_layout: plain), tokenizer with a template
        "other_rm_stage": save_tiny_reward_model(root / "other_rm_stage", build_other_tokenizer()),
    }
    cfg_path = out["other_rm_stage"] / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "rm_layout": "plain"}))
    bare = root / "bare"
    build_tiny_reward_model(build_tokenizer(), TinyModelConfig(), 3).save_pretrained(bare)
    out["bare"] = bare
    return out


# --------------------------------------------------------------------------- detection
def test_differences_name_vocabulary_special_tokens_and_template() -> None:
    toy, other = build_tokenizer(), build_other_tokenizer()
    assert tokenizer_differences(toy, build_tokenizer()) == []
    diffs = tokenizer_differences(toy, other)
    assert (
        diffs[0].startswith("vocabulary (64 vs 89") and "special tokens" in diffs and "chat template" in diffs
    )
    no_template = build_tokenizer()
    no_template.chat_template = None
    assert tokenizer_differences(toy, no_template) == ["chat template"]


def test_route_auto_policy_own(ckpts) -> None:
    toy = build_tokenizer()
    same = resolve_reward_route("auto", toy, ckpts["toy"])
    assert same.route == "token" and same.text is None and "equals the policy's" in same.log_line()
    diff = resolve_reward_route("auto", toy, ckpts["other"])
    assert diff.route == "text" and diff.text.max_len == 256
    assert "text route" in diff.log_line() and "vocabulary (64 vs 89 tokens)" in diff.log_line()
    assert resolve_reward_route("own", toy, ckpts["toy"]).route == "text"
    # Forced: the RM's 128 rows cover the toy's 64 ids, so the ids go through, said so in the log.
    forced = resolve_reward_route("policy", toy, ckpts["other"])
    assert forced.route == "token" and "forced although the tokenizers differ" in forced.reason
    # No tokenizer files: read as the policy's ids when the embedding covers them.
    assert resolve_reward_route("auto", toy, ckpts["bare"]).route == "token"


def test_forced_policy_route_with_a_smaller_embedding_is_refused(ckpts) -> None:
    # The other tokenizer's 89 ids against the toy RM's 64 embedding rows.
    with pytest.raises(ConfigError, match=r"reward.tokenizer=policy .* 89 tokens .* only 64 embedding rows"):
        resolve_reward_route("policy", build_other_tokenizer(), ckpts["toy"])
    with pytest.raises(ConfigError, match="has no tokenizer files, so the reward model would read"):
        resolve_reward_route("auto", build_other_tokenizer(), ckpts["bare"])
    with pytest.raises(ConfigError, match="reward.tokenizer=own but .* has no tokenizer files"):
        resolve_reward_route("own", build_tokenizer(), ckpts["bare"])
    with pytest.raises(ConfigError, match="reward.tokenizer must be one of"):
        resolve_reward_route("rm", build_tokenizer(), ckpts["toy"])
    cfg = PPOConfig()
    cfg.reward.tokenizer = "theirs"
    with pytest.raises(ConfigError, match="reward.tokenizer must be one of"):
        cfg.validate()


def test_critic_from_a_reward_model_with_another_tokenizer_is_refused(ckpts) -> None:
    toy = build_tokenizer()
    route = resolve_reward_route("auto", toy, ckpts["other"])
    with pytest.raises(
        ConfigError, match=r"critic.init_from=reward: .*differs.* use critic.init_from=policy"
    ):
        check_critic_init("reward", "model", toy, route)
    # Forcing the RM onto the policy's ids does not make its weights read them: still refused.
    with pytest.raises(ConfigError, match="critic.init_from=reward"):
        check_critic_init("reward", "model", toy, resolve_reward_route("policy", toy, ckpts["other"]))
    check_critic_init("reward", "model", toy, resolve_reward_route("auto", toy, ckpts["toy"]))
    check_critic_init("policy", "model", toy, route)
    with pytest.raises(
        ConfigError, match=r"critic.init_from=.*toy.*: the critic reads the policy's token ids"
    ):
        check_critic_init(str(ckpts["toy"]), "model", build_other_tokenizer(), route)


# --------------------------------------------------------------------------- the text route
def _own_scores(rm, tokenizer, texts: list[str]) -> torch.Tensor:
    """The RM on each text tokenized by hand with its own tokenizer, one unpadded row at a time."""
    out = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]])
            out.append(float(rm(input_ids=ids).logits[0, 0]))
    return torch.tensor(out)


@pytest.mark.parametrize("kind", ["other", "other_plain"])
def test_text_route_scores_equal_the_rms_own(ckpts, kind) -> None:
    toy = build_tokenizer()
    route = resolve_reward_route("auto", toy, ckpts[kind])
    assert route.route == "text"
    rm = load_reward_model(ckpts[kind])
    scorer = RewardScorer(model=rm, text_route=route.text)
    reasons = ["stop", "length", "stop"]
    # The policy's batch: its own ids (toy tokenizer), which the text route must not read.
    seqs = torch.tensor([toy(p + r)["input_ids"][:4] for p, r in zip(PROMPTS, RESPONSES)])
    scores, valid = scorer.score(PROMPTS, RESPONSES, seqs, torch.ones_like(seqs), reasons)
    assert valid.all()
    if kind == "other":  # the RM's chat template, written out by hand
        texts = [f"<s><|user|>{p}<|bot|>{r}</s>" for p, r in zip(PROMPTS, RESPONSES)]
    else:  # the rm stage's layout: <bos> prompt response <eos>, no <eos> after a cut response
        texts = [
            f"<s>{p}{r}" + ("</s>" if f == "stop" else "") for p, r, f in zip(PROMPTS, RESPONSES, reasons)
        ]
    expected = _own_scores(rm, route.text.tokenizer, texts)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert len(set(expected.tolist())) == 3  # distinct texts, distinct scores: the check can fail


def test_text_route_scores_an_rm_stage_checkpoint_in_its_trained_layout(ckpts) -> None:
    """The rm stage trains plain pairs as <bos> prompt response <eos> and records it (rm_layout:
    plain). Its RM with a chat-templated tokenizer scores plain prompts in that layout (before:
    through the chat template, a layout it never saw); chat prompts still take the template; an
    RM trained elsewhere (no record) takes its template; reward.layout overrides both ways."""
    toy = build_tokenizer()
    route = resolve_reward_route("auto", toy, ckpts["other_rm_stage"])
    assert route.route == "text" and "rm_layout=plain for plain prompts" in route.reason
    rm = load_reward_model(ckpts["other_rm_stage"])
    scores, valid = RewardScorer(model=rm, text_route=route.text).score(PROMPTS, RESPONSES)
    assert valid.all()
    plain = [f"<s>{p}{r}</s>" for p, r in zip(PROMPTS, RESPONSES)]
    templated = [f"<s><|user|>{p}<|bot|>{r}</s>" for p, r in zip(PROMPTS, RESPONSES)]
    other = route.text.tokenizer
    torch.testing.assert_close(scores, _own_scores(rm, other, plain), atol=1e-5, rtol=1e-5)
    assert (scores - _own_scores(rm, other, templated)).abs().min() > 1e-4  # the layouts score apart
    # A chat prompt reaches it as the conversation, through the template.
    chat = [{"role": "user", "content": "say b:"}]
    route.text.chats = {"CHAT": chat}
    want = other.apply_chat_template([*chat, {"role": "assistant", "content": "b"}], tokenize=False)
    assert route.text.render("CHAT", "b") == other(want, add_special_tokens=False)["input_ids"]
    assert route.text.render("say b:", "b") == other("<s>say b:b</s>", add_special_tokens=False)["input_ids"]
    # Trained elsewhere (no record): the template for every prompt.
    elsewhere = resolve_reward_route("auto", toy, ckpts["other"]).text
    assert (
        elsewhere.render("say b:", "b")
        == other("<s><|user|>say b:<|bot|>b</s>", add_special_tokens=False)["input_ids"]
    )
    # reward.layout overrides: chat forces the template, plain the rm stage's layout (chats too).
    forced = resolve_reward_route("auto", toy, ckpts["other_rm_stage"], layout="chat").text
    assert forced.render("say b:", "b") == elsewhere.render("say b:", "b")
    flat = resolve_reward_route("auto", toy, ckpts["other"], layout="plain").text
    flat.chats = {"CHAT": chat}
    assert flat.render("CHAT", "b") == flat.render("say b:", "b") == route.text.render("say b:", "b")
    with pytest.raises(ConfigError, match="reward.layout=chat but .* has no chat template"):
        resolve_reward_route("auto", toy, ckpts["other_plain"], layout="chat")
    with pytest.raises(ConfigError, match="reward.layout must be one of"):
        resolve_reward_route("auto", toy, ckpts["other"], layout="jinja")


def test_text_route_marks_over_long_samples_invalid(ckpts, capsys) -> None:
    route = resolve_reward_route("auto", build_tokenizer(), ckpts["other"])
    short = TextRoute(route.text.tokenizer, max_len=24)  # the three samples take 11, 25, 24 tokens
    scorer = RewardScorer(model=load_reward_model(ckpts["other"]), text_route=short)
    scores, valid = scorer.score(PROMPTS, RESPONSES)
    assert valid.tolist() == [True, False, True] and scores[1] == 0.0 and scorer.num_invalid == 1
    assert "1 sample(s) are longer than the reward model's 24 positions" in capsys.readouterr().out
    assert short.num_too_long == 1


# --------------------------------------------------------------------------- critic calibration
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_calibrated_critic_starts_on_the_normalised_scale(ckpts, stage) -> None:
    """critic.init_from=reward + reward_norm: after ``calibrate(mean, std)`` the critic's value at
    the last real token is the RM's score normalised, and an update starts from there (the
    optimizer's fp32 master copy was mapped too, not only the module's parameters)."""
    rm = load_reward_model(ckpts["toy"])
    toy = build_tokenizer()
    ids = [toy(p + r)["input_ids"] for p, r in zip(PROMPTS, RESPONSES)]
    T = max(map(len, ids))
    seq = torch.zeros(len(ids), T, dtype=torch.long)
    am = torch.zeros_like(seq)
    for i, row in enumerate(ids):  # left-padded, as the trainer's batches
        seq[i, T - len(row) :], am[i, T - len(row) :] = torch.tensor(row), 1
    raw, _ = RewardScorer(model=rm).score(PROMPTS, RESPONSES, seq, am)
    mean, std = float(raw.mean()), float(raw.std()) + 0.5
    critic = CriticWorker(
        ValueModel.from_reward_model(rm), OptimConfig(lr=1e-9, zero_stage=stage), PPOAlgoConfig(), 3, 1
    )

    def last_values() -> torch.Tensor:
        with torch.no_grad():
            return critic.engine(seq, am)[:, -1].float()

    torch.testing.assert_close(last_values(), raw, atol=1e-4, rtol=1e-4)  # raw scale before
    critic.calibrate(mean, std)
    norm = (raw - mean) / std
    torch.testing.assert_close(last_values(), norm, atol=1e-4, rtol=1e-4)
    assert (norm - raw).abs().max() > 0.1  # the two scales differ: the check can fail
    # One update at lr 1e-9: the values stay calibrated (a map of the module's parameters alone
    # would be undone by the step, which copies the optimizer's unmapped master weights back).
    exp = Experience(seq, am, am[:, -2:].bool())
    exp.values = torch.zeros(len(ids), 2)
    exp.returns = torch.ones(len(ids), 2)
    critic.train_minibatch([exp])
    torch.testing.assert_close(last_values(), norm, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- the shipped 7B config
def test_ppo_7b_config_passes_every_start_up_check_without_weights(ckpts, tmp_path) -> None:
    """``configs/ppo_7b_8gpu.yaml`` as written, with its placeholder paths pointed at tiny stand-ins
    of the same shape of problem: a policy on one tokenizer, a reward model on another."""
    from tritonrlhf.engine.models import prepare_policy

    pol = tmp_path / "policy"
    toy = build_tokenizer()
    build_tiny_model(toy, TinyModelConfig(), 0).save_pretrained(pol)
    toy.save_pretrained(pol)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "say a:"}) + "\n")
    paths = [f"model.path={pol}", f"reward.model_path={ckpts['other']}", f"data.prompts={prompts}"]
    yaml = REPO / "configs" / "ppo_7b_8gpu.yaml"
    cfg = load_config(PPOConfig, str(yaml), paths)
    cfg.validate(8)  # ranges and batch divisibility on 8 ranks
    # wandb is in no extra of setup.py, and the logger that imports it starts after every model loads.
    assert not cfg.logging.wandb or importlib.util.find_spec("wandb") is not None
    policy_dir, tokenizer = prepare_policy(cfg.model, tmp_path / "out", cfg.seed)
    route = resolve_reward_route(cfg.reward.tokenizer, tokenizer, cfg.reward.model_path)
    assert route.route == "text"
    check_critic_init(cfg.critic.init_from, cfg.reward.kind, tokenizer, route)
    # The split variant its comment names: 6 trainer ranks, the frozen models whole on each.
    split = ["placement.mode=split", "placement.rollout_ranks=2", "async.max_staleness=1"]
    split += ["ppo.rollout_batch_size=480", "ppo.mini_batch_size=48", "placement.frozen_zero_stage=0"]
    load_config(PPOConfig, str(yaml), paths + split).validate(6)
    # What the config used to say would now be refused before any weights load.
    old = load_config(PPOConfig, str(yaml), [*paths, "critic.init_from=reward"])
    with pytest.raises(ConfigError, match="critic.init_from=reward"):
        check_critic_init(old.critic.init_from, old.reward.kind, tokenizer, route)


# --------------------------------------------------------------------------- best-of-n and eval
def test_best_of_n_reward_takes_the_text_route(ckpts) -> None:
    from tritonrlhf.engine.stages.best_of_n import BoNRewardConfig, build_reward

    toy = build_tokenizer()
    scorer = build_reward(BoNRewardConfig(model_path=str(ckpts["other"])), toy)
    assert scorer.text_route is not None
    scores, _ = scorer.score(PROMPTS, RESPONSES)
    texts = [f"<s><|user|>{p}<|bot|>{r}</s>" for p, r in zip(PROMPTS, RESPONSES)]
    expected = _own_scores(load_reward_model(ckpts["other"]), build_other_tokenizer(), texts)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="reward.tokenizer=policy"):
        build_reward(
            BoNRewardConfig(model_path=str(ckpts["toy"]), tokenizer="policy"), build_other_tokenizer()
        )


def test_eval_scores_policy_samples_as_text_and_pairs_with_the_rms_tokenizer(ckpts, tmp_path) -> None:
    """Eval of a toy-tokenizer policy with the other-tokenizer RM: the RM rewards are its own scores
    of the samples' texts, and RM accuracy equals that of an RM-only eval (pairs tokenized with the
    RM's own tokenizer either way)."""
    from tritonrlhf.engine.stages.evaluate import EvalConfig, run_eval

    pol = tmp_path / "policy"
    toy = build_tokenizer()
    build_tiny_model(toy, TinyModelConfig(), 1).save_pretrained(pol)
    toy.save_pretrained(pol)
    prompts, pairs = tmp_path / "prompts.jsonl", tmp_path / "pairs.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {c}:"}) + "\n" for c in "abcd"))
    rows = [("say a:", "aaa", "bbb"), ("say b:", "bb", "ab"), ("say d:", "dd", "d")]
    pairs.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows)
    )
    common = [f"models.reward_model={ckpts['other']}", "models.baseline=", f"data.pairs={pairs}"]
    with_policy = load_config(
        EvalConfig,
        None,
        [
            *common,
            f"output_dir={tmp_path / 'e1'}",
            f"models.policy={pol}",
            f"data.prompts={prompts}",
            "rollout.backend=hf",
            "rollout.max_new_tokens=6",
        ],
    )
    res = run_eval(with_policy)
    samples = [json.loads(x) for x in (tmp_path / "e1" / "eval_samples.jsonl").read_text().splitlines()]
    texts = [f"<s><|user|>{s['prompt']}<|bot|>{s['policy_response']}</s>" for s in samples]
    own = _own_scores(load_reward_model(ckpts["other"]), build_other_tokenizer(), texts)
    torch.testing.assert_close(torch.tensor([s["rm_policy"] for s in samples]), own, atol=1e-5, rtol=1e-5)
    rm_only = run_eval(load_config(EvalConfig, None, [*common, f"output_dir={tmp_path / 'e2'}"]))
    assert res["rm_pairs"] == rm_only["rm_pairs"] == 3
    assert res["rm_margin"] == pytest.approx(rm_only["rm_margin"], abs=1e-6) and res["rm_margin"] != 0


def test_chat_prompts_reach_the_reward_model_as_chats(tmp_path: Path) -> None:
    """A ``{"messages"}`` prompt is rendered by the policy's template for generation; the text route
    renders the conversation itself with the RM's template (not the policy's rendering as a user
    turn), and the rm stage's layout takes the last user turn."""
    from tritonrlhf.engine.config import DataConfig
    from tritonrlhf.engine.data import PromptDataset

    toy = build_tokenizer()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "say b:"}]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"prompt": "say q:"}) + "\n")
    data = PromptDataset(DataConfig(prompts=str(path), max_prompt_len=64), toy)
    decoded = toy.batch_decode(data.input_ids, skip_special_tokens=True)  # what the scorer is given
    assert decoded[0] != "say b:" and data.chats == {decoded[0]: chat}  # the plain prompt has no chat
    other = build_other_tokenizer()
    route = TextRoute(other, 256, chats=data.chats)
    want = other.apply_chat_template([*chat, {"role": "assistant", "content": "b"}], tokenize=False)
    assert route.render(decoded[0], "b") == other(want, add_special_tokens=False)["input_ids"]
    plain = TextRoute(build_other_tokenizer(chat_template=False), 256, chats=data.chats)
    assert plain.render(decoded[0], "b") == plain.render("say b:", "b")
    assert route.render(decoded[1], "b") == other(
        other.apply_chat_template([{"role": "user", "content": "say q:"}, {"role": "assistant", "content": "b"}],
                                  tokenize=False), add_special_tokens=False)["input_ids"]  # fmt: skip
    # Truncated chats are not the whole conversation: left out.
    short = PromptDataset(DataConfig(prompts=str(path), max_prompt_len=8), toy)
    assert short.num_truncated >= 1 and short.chats == {}
