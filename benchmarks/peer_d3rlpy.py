"""d3rlpy, the benchmark's peer: one training run on arrays that batchrl's loader wrote.

Runs inside the peer's own virtual environment (benchmarks/peer.py makes it; d3rlpy
pins an older gymnasium than batchrl's), imports nothing of batchrl, and is never
imported by batchrl. It trains ``--algorithm`` with the settings the runner
translated from batchrl's defaults, and every ``--eval-every`` steps writes

  policy-<step>.pt   the deterministic acting path as TorchScript (d3rlpy's own
                     save_policy: observation and action scalers inside), which
                     the runner evaluates with batchrl's evaluation code;
  model.d3           d3rlpy's learnable (weights, optimisers, config);
  progress.json      {"step": ..., "train_seconds": ...}: where a resume starts.

Usage (by benchmarks/peer.py): python peer_d3rlpy.py RUN_DIR
with RUN_DIR/peer.json {algorithm, settings, steps, eval_every, seed} and RUN_DIR/dataset.npz, or with
peer.json's "own" ("minari" or "aligned") and "dataset" instead: d3rlpy's own defaults and data pipeline;
(by benchmarks/update_speed.py): python peer_d3rlpy.py --speed ALGORITHM SETTINGS_JSON UPDATES;
(by benchmarks/peer.py check_data): python peer_d3rlpy.py --check-data DATASET_NPZ;
(by benchmarks/peer.py check-own): python peer_d3rlpy.py --check-own DATASET_ID.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def build(algorithm: str, s: dict, data: dict, steps: int):
    import d3rlpy
    from d3rlpy.models.encoders import VectorEncoderFactory
    from d3rlpy.optimizers import AdamFactory
    from d3rlpy.optimizers.lr_schedulers import CosineAnnealingLRFactory
    from d3rlpy.preprocessing import MinMaxActionScaler, ReturnBasedRewardScaler, StandardObservationScaler

    encoder = VectorEncoderFactory(hidden_units=list(s["hidden"])) if "hidden" in s else None
    common = dict(
        batch_size=s["batch_size"],
        # batchrl floors the std at 1e-3 and divides by it; d3rlpy divides by std + eps.
        observation_scaler=StandardObservationScaler(mean=data["obs_mean"], std=data["obs_std"] - 1e-3, eps=1e-3),
        action_scaler=MinMaxActionScaler(minimum=data["action_low"], maximum=data["action_high"]),
    )
    if algorithm == "bc":
        return d3rlpy.algos.BCConfig(learning_rate=s["lr"], encoder_factory=encoder,
                                     policy_type="deterministic" if s["policy"] == "deterministic" else "stochastic",
                                     **common).create(device="cpu:0")
    if algorithm == "iql":
        horizon = steps if s["actor_lr_horizon"] is None else s["actor_lr_horizon"]
        actor_optim = AdamFactory(lr_scheduler_factory=CosineAnnealingLRFactory(T_max=horizon) if horizon else None)
        scaler = (ReturnBasedRewardScaler(return_max=float(data["return_max"]), return_min=float(data["return_min"]),
                                          multiplier=1000.0) if s["normalize_rewards"] else None)
        return d3rlpy.algos.IQLConfig(
            actor_learning_rate=s["actor_lr"], critic_learning_rate=s["critic_lr"], actor_encoder_factory=encoder,
            critic_encoder_factory=encoder, value_encoder_factory=encoder, actor_optim_factory=actor_optim,
            gamma=s["discount"], tau=s["tau"], n_critics=2, expectile=s["expectile"], weight_temp=s["beta"],
            max_weight=s["max_weight"], reward_scaler=scaler, **common).create(device="cpu:0")
    if algorithm == "td3bc":
        return d3rlpy.algos.TD3PlusBCConfig(
            actor_learning_rate=s["actor_lr"], critic_learning_rate=s["critic_lr"], actor_encoder_factory=encoder,
            critic_encoder_factory=encoder, gamma=s["discount"], tau=s["tau"], n_critics=2,
            target_smoothing_sigma=s["policy_noise"], target_smoothing_clip=s["noise_clip"], alpha=s["alpha"],
            update_actor_interval=s["policy_delay"], **common).create(device="cpu:0")
    if algorithm == "cql":
        return d3rlpy.algos.CQLConfig(
            actor_learning_rate=s["actor_lr"], critic_learning_rate=s["critic_lr"], temp_learning_rate=s["alpha_lr"],
            alpha_learning_rate=s["lagrange_lr"] if s["lagrange"] else 0.0, initial_alpha=1.0,
            alpha_threshold=s["target_action_gap"], conservative_weight=s["min_q_weight"],
            n_action_samples=s["num_actions"], actor_encoder_factory=encoder, critic_encoder_factory=encoder,
            gamma=s["discount"], tau=s["tau"], n_critics=2, **common).create(device="cpu:0")
    if algorithm == "bcq":
        return d3rlpy.algos.BCQConfig(
            actor_learning_rate=s["lr"], critic_learning_rate=s["lr"], imitator_learning_rate=s["lr"],
            actor_encoder_factory=VectorEncoderFactory(hidden_units=list(s["actor_hidden"])),
            critic_encoder_factory=VectorEncoderFactory(hidden_units=list(s["critic_hidden"])),
            imitator_encoder_factory=VectorEncoderFactory(hidden_units=list(s["vae_hidden"])),
            gamma=s["discount"], tau=s["tau"], n_critics=2, update_actor_interval=1, lam=s["lmbda"],
            n_action_samples=s["target_candidates"], action_flexibility=s["phi"], beta=s["kl_weight"],
            rl_start_step=0, **common).create(device="cpu:0")
    if algorithm == "dt":
        common.pop("action_scaler")  # (d3rlpy's DT takes actions as they are)
        return d3rlpy.algos.DecisionTransformerConfig(
            learning_rate=s["lr"], context_size=s["context_length"], max_timestep=s["max_timestep"],
            num_heads=s["heads"], num_layers=s["layers"], attn_dropout=s["dropout"], resid_dropout=s["dropout"],
            embed_dropout=s["dropout"], activation_type="relu",
            encoder_factory=VectorEncoderFactory(hidden_units=[s["embed"]], exclude_last_activation=True),
            **common).create(device="cpu:0")
    raise SystemExit(f"peer_d3rlpy: no d3rlpy counterpart for algorithm {algorithm!r}")


def build_own(algorithm: str):
    """d3rlpy as its users run it (issue 33): its config classes' own defaults, its StandardObservationScaler
    and, for IQL, ReturnBasedRewardScaler(multiplier=1000), both fitted by d3rlpy on its own episodes; no
    learning-rate schedule, no action scaler, nothing translated from batchrl."""
    import d3rlpy
    from d3rlpy.preprocessing import ReturnBasedRewardScaler, StandardObservationScaler

    if algorithm == "iql":
        return d3rlpy.algos.IQLConfig(observation_scaler=StandardObservationScaler(),
                                      reward_scaler=ReturnBasedRewardScaler(multiplier=1000.0)).create(device="cpu:0")
    if algorithm == "bc":
        return d3rlpy.algos.BCConfig(observation_scaler=StandardObservationScaler()).create(device="cpu:0")
    raise SystemExit(f"peer_d3rlpy: no own-defaults row for algorithm {algorithm!r}")


def own_dataset(dataset_id: str, pipeline: str):
    """d3rlpy's episodes of a Minari dataset (MINARI_DATASETS_PATH): "minari" is d3rlpy.datasets.get_minari as
    2.8.1 ships it, which stacks each episode's N+1 observations against its N actions, so that episode k's
    observations are shifted k steps against its actions (`python -m benchmarks.peer check-own ID` counts them); "aligned" is
    the same with each episode's final observation left out, as MDPDataset expects."""
    import d3rlpy

    if pipeline == "minari":
        return d3rlpy.datasets.get_minari(dataset_id)[0]
    import minari

    eps = list(minari.load_dataset(dataset_id).iterate_episodes())
    terminals = np.concatenate([np.asarray(e.terminations, bool) for e in eps])
    timeouts = np.concatenate([np.asarray(e.truncations, bool) for e in eps]) & ~terminals
    return d3rlpy.dataset.MDPDataset(np.concatenate([e.observations[:-1] for e in eps]).astype(np.float32),
                                     np.concatenate([e.actions for e in eps]).astype(np.float32),
                                     np.concatenate([e.rewards for e in eps]).astype(np.float32),
                                     terminals.astype(np.float32), timeouts.astype(np.float32))


