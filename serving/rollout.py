"""Drive a Gymnasium environment through the policy server (a client-side tool).

Imports gymnasium: it is never imported by the server itself.
"""
from __future__ import annotations

import argparse

import numpy as np

from serving.client import PolicyClient
from training.evaluation import run_episodes, summarize


def served_manifest(client: PolicyClient, model: str, version: int | None):
    for info in client.list_models():
        if info.name == model:
            wanted = version if version is not None else info.default_version
            for v in info.versions:
                if v.version == wanted:
                    return v.manifest
            raise SystemExit(f"model {model!r} has no version {wanted}; served: {[v.version for v in info.versions]}")
    raise SystemExit(f"model {model!r} is not served at this address")


def rollout(server: str, model: str, env_id: str, episodes: int, seed: int, version: int | None = None,
            print_fn=print):
    import gymnasium as gym

    with PolicyClient(server) as client:
        client.wait_ready()
        manifest = served_manifest(client, model, version)
        env = gym.make(env_id)
        try:
            def act(obs: np.ndarray) -> np.ndarray:
                return client.act(model, obs[None], version=version)[0]

            returns, lengths = run_episodes(
                env, act, episodes, seed,
                on_episode=lambda i, r, n: print_fn(f"episode {i + 1}/{episodes} (seed {seed + i}): "
                                                    f"return {r:.2f} over {n} steps"))
        finally:
            env.close()
    ref = (manifest.ref_min_score, manifest.ref_max_score) if manifest.HasField("ref_max_score") else (None, None)
    result = summarize(returns, lengths, *ref)
    print_fn(result.summary())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchrl rollout",
                                     description="Run episodes of a Gymnasium environment through a served policy.")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--version", type=int, default=None, help="model version (default: the highest)")
    parser.add_argument("--env", default=None, help="Gymnasium environment id (default: the model's env_id)")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="episode i is reset with seed SEED + i")
    parser.add_argument("--server", default="127.0.0.1:50051", help="server address host:port")
    args = parser.parse_args(argv)
    env_id = args.env
    if env_id is None:
        with PolicyClient(args.server) as client:
            env_id = served_manifest(client, args.model, args.version).env_id
    rollout(args.server, args.model, env_id, args.episodes, args.seed, args.version)
    return 0
