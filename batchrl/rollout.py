"""Drive a Gymnasium environment through the policy server (a client-side tool): one session per
episode for every policy, closed with the episode's end, so a server logging experience
(`serve --log-experience`) records whole episodes.

Imports gymnasium: it is never imported by the server itself.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from batchrl.cli import CONNECT_TIMEOUT, add_client_options, command_parser, connect, server_address
from batchrl.errors import UserError
from batchrl.serving.client import Episode, PolicyClient
from batchrl.training.evaluation import check_observation_size, make_env, run_episodes, summarize


def served_manifest(client: PolicyClient, model: str, version: int | None):
    served = client.list_models()
    for info in served:
        if info.name == model:
            wanted = version if version is not None else info.default_version
            for v in info.versions:
                if v.version == wanted:
                    return v.manifest
            raise UserError(f"model {model!r} has no version {wanted}; served: {[v.version for v in info.versions]}")
    raise UserError(f"model {model!r} is not served at {client.address}; served: "
                    f"{sorted(info.name for info in served)}")


class EpisodeStreams:
    """A served policy as an ``Act``: one Episode stream (one server session) per episode, closed with the
    episode's end (final observation, reward, terminated or truncated), so the server sees whole episodes.
    ``noise_std`` > 0 samples around the policy's action, step t of episode i seeded from (seed, i, t)."""

    def __init__(self, client: PolicyClient, model: str, version: int | None, target_return: float | None,
                 noise_std: float = 0.0, seed: int = 0):
        self.client, self.model, self.version, self.target_return = client, model, version, target_return
        self.noise_std, self.seed = noise_std, seed
        self.episode: Episode | None = None
        self.episodes = 0  # opened so far

    def __call__(self, observation: np.ndarray, reward: float | None) -> np.ndarray:
        if reward is None:  # a new episode starts
            self.close()
            self.episode = self.client.episode(self.model, self.version, self.target_return)
            self.episodes += 1
        seed = None
        if self.noise_std:
            seed = int(np.random.SeedSequence([self.seed, self.episodes - 1, self.episode.index]).generate_state(
                2, np.uint32).view(np.uint64)[0])
        return self.episode.step(observation, reward, self.noise_std, seed)

    def end(self, final_observation: np.ndarray, reward: float, terminated: bool) -> None:
        """Close the episode with its end."""
        self.episode.close(final_observation, reward, "terminated" if terminated else "truncated")
        self.episode = None

    def close(self) -> None:
        """Close an episode left open (an error stopped it): no end to give."""
        if self.episode is not None:
            self.episode.close()
            self.episode = None


def rollout(server: str | list[str] | PolicyClient, model: str, env_id: str, episodes: int, seed: int,
            version: int | None = None, print_fn=print, target_return: float | None = None, token: str | None = None,
            noise_std: float = 0.0):
    """``server``: address(es) to connect to with ``token``, or a client to use (left open: its owner closes it)."""
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise UserError(f"--noise-std must be finite and >= 0, got {noise_std}")
    given = isinstance(server, PolicyClient)
    with contextlib.nullcontext(server) if given else PolicyClient(server, token=token) as client:
        client.wait_ready(CONNECT_TIMEOUT)
        manifest = served_manifest(client, model, version)
        env = make_env(env_id)
        check_observation_size(env, math.prod(manifest.observation_space.shape), f"model {model!r}")
        if target_return is not None and manifest.context_length == 0:
            raise UserError(f"model {model!r} is a feed-forward policy: --target-return applies only to "
                            "sequence policies")
        streams = EpisodeStreams(client, model, version, target_return, noise_std, seed)
        try:
            returns, lengths = run_episodes(
                env, streams, episodes, seed, on_end=streams.end,
                on_episode=lambda i, r, n: print_fn(f"episode {i + 1}/{episodes} (seed {seed + i}): "
                                                    f"return {r:.2f} over {n} steps"))
        finally:
            streams.close()
            env.close()
    ref = (manifest.ref_min_score, manifest.ref_max_score) if manifest.HasField("ref_max_score") else (None, None)
    result = summarize(returns, lengths, *ref)
    print_fn(result.summary())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("batchrl rollout", "Run episodes of a Gymnasium environment through a served policy.")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--version", type=int, default=None, help="model version (default: the highest)")
    parser.add_argument("--env", default=None, help="Gymnasium environment id (default: the model's env_id)")
    parser.add_argument("--episodes", type=int, default=5, help="episodes to run")
    parser.add_argument("--seed", type=int, default=0, help="episode i is reset with seed SEED + i")
    parser.add_argument("--server", default="127.0.0.1:50051", type=server_address,
                        help="server address host:port, or several separated by commas (replicas sharing a session "
                             "store: a call that finds one UNAVAILABLE is retried on the next, same step index)")
    parser.add_argument("--noise-std", type=float, default=0.0,
                        help="Gaussian noise (in action units, clipped to the bounds) around the policy's action: "
                             "exploration for collecting new experience; 0 = the deterministic policy")
    parser.add_argument("--target-return", type=float, default=None,
                        help="sequence policies: the return to condition on (default: the model's own)")
    add_client_options(parser)
    args = parser.parse_args(argv)
    args.server = [a.strip() for a in args.server.split(",") if a.strip()] or parser.error("--server is empty")
    with connect(args) as client:  # one connection for the lookup and the episodes
        env_id = args.env or served_manifest(client, args.model, args.version).env_id
        rollout(client, args.model, env_id, args.episodes, args.seed, args.version,
                target_return=args.target_return, noise_std=args.noise_std)
    return 0