def speed(algorithm: str, settings: dict, updates: int, warmup: int = 20) -> float:
    """Updates per second at ``settings`` on one thread, on synthetic Hopper-sized data (11-dim observations,
    3-dim actions, 100 episodes of 1,000 steps), batches drawn by d3rlpy's own sampler: the same shapes as
    batchrl's benchmarks/update_speed.py."""
    import d3rlpy

    torch.set_num_threads(1)
    d3rlpy.seed(0)
    rng = np.random.default_rng(0)
    size, length = 100_000, 1000
    observations = rng.normal(size=(size, 11)).astype(np.float32)
    timeouts = np.zeros(size, np.float32)
    timeouts[length - 1::length] = 1.0
    dataset = d3rlpy.dataset.MDPDataset(observations, rng.uniform(-1, 1, size=(size, 3)).astype(np.float32),
                                        rng.random(size).astype(np.float32), np.zeros(size, np.float32), timeouts)
    data = {"obs_mean": observations.mean(0), "obs_std": observations.std(0) + 1e-3,
            "action_low": -np.ones(3, np.float32), "action_high": np.ones(3, np.float32),
            "return_max": 600.0, "return_min": 400.0}
    algo = build(algorithm, settings, data, updates + warmup)
    algo.build_with_dataset(dataset)
    if algorithm == "dt":
        draw = lambda: dataset.sample_trajectory_batch(settings["batch_size"], settings["context_length"])  # noqa: E731
    else:
        draw = lambda: dataset.sample_transition_batch(settings["batch_size"])  # noqa: E731
    for _ in range(warmup):
        algo.update(draw())
    start = time.perf_counter()
    for _ in range(updates):
        algo.update(draw())
    return updates / (time.perf_counter() - start)


