"""`adapterserve train --stage grpo` against a real server on a tiny model: rewards, rollouts, pushes.

The tiny model (conftest.py's peaked_model_dir) has a peaked next-token distribution. The reward
(tests/training/grpo_rewards.py) pays for token ids in the lower half of the vocabulary.
"""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from adapterserve.training.errors import SettingsError
from adapterserve.training.grpo import _groups, read_prompts
from adapterserve.training.rewards import BUILT_IN, load_reward, load_rewards
from adapterserve.training.settings import TrainSettings
from tests.training.conftest import write_jsonl

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["the cat sat on", "a dog ran to", "we went to the", "she said that", "it was a", "the sun is"]


def test_grpo_raises_the_reward_and_the_server_serves_the_pushed_weights(
    rollout_server, peaked_model_dir, tmp_path
):
    from adapterserve import Client
    from adapterserve.training.cli import main

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "rl"
    steps = 12  # at this learning rate the reward rose on every seed tried (0..4)
    code = main(
        [
            "--stage", "grpo",
            "--method", "lora",
            "--base-model", str(peaked_model_dir),
            "--device", "cpu",
            "--data", str(data),
            "--eval", str(data),
            "--out", str(out),
            "--rollout-server", rollout_server.target,
            "--adapter-name", "rl-job",
            "--reward", "tests.training.grpo_rewards:low_ids",
            "--max-steps", str(steps),
            "--batch-size", "8",
            "--num-generations", "4",
            "--max-new-tokens", "4",
            "--learning-rate", "0.05",
            "--rank", "8",
            "--target-modules", "q_proj,v_proj,o_proj,down_proj",
            "--logging-steps", "1",
        ]
    )  # fmt: skip
    assert code == 0
    manifest = json.loads((tmp_path / "rl.manifest.json").read_text())
    report = manifest["grpo"]
    rewards = [r for _, r in report["reward_curve"]]
    assert len(rewards) == steps
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert report["eval_adapter_reward"] > report["eval_base_reward"] + 0.2, report
    # one before each rollout that follows an optimizer step, and the final one (persisted)
    assert report["pushes"] == steps
    assert report["rollout_completions"] == steps * 8 + 2 * len(PROMPTS)

    # the server serves the final pushed version, and stored it: its tensors are the trainer's
    with Client(rollout_server.target) as client:
        assert client.get_adapter("rl-job").version == report["final_version"]
    stored = load_file(str(rollout_server.settings.store / "rl-job" / "adapter_model.safetensors"))
    trained = load_file(str(out / "adapter_model.safetensors"))
    assert stored.keys() == trained.keys() and len(stored) == 4 * 2 * 2  # 4 modules x 2 layers x A, B
    for name, tensor in trained.items():
        assert torch.equal(stored[name], tensor), name
    assert any(t.abs().sum() > 0 for n, t in trained.items() if "lora_B" in n)  # it did train


def test_grpo_settings_are_checked():
    with pytest.raises(ValidationError, match="grpo"):
        TrainSettings(stage="grpo", method="prefix-tuning")
    with pytest.raises(ValidationError, match="multiple of --num-generations"):
        TrainSettings(stage="grpo", method="lora", batch_size=6, num_generations=4)
    assert TrainSettings(stage="grpo", method="ia3", batch_size=8, num_generations=4).reward == ("exact",)
    with pytest.raises(ValidationError, match="clip-min"):
        TrainSettings(stage="grpo", method="lora", importance_sampling_clip_min=3.0)
    with pytest.raises(ValidationError, match="importance_sampling_mode"):
        TrainSettings(stage="grpo", method="lora", importance_sampling_mode="token")


def test_built_in_rewards():
    completions = ["Paris", " paris. ", '{"a": 1}', "no"]
    assert BUILT_IN["exact"]([""] * 4, completions, answer=["paris"] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert BUILT_IN["contains"]([""] * 4, completions, answer=["paris"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert BUILT_IN["regex"]([""] * 4, completions, pattern=[r"[A-Z]\w+"] * 4) == [1.0, 0.0, 0.0, 0.0]
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    assert BUILT_IN["json-schema"]([""] * 4, completions, schema=[json.dumps(schema)] * 4) == [0, 0, 1, 0]
    chat = [[{"role": "assistant", "content": "Paris"}]]
    assert BUILT_IN["exact"]([""], chat, answer=["Paris"]) == [1.0]
    with pytest.raises(SettingsError, match="'answer' field"):
        BUILT_IN["exact"]([""], ["x"])
    assert load_reward("tests.training.grpo_rewards:low_ids")([""], ["x"], completion_ids=[[1, 300]]) == [0.5]
    for bad in ("nope", "tests.training.grpo_rewards:missing", "no_such_module_x:f"):
        with pytest.raises(SettingsError):
            load_reward(bad)
    with pytest.raises(SettingsError):
        load_rewards([])


def test_prompt_records_and_groups(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": [{"role": "user", "content": "b"}]}]
    )
    records = read_prompts(path)
    assert records[0]["answer"] == "1" and isinstance(records[1]["prompt"], list)
    with pytest.raises(SettingsError, match="prompt"):
        read_prompts(write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}]))
    assert _groups(["a", "a", "b", "b", "a"]) == [("a", 2), ("b", 2), ("a", 1)]


