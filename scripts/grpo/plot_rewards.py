"""Draw a --stage grpo run's reward against steps from its manifest (the PNG in docs/training.md).

    python scripts/grpo/plot_rewards.py adapters/grpo-sum.manifest.json docs/grpo-reward.png

The curve is the mean summed reward of each step's rollouts (as TRL logs it); the dashed lines are the
held-out reward (greedy, through the server) of the base and of the trained adapter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = json.loads(args.manifest.read_text())
    report = manifest["grpo"]
    steps = [s for s, _ in report["reward_curve"]]
    rewards = [r for _, r in report["reward_curve"]]
    rewards_spec = ", ".join(manifest["settings"]["reward"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, rewards, marker="o", markersize=3, label="rollouts (sampled), mean reward per step")
    if report.get("eval_base_reward") is not None:
        ax.axhline(report["eval_base_reward"], color="grey", linestyle="--", label="held-out, base (greedy)")
    if report.get("eval_adapter_reward") is not None:
        ax.axhline(
            report["eval_adapter_reward"],
            color="green",
            linestyle="--",
            label="held-out, trained adapter (greedy)",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"reward ({rewards_spec})")
    ax.set_title(args.title or f"GRPO, {manifest['method']} on {Path(manifest['base_model']).name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