def main(run_dir: Path) -> int:
    import d3rlpy
    from d3rlpy.logging import NoopAdapterFactory

    torch.set_num_threads(1)
    job = json.loads((run_dir / "peer.json").read_text())
    progress_path = run_dir / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {"step": 0, "train_seconds": 0.0}
    d3rlpy.seed(job["seed"] + progress["step"])  # a resume continues with fresh, still seeded, randomness
    if job.get("own"):  # d3rlpy's own pipeline and defaults
        dataset = own_dataset(job["dataset"], job["own"])
    else:
        data = dict(np.load(run_dir / "dataset.npz"))
        dataset = d3rlpy.dataset.MDPDataset(data["observations"], data["actions"], data["rewards"],
                                            data["terminals"], data["timeouts"])
    if progress["step"] and (run_dir / "model.d3").exists():
        algo = d3rlpy.load_learnable(str(run_dir / "model.d3"))
    elif job.get("own"):
        algo = build_own(job["algorithm"])
    else:
        algo = build(job["algorithm"], job["settings"], data, job["steps"])
    while progress["step"] < job["steps"]:
        n = min(job["eval_every"], job["steps"] - progress["step"])
        tick = time.perf_counter()
        algo.fit(dataset, n_steps=n, n_steps_per_epoch=n, logger_adapter=NoopAdapterFactory(), show_progress=False,
                 save_interval=10**9)
        progress = {"step": progress["step"] + n, "train_seconds": progress["train_seconds"] + time.perf_counter() - tick}
        algo.save_policy(str(run_dir / f"policy-{progress['step']}.pt"))
        algo.save(str(run_dir / "model.d3.tmp"))
        os.replace(run_dir / "model.d3.tmp", run_dir / "model.d3")
        (run_dir / "progress.tmp").write_text(json.dumps(progress))
        os.replace(run_dir / "progress.tmp", progress_path)
        print(f"peer_d3rlpy: step {progress['step']}/{job['steps']}", flush=True)
    return 0


def check_data(path: Path) -> dict:
    """d3rlpy's episodes from the arrays, each transition as its own picker gives it, against the arrays'
    (batchrl's) transition at the same index: how many differ in each field, of how many compared.
    Where d3rlpy keeps a transition it is compared; the next observation only where it is not terminal."""
    import d3rlpy

    data = dict(np.load(path))
    dataset = d3rlpy.dataset.MDPDataset(data["observations"], data["actions"], data["rewards"], data["terminals"],
                                        data["timeouts"])
    picker = d3rlpy.dataset.BasicTransitionPicker()
    counts = {"transitions": 0, "observation": 0, "action": 0, "reward": 0, "terminal": 0, "next_observation": 0}
    start = 0
    for episode in dataset.episodes:
        for t in range(episode.transition_count):
            tr, i = picker(episode, t), start + t
            terminal = float(np.ravel(tr.terminal)[0])
            counts["transitions"] += 1
            counts["observation"] += not np.array_equal(tr.observation, data["observations"][i])
            counts["action"] += not np.array_equal(tr.action, data["actions"][i])
            counts["reward"] += float(np.ravel(tr.reward)[0]) != float(data["rewards"][i])
            counts["terminal"] += terminal != float(data["terminals"][i])
            counts["next_observation"] += terminal == 0 and not np.array_equal(tr.next_observation,
                                                                               data["next_observations"][i])
        start += episode.size()
    return {k: int(v) for k, v in counts.items()}


def check_own(dataset_id: str) -> dict:
    """How many of the observations d3rlpy's get_minari gives each episode are not that episode's own (Minari's
    observation at the same step), and the first episode where they differ."""
    import minari

    replay = own_dataset(dataset_id, "minari")
    counts, first = {"episodes": 0, "steps": 0, "observations_not_the_episodes_own": 0}, None
    for k, (ours, theirs) in enumerate(zip(replay.episodes, minari.load_dataset(dataset_id).iterate_episodes())):
        n = len(theirs.actions)
        wrong = int((~np.all(ours.observations[:n] == theirs.observations[:n], axis=1)).sum())
        first = k if first is None and wrong else first
        counts["episodes"] += 1
        counts["steps"] += n
        counts["observations_not_the_episodes_own"] += wrong
    return {"dataset": dataset_id, **counts, "first_episode_shifted": first}


if __name__ == "__main__":
    if sys.argv[1] == "--check-own":
        print(json.dumps(check_own(sys.argv[2])))
        sys.exit(0)
    if sys.argv[1] == "--check-data":
        print(json.dumps(check_data(Path(sys.argv[2]))))
        sys.exit(0)
    if sys.argv[1] == "--speed":  # --speed ALGORITHM SETTINGS_JSON UPDATES: prints {"updates_per_s": ...}
        print(json.dumps({"updates_per_s": speed(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))}))
        sys.exit(0)
    sys.exit(main(Path(sys.argv[1])))
