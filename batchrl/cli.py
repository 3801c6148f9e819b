"""The `batchrl` command: a thin face that imports a side only when its subcommand runs."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from batchrl.errors import UserError

COMMANDS = {
    "train": "train a policy on a Minari dataset (progress bar, metrics, checkpoints, --resume)",
    "eval": "evaluate a run folder or an exported model in its evaluation environment",
    "export": "export a run as models/NAME/<version>/model.onnx (checked against torch first)",
    "serve": "serve the model repository over gRPC (CUDA when usable, else CPU)",
    "rollout": "drive a Gymnasium environment through a served policy",
    "models": "list, load or unload the models of a running server (load/unload need the admin token)",
}


def train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="batchrl train", description=COMMANDS["train"])
    parser.add_argument("--algo", help="algorithm: bc, iql, td3bc, cql, bcq or dt (Decision Transformer)")
    parser.add_argument("--dataset", help="Minari dataset id (root from MINARI_DATASETS_PATH)")
    parser.add_argument("--run-dir", help="run folder (default: runs/<dataset>/<algo>-s<seed>)")
    parser.add_argument("--steps", type=int, default=100_000, help="gradient steps (default 100000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=10_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=10_000)
    parser.add_argument("--log-every", type=int, default=1_000)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="algorithm setting, e.g. --set beta=3.0 --set hidden=256,256 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    args = parser.parse_args(argv)
    from batchrl.training.trainer import TrainConfig, Trainer

    if args.resume:
        if not args.run_dir:
            parser.error("--resume needs --run-dir")
        trainer = Trainer(args.run_dir)
    else:
        if not args.algo or not args.dataset:
            parser.error("--algo and --dataset are required (or --resume --run-dir RUN)")
        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--set {item!r}: expected KEY=VALUE")
            overrides[key] = value
        config = TrainConfig(algorithm=args.algo, dataset=args.dataset, steps=args.steps, seed=args.seed,
                             eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                             log_every=args.log_every, checkpoint_every=args.checkpoint_every, device=args.device,
                             algo=overrides)
        run_dir = args.run_dir or f"runs/{args.dataset.replace('/', '_')}/{args.algo}-s{args.seed}"
        trainer = Trainer(run_dir, config)
    result = trainer.run()
    print(json.dumps(result, indent=2))
    print(f"run folder: {trainer.run_dir}")
    return 0


def evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="batchrl eval", description=COMMANDS["eval"])
    parser.add_argument("target", metavar="RUN_OR_MODEL",
                        help="a run folder, a model file, a version folder or models/NAME (highest version)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="episode i is reset with seed SEED + i")
    parser.add_argument("--env", help="Gymnasium id to use instead of the dataset's evaluation environment")
    parser.add_argument("--target-return", type=float, default=None,
                        help="sequence policies: the return to condition on (default: the model's own)")
    args = parser.parse_args(argv)
    from batchrl.training.evaluation import evaluate as run_eval
    from batchrl.training.evaluation import sequence_agent, stateless

    target = Path(args.target)
    if (target / "config.json").exists():
        from batchrl.training.trainer import load_policy, policy_act

        config, policy, ckpt = load_policy(target)
        if args.target_return is not None:
            if not hasattr(policy, "target_return"):
                raise SystemExit(f"{config.algorithm} is a feed-forward policy: --target-return applies only to "
                                 "sequence policies (dt)")
            policy.target_return = args.target_return
        act, dataset_id, env_id = policy_act(policy), config.dataset, None
        label = f"run {target} ({config.algorithm}, step {int(ckpt['step'])})"
    else:
        from batchrl.serving.runtime import load_model

        path, version = _model_file(target)
        model = load_model(target.name, version, path, ["CPUExecutionProvider"])
        if args.target_return is not None and not model.is_sequence:
            raise SystemExit(f"{path} is a feed-forward policy: --target-return applies only to sequence policies")
        if model.is_sequence:
            goal = model.manifest.default_target_return if args.target_return is None else args.target_return
            act = sequence_agent(model.run, model.context_spec, goal)
        else:
            act = stateless(lambda obs: model.run({"observations": obs[None]})[0])
        dataset_id, env_id = model.manifest.dataset_id, model.manifest.env_id
        label = f"model {path} ({model.manifest.algorithm}, onnxruntime CPU)"
    env, ref = _eval_env(args.env, dataset_id, env_id)
    result = run_eval(env, act, args.episodes, args.seed, *ref)
    print(label)
    for i, r in enumerate(result.returns):
        print(f"episode {i + 1} (seed {args.seed + i}): return {r:.2f}")
    print(result.summary())
    return 0


def _model_file(target: Path) -> tuple[Path, int]:
    from batchrl.protos.contract import MODEL_FILE, version_dirs

    if target.is_file():
        return target, int(target.parent.name) if target.parent.name.isdigit() else 0
    if (target / MODEL_FILE).is_file():
        return target / MODEL_FILE, int(target.name) if target.name.isdigit() else 0
    complete = [v for v, folder in version_dirs(target).items() if (folder / MODEL_FILE).is_file()]
    if not complete:
        raise SystemExit(f"{target} is neither a run folder (config.json) nor a model ({MODEL_FILE}, or "
                         "version folders holding one)")
    return target / str(complete[-1]) / MODEL_FILE, complete[-1]


def _eval_env(env_override: str | None, dataset_id: str, env_id: str | None):
    """The environment and reference scores: the dataset's evaluation env unless --env names one."""
    import gymnasium as gym

    from batchrl.training.data import load_dataset
    from batchrl.training.evaluation import make_eval_env

    ref = (None, None)
    try:
        data = load_dataset(dataset_id)
        ref = (data.ref_min_score, data.ref_max_score)
    except (FileNotFoundError, ValueError) as exc:
        if env_override is None and env_id is None:
            raise SystemExit(str(exc))
        print(f"note: dataset {dataset_id!r} not available ({exc}); using {env_override or env_id} "
              "with no reference scores", file=sys.stderr)
        return gym.make(env_override or env_id), ref
    return (gym.make(env_override) if env_override else make_eval_env(dataset_id)), ref


