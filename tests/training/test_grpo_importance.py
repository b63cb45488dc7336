"""TRL's importance-sampling correction on the server's logprobs in `adapterserve train --stage grpo`.

Against a real server on the peaked tiny model (conftest.py): the ratio of the trainer's probability of
each sampled token to the server's is ~1 when the server samples with the trainer's weights (pushed
after every step) at the same temperature, is clipped or masked when the server's logprobs are shifted,
and is gone with --no-importance-sampling-correction.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from adapterserve.training.rollouts import RolloutClient
from tests.training.conftest import write_jsonl

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["the cat sat on", "a dog ran to", "we went to the", "she said that"]


def _train(server, model_dir: Path, tmp_path: Path, steps: int, *extra: str) -> tuple[dict, dict]:
    """Run the CLI; returns (the manifest's grpo report, the trained adapter's tensors)."""
    from adapterserve.training.cli import main

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "rl"
    code = main(
        [
            "--stage", "grpo",
            "--method", "lora",
            "--base-model", str(model_dir),
            "--device", "cpu",
            "--data", str(data),
            "--out", str(out),
            "--rollout-server", server.target,
            "--adapter-name", tmp_path.name,
            "--reward", "tests.training.grpo_rewards:low_ids",
            "--max-steps", str(steps),
            "--batch-size", "8",
            "--num-generations", "4",
            "--max-new-tokens", "4",
            "--learning-rate", "0.1",
            "--rank", "8",
            "--target-modules", "q_proj,v_proj,o_proj,down_proj",
            "--logging-steps", "1",
            *extra,
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "rl.manifest.json").read_text())["grpo"]
    return report, load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture
def shifted_server_logprobs(monkeypatch):
    """The rollouts' logprobs as a server whose model disagrees with the trainer's would report them:
    2 nats lower for every token (the trainer finds each sampled token e^2 = 7.4 times likelier)."""
    real = RolloutClient.sample

    def sample(self, groups, **kwargs):
        return [
            [dataclasses.replace(c, logprobs=[v - 2.0 for v in c.logprobs]) for c in group]
            for group in real(self, groups, **kwargs)
        ]

    monkeypatch.setattr(RolloutClient, "sample", sample)


def _moved(adapter: dict) -> bool:
    """Whether training changed the LoRA (its B matrices start at zero)."""
    return any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)


def test_on_policy_rollouts_give_a_ratio_of_one_at_the_sampling_temperature(
    rollout_server, peaked_model_dir, tmp_path
):
    steps = 3
    report, adapter = _train(rollout_server, peaked_model_dir, tmp_path, steps, "--temperature", "0.7")
    assert report["importance_sampling"] == "sequence_mask"  # on by default, TRL's default mode
    curve = report["importance_sampling_curve"]
    assert [s["step"] for s in curve] == list(range(1, steps + 1))
    for s in curve:  # the server sampled with the trainer's weights (pushed each step) at T = 0.7
        assert abs(s["ratio_mean"] - 1.0) < 1e-2, curve
        assert s["logp_difference_max"] < 1e-2, curve
    assert _moved(adapter)


def test_shifted_server_logprobs_are_clipped_per_token(
    rollout_server, peaked_model_dir, tmp_path, shifted_server_logprobs
):
    report, _ = _train(
        rollout_server, peaked_model_dir, tmp_path, 2, "--importance-sampling-mode", "token_truncate"
    )
    assert report["importance_sampling"] == "token_truncate"
    for s in report["importance_sampling_curve"]:
        assert abs(s["logp_difference_mean"] - 2.0) < 1e-2  # what the server reported is 2 nats off
        assert s["ratio_max"] == pytest.approx(3.0)  # e^2 clipped at --importance-sampling-clip-max
        assert s["ratio_mean"] == pytest.approx(3.0)


def test_a_masked_ratio_removes_the_tokens_from_the_loss_and_turning_it_off_keeps_them(
    rollout_server, peaked_model_dir, tmp_path, shifted_server_logprobs
):
    masked, adapter = _train(
        rollout_server, peaked_model_dir, tmp_path / "mask", 2, "--importance-sampling-mode", "token_mask"
    )
    assert [s["ratio_max"] for s in masked["importance_sampling_curve"]] == [0.0, 0.0]
    assert not _moved(adapter)  # every token's ratio (7.4) is above 3: zeroed, no gradient, no update

    off, adapter = _train(
        rollout_server, peaked_model_dir, tmp_path / "off", 2, "--no-importance-sampling-correction"
    )
    assert off["importance_sampling"] is None and off["importance_sampling_curve"] == []
    assert _moved(adapter)  # the same rollouts train the adapter without the correction