def test_two_jobs_share_one_server_and_each_samples_its_own_latest_version(
    rollout_server, peaked_model_dir, tmp_path
):
    import threading

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterserve.training.grpo import adapter_state, prompt_ids
    from adapterserve.training.output import save_adapter
    from adapterserve.training.rollouts import RolloutClient, RolloutSampling

    tokenizer = AutoTokenizer.from_pretrained(peaked_model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(peaked_model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    state = adapter_state(model)
    ids = [prompt_ids(tokenizer, p) for p in PROMPTS[:2]]
    sampling = RolloutSampling(max_new_tokens=4, temperature=1.0, seed=7)
    clients = [RolloutClient(rollout_server.target, f"job-{k}", sampling) for k in range(2)]
    seen: dict[str, list[tuple[int, set[int]]]] = {c.adapter: [] for c in clients}
    errors: list[BaseException] = []

    def job(client: RolloutClient, scale: float) -> None:
        try:
            for step in range(3):
                version = client.push({k: v * (scale + step) for k, v in state.items()})
                groups = client.sample([(i, 4) for i in ids])
                seen[client.adapter].append((version, {c.adapter_version for g in groups for c in g}))
        except BaseException as exc:  # reported below
            errors.append(exc)

    for client in clients:
        client.upload(save_adapter(model, tmp_path / client.adapter))
    threads = [threading.Thread(target=job, args=(c, 1.0 + k)) for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for client in clients:
        steps = seen[client.adapter]
        assert [versions for _, versions in steps] == [{v} for v, _ in steps]  # its own newest version
        assert [v for v, _ in steps] == sorted({v for v, _ in steps})  # each push a new version
        assert client.admin.get_adapter(client.adapter).version == steps[-1][0]
        client.close()


def test_prompt_ids_render_chats_with_the_chat_template():
    from adapterserve.training.grpo import prompt_ids
    from tests.helpers.tiny_model import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    chat = [{"role": "user", "content": "the cat sat on"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt_ids(tokenizer, chat) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt_ids(tokenizer, "the cat") == tokenizer("the cat")["input_ids"]


def test_rollout_batches_keep_to_the_server_limits():
    from adapterserve.training.rollouts import batches

    assert batches([(10, 4)] * 5, 8, 1000) == [[0, 1], [2, 3], [4]]  # rows: n summed
    assert batches([(10, 4)] * 3, 256, 25) == [[0, 1], [2]]  # prompt tokens
    assert batches([(10, 4), (10, 9), (10, 4)], 8, 1000) == [[0], [1], [2]]  # too big: alone
    assert batches([(10, 4)] * 3, 0, 0) == [[0], [1], [2]]  # no GenerateBatch: one request each


def test_a_batched_rollout_samples_what_each_prompt_alone_would(rollout_server, peaked_model_dir):
    from transformers import AutoTokenizer

    from adapterserve.training.grpo import prompt_ids
    from adapterserve.training.rollouts import RolloutClient, RolloutSampling

    tokenizer = AutoTokenizer.from_pretrained(peaked_model_dir)
    ids = [prompt_ids(tokenizer, p) for p in PROMPTS[:3]]
    sampling = RolloutSampling(max_new_tokens=6, temperature=1.0, seed=11)
    with (
        RolloutClient(rollout_server.target, "unused", sampling) as together,
        RolloutClient(rollout_server.target, "unused", sampling) as alone,
    ):
        batched = together.sample([(i, 3) for i in ids], adapter="")
        single = [alone.sample([(i, 3)], adapter="")[0] for i in ids]
    assert [[c.token_ids for c in g] for g in batched] == [[c.token_ids for c in g] for g in single]
    assert len({tuple(c.token_ids) for g in batched for c in g}) > 3  # each choice its own seed