def export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="batchrl export", description=COMMANDS["export"])
    parser.add_argument("run", metavar="RUN", help="run folder")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--repository", "-r", default="models", help="model repository root (default: models)")
    parser.add_argument("--atol", type=float, default=1e-5, help="max abs ONNX-vs-torch difference allowed")
    args = parser.parse_args(argv)
    from batchrl.training.export import export_run

    out = export_run(args.run, args.name, args.repository, atol=args.atol)
    print(f"wrote {out['path']} (version {out['version']}); ONNX vs torch max abs diff "
          f"{out['max_abs_diff']:.2e} on {out['probes']} probe inputs (observations, or contexts for sequence models)")
    return 0


def serve(argv: list[str]) -> int:
    from batchrl.serve import main

    return main(argv)


def rollout(argv: list[str]) -> int:
    from batchrl.rollout import main

    return main(argv)


def models(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="batchrl models", description=COMMANDS["models"])
    parser.add_argument("action", choices=["list", "load", "unload"])
    parser.add_argument("name", nargs="?", help="model name (load, unload)")
    parser.add_argument("--version", type=int, default=None, help="load: one version (default: every new one)")
    parser.add_argument("--server", default="127.0.0.1:50051", help="server address host:port")
    parser.add_argument("--token-file", default=None,
                        help="file holding the admin token (default: $BATCHRL_ADMIN_TOKEN); list sends it too, "
                             "else $BATCHRL_DATA_TOKEN, to a server that needs a data-plane token")
    args = parser.parse_args(argv)
    if args.action != "list" and not args.name:
        parser.error(f"{args.action} needs a model NAME")
    import grpc

    from batchrl.serving.auth import DATA_TOKEN_ENV, read_admin_token, read_token
    from batchrl.serving.client import PolicyClient

    admin_token = read_admin_token(args.token_file)
    with PolicyClient(args.server, token=admin_token or read_token(None, DATA_TOKEN_ENV)) as client:
        try:
            if args.action == "list":
                for info in client.list_models():
                    for v in info.versions:
                        mark = "*" if v.version == info.default_version else " "
                        print(f"{mark} {info.name} version {v.version}: {v.manifest.algorithm} on "
                              f"{v.manifest.dataset_id} ({', '.join(v.providers)})")
            elif args.action == "load":
                out = client.load_model(args.name, args.version, admin_token)
                print(f"{out.name}: loaded {list(out.loaded_versions) or 'nothing new'}; serving versions "
                      f"{list(out.versions)} (default {out.default_version})")
            else:
                out = client.unload_model(args.name, admin_token)
                pinned = f"; kept for open sessions: {list(out.pinned_versions)}" if out.pinned_versions else ""
                print(f"{out.name}: unloaded versions {list(out.unloaded_versions)}{pinned}")
        except grpc.RpcError as exc:
            print(f"batchrl models {args.action}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


HANDLERS = {"train": train, "eval": evaluate, "export": export, "serve": serve, "rollout": rollout,
            "models": models}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in HANDLERS:
        lines = ["usage: batchrl COMMAND [options]   (batchrl COMMAND --help for its options)", "", "commands:"]
        width = max(map(len, COMMANDS))
        lines += [f"  {name:<{width}} {text}" for name, text in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nbatchrl: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    try:
        return HANDLERS[argv[0]](argv[1:])
    except (FileNotFoundError, FileExistsError, ValueError, UserError) as exc:  # user-caused: no traceback
        print(f"batchrl {argv[0]}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
