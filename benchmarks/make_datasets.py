"""Benchmark datasets for another MuJoCo body, made the way ../shared/datasets' were (its README, issue 33):

- Soft Actor-Critic with Stable-Baselines3's defaults (256-256 MLPs, batch 256), 5,000 random warm-up steps,
  seed 0, trained online in the Gymnasium v5 environment and evaluated every 10,000 steps on 5 deterministic
  episodes (each evaluation's policy kept);
- expert: the best evaluation's policy, medium: the first whose evaluation reached 40% of the way from the
  random policy to the best; both act stochastically (sampled SAC actions) while recording whole episodes
  until 100,000 steps;
- medium-replay: the agent's replay buffer from its start up to the medium policy's step, split into episodes
  (a partial last episode is dropped);
- reference scores: ref_min = the uniform random policy's mean return over 20 episodes, ref_max = the best
  policy's, acting deterministically, over 20 episodes.

    pip install -r benchmarks/datasets-requirements.txt
    python -m benchmarks.make_datasets Walker2d-v5 --root benchmarks/datasets       # bench/walker2d/*-v0

It resumes: the SAC run, its replay buffer and its evaluations are saved under ROOT/_work/NAME/ at every
evaluation, so rerunning the command after a kill continues from the last one. Benchmark data, never read by
the tests (they test split_episodes on arrays of their own).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from tests.conftest import play, write_dataset  # the project's one episode player and Minari writer

EVAL_EVERY, EVAL_EPISODES, REF_EPISODES, WARMUP, RECORD_STEPS, MEDIUM_FRACTION = 10_000, 5, 20, 5_000, 100_000, 0.4


def split_episodes(observations, next_observations, actions, rewards, dones, timeouts) -> list[dict]:
    """A replay buffer's transitions (in the order they were collected, one environment) as episodes: each
    ends at a done, terminated unless it was a time limit (timeouts), with N+1 observations (the last one the
    done step's next observation). Transitions after the last done (a partial episode) are dropped."""
    episodes, start = [], 0
    for end in np.flatnonzero(np.asarray(dones, dtype=bool)):
        step = slice(start, end + 1)
        n = end + 1 - start
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        (truncated if timeouts[end] else terminated)[-1] = True
        episodes.append({"observations": np.concatenate([observations[step], next_observations[end:end + 1]]),
                         "actions": np.asarray(actions[step]), "rewards": np.asarray(rewards[step], np.float64),
                         "terminations": terminated, "truncations": truncated})
        start = end + 1
    return episodes


def mean_return(episodes: list[dict]) -> float:
    return float(np.mean([ep["rewards"].sum() for ep in episodes]))


def train(env_id: str, work: Path, steps: int, seed: int = 0):
    """SAC trained to ``steps`` environment steps, resuming from ``work``; its evaluations {step: mean return}."""
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    work.mkdir(parents=True, exist_ok=True)
    evals_path = work / "evals.json"
    evals = {int(k): v for k, v in json.loads(evals_path.read_text()).items()} if evals_path.exists() else {}
    env = gym.make(env_id)
    if (work / "sac.zip").exists():
        model = SAC.load(work / "sac.zip", env=env)
        model.load_replay_buffer(work / "replay.pkl")
        last = model.replay_buffer.pos - 1  # the episode the kill cut short ends there, truncated: the resumed
        model.replay_buffer.dones[last], model.replay_buffer.timeouts[last] = 1.0, 1.0  # run starts a new one
    else:
        model = SAC("MlpPolicy", env, learning_starts=WARMUP, seed=seed, verbose=0)
    eval_env = gym.make(env_id)

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            step = self.num_timesteps
            if step % EVAL_EVERY == 0 and step not in evals:
                act = lambda obs: model.predict(obs, deterministic=True)[0]  # noqa: E731
                evals[step] = mean_return(play(eval_env, act, EVAL_EPISODES, seed=10 + step))
                model.policy.save(work / f"policy-{step}.zip")
                model.save(work / "sac.zip")
                model.save_replay_buffer(work / "replay.pkl")
                evals_path.write_text(json.dumps(evals, indent=1))
                print(f"{env_id} step {step}: {evals[step]:.1f}", flush=True)
            return True

    left = steps - model.num_timesteps
    if left > 0:
        model.learn(left, callback=Evaluate(), reset_num_timesteps=False)
    return model, evals


def make(env_id: str, name: str, root: Path, steps: int) -> dict:
    import gymnasium as gym
    from stable_baselines3.sac.policies import SACPolicy



    root = root.resolve()  # Minari resolves a relative root against itself
    work = root / "_work" / name
    model, evals = train(env_id, work, steps)
    env = gym.make(env_id)
    rng = np.random.default_rng(0)
    ref_min = mean_return(play(env, lambda obs: rng.uniform(env.action_space.low, env.action_space.high),
                               REF_EPISODES, seed=0))
    best = max(evals, key=evals.get)
    medium = min(s for s, r in evals.items() if r >= ref_min + MEDIUM_FRACTION * (evals[best] - ref_min))
    policies = {s: SACPolicy.load(work / f"policy-{s}.zip") for s in (best, medium)}
    ref_max = mean_return(play(env, lambda obs: policies[best].predict(obs, deterministic=True)[0],
                               REF_EPISODES, seed=0))
    buffer = model.replay_buffer  # one environment: index i is the i-th step of the run (actions as stored:
    # the policy's squashed actions in [-1, 1], the action space of the MuJoCo bodies this is for)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1), env.action_space
    n = medium
    replay = split_episodes(buffer.observations[:n, 0], buffer.next_observations[:n, 0], buffer.actions[:n, 0],
                            buffer.rewards[:n, 0], buffer.dones[:n, 0], buffer.timeouts[:n, 0])
    sets = {"medium-replay": replay,
            "medium": play(env, lambda obs: policies[medium].predict(obs)[0], None, seed=1, steps=RECORD_STEPS),
            "expert": play(env, lambda obs: policies[best].predict(obs)[0], None, seed=2, steps=RECORD_STEPS)}
    summary = {"env": env_id, "ref_min_score": ref_min, "ref_max_score": ref_max, "best_step": best,
               "medium_step": medium, "evaluations": evals, "sets": {}}
    for kind, episodes in sets.items():
        dataset_id = f"bench/{name}/{kind}-v0"
        write_dataset(root, dataset_id, episodes, env=env_id, ref=(ref_min, ref_max))
        ret = mean_return(episodes)
        summary["sets"][dataset_id] = {"episodes": len(episodes), "steps": int(sum(len(e["actions"]) for e in episodes)),
                                       "mean_return": ret, "normalised": 100 * (ret - ref_min) / (ref_max - ref_min)}
    (root / f"{name}.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("env", help="Gymnasium MuJoCo environment, e.g. Walker2d-v5")
    parser.add_argument("--name", help="dataset name (default: the environment's, lower case, without -vN)")
    parser.add_argument("--root", default="benchmarks/datasets", help="Minari root to write into")
    parser.add_argument("--steps", type=int, default=300_000, help="SAC's environment steps (default: %(default)s)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    name = args.name or args.env.rsplit("-v", 1)[0].lower()
    print(json.dumps(make(args.env, name, Path(args.root), args.steps), indent=1))


if __name__ == "__main__":
    main()
