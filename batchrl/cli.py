"""The `batchrl` command: a thin face that imports a side only when its subcommand runs."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from batchrl.errors import Interrupted, UserError

CONNECT_TIMEOUT = 5.0  # seconds the client commands wait for a server before saying there is none (--wait)
DEBUG_ENV = "BATCHRL_DEBUG"  # set (or pass --debug) to see the traceback of a reported error

COMMANDS = {
    "train": "train a policy on a Minari dataset (progress bar, metrics, checkpoints, --resume)",
    "sweep": "train a grid of runs (algorithms x datasets x seeds x settings from a YAML file) as Ray tasks",
    "eval": "evaluate a run folder or an exported model in its evaluation environment",
    "ope": "estimate an exported policy's discounted value on a dataset (fitted Q evaluation, bootstrap interval)",
    "promote": "publish a candidate as NAME's next version only when FQE says it beats the deployed one",
    "data": "data import: experience logs (serve --log-experience shards, or your own Parquet/CSV) into a Minari "
            "dataset",
    "export": "export a run as models/NAME/<version>/model.onnx (checked against torch first)",
    "serve": "serve the model repository over gRPC (CUDA when usable, else CPU)",
    "rollout": "drive a Gymnasium environment through a served policy",
    "models": "list, load or unload the models of a running server (load/unload need the admin token)",
}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, except where there is none to show."""

    def _get_help_string(self, action):
        if any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)) or action.default == [] \
                or action.required:
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A usage error in one line (argparse's own prints the whole usage block first)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a `batchrl` subcommand: --help shows every default, a usage error is one line."""
    return _Parser(prog=prog, description=description, formatter_class=_Help, allow_abbrev=False)


def server_address(value: str) -> str:
    """argparse type of --server: HOST:PORT, or several separated by commas. Checked at once: gRPC takes an
    address without a port for a name to resolve, so the client would wait CONNECT_TIMEOUT for no server."""
    for address in value.split(","):
        host, colon, port = address.strip().rpartition(":")
        if not (colon and host.strip("[]") and port.isdigit() and 0 < int(port) < 65536):
            raise argparse.ArgumentTypeError(f"{address.strip()!r}: expected HOST:PORT (e.g. 127.0.0.1:50051)")
    return value


def train(argv: list[str]) -> int:
    parser = command_parser("batchrl train", COMMANDS["train"])
    parser.add_argument("--algo", help="algorithm: bc, iql, td3bc, cql, bcq or dt (Decision Transformer); "
                                       "required unless --resume")
    parser.add_argument("--dataset", help="Minari dataset id, read from $MINARI_DATASETS_PATH; required unless "
                                          "--resume")
    parser.add_argument("--run-dir", help="run folder (default: runs/<dataset>/<algo>-s<seed>); required with "
                                          "--resume")
    parser.add_argument("--steps", type=int, default=None,
                        help="gradient steps (default: 100000); fixed when the run starts: with --resume any "
                             "other count is refused (a run is not extended: train a new run with more --steps)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the networks and the batch sampler")
    parser.add_argument("--eval-every", type=int, default=10_000, help="steps between evaluations")
    parser.add_argument("--eval-episodes", type=int, default=10, help="episodes per evaluation")
    parser.add_argument("--checkpoint-every", type=int, default=10_000,
                        help="steps between checkpoints (Ctrl-C or SIGTERM also writes one)")
    parser.add_argument("--log-every", type=int, default=1_000, help="steps between train rows in metrics.jsonl")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--compile", action="store_true",
                        help="compile the networks with torch.compile (inductor): a first-step delay of tens of "
                             "seconds, then the measured gain or loss per algorithm in benchmarks/results/"
                             "update_speed.md; resume stays exact")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="algorithm setting, e.g. --set beta=3.0 --set hidden=256,256 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes on this machine (torchrun --standalone; gloo on the CPU, NCCL "
                             "on CUDA): each draws batch_size/N of every batch, so the effective batch and learning "
                             "rates stay the single-process ones; rank 0 writes the run folder. Several machines: "
                             "torchrun ... -m batchrl.cli train")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.resume and not args.run_dir:
        parser.error("--resume needs --run-dir")
    if args.resume and args.steps is not None and args.run_dir:
        check_resume_steps(Path(args.run_dir), args.steps)
    if args.resume and args.run_dir and (Path(args.run_dir) / "result.json").is_file():  # trainer.RESULT
        # finished: nothing to resume, said at once (no torch, no torchrun: the trainer would do nothing)
        result = json.loads((Path(args.run_dir) / "result.json").read_text())
        print(f"{args.run_dir} is finished (step {result['steps']} of {result['steps']}): nothing to resume; its "
              "result:", file=sys.stderr)
        print(json.dumps(result, indent=2))
        print(f"run folder: {args.run_dir}")
        return 0
    from batchrl.training import distributed
    from batchrl.training.device import resolve_device

    overrides = {}
    if not args.resume:  # here, before torchrun starts N processes that would each refuse it
        if not args.algo or not args.dataset:
            parser.error("--algo and --dataset are required (or --resume --run-dir RUN)")
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--set {item!r}: expected KEY=VALUE")
            overrides[key] = value
        check_settings(parser, args.algo, overrides)
        resolve_device(args.device)
        if args.nproc > 1 and not distributed.launched():
            from batchrl.training.data import open_minari

            open_minari(args.dataset)  # found, or one line (each rank would say it)
    if args.nproc > 1 and not distributed.launched():
        rest = [a for i, a in enumerate(argv) if not (a.startswith("--nproc") or (i and argv[i - 1] == "--nproc"))]
        return distributed.launch(args.nproc, rest)  # torchrun's agent in this process: it passes signals on
    from batchrl.training.trainer import TrainConfig, Trainer

    if args.resume:
        trainer = Trainer(args.run_dir)
        if trainer.world.main:
            print(f"resuming {trainer.run_dir} from step {trainer.step} of {trainer.config.steps}", file=sys.stderr)
    else:
        steps = TrainConfig.steps if args.steps is None else args.steps
        config = TrainConfig(algorithm=args.algo, dataset=args.dataset, steps=steps, seed=args.seed,
                             eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                             log_every=args.log_every, checkpoint_every=args.checkpoint_every, device=args.device,
                             compile=args.compile, algo=overrides)
        run_dir = args.run_dir or f"runs/{args.dataset.replace('/', '_')}/{args.algo}-s{args.seed}"
        trainer = Trainer(run_dir, config)
    try:
        result = trainer.run()
    except BaseException:
        distributed.leave(wait=False)
        raise
    distributed.leave()
    if trainer.world.main:
        print(json.dumps(result, indent=2))
        print(f"run folder: {trainer.run_dir}")
    return 0


def check_resume_steps(run_dir: Path, steps: int) -> None:
    """Refuse --resume --steps N where N is not the run's own count, in every algorithm: a run's step count
    is fixed when it starts. Extending IQL could not equal the longer run trained straight (its actor
    learning rate follows a cosine over the total steps), and a finished run's final evaluation and
    result.json belong to its count; one rule for all algorithms rather than extensions exact for some."""
    from batchrl.training.trainer import read_config

    if not (run_dir / "config.json").is_file():
        return  # the resume itself says there is no run there
    planned = read_config(run_dir).steps
    if steps != planned:
        raise UserError(f"--steps {steps}: {run_dir} is a {planned}-step run and --resume only continues a run to "
                        f"its own step count (it is fixed when the run starts); to train {steps} steps, start a new "
                        f"run: batchrl train ... --steps {steps} --run-dir NEW_FOLDER")


def check_settings(parser: argparse.ArgumentParser, algo: str, overrides: dict[str, str]) -> None:
    """A --set value that does not parse as its setting's type: a usage error naming that --set."""
    from batchrl.training.algorithms import ALGORITHMS
    from batchrl.training.trainer import SettingError, algorithm_config

    if algo not in ALGORITHMS:
        return  # TrainConfig names the algorithms
    try:
        algorithm_config(algo, overrides)
    except SettingError as exc:
        parser.error(f"--set {exc.key}={exc.value}: expected {exc.expected}")


def sweep(argv: list[str]) -> int:
    parser = command_parser("batchrl sweep", COMMANDS["sweep"])
    parser.add_argument("config", metavar="CONFIG", help="sweep file (YAML: name, runs, output, grids; see "
                                                         "docs/design.md or benchmarks/sweeps/)")
    parser.add_argument("--cpus", type=int, default=None,
                        help="CPUs of the local Ray this command starts: trials at once, one thread each "
                             "(default: every core)")
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster (e.g. ray://head:10001 or auto) instead of a local one; its "
                             "nodes need batchrl installed and the runs folder on storage they share")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the table and plot from the finished trials")
    args = parser.parse_args(argv)
    if args.cpus is not None and args.cpus < 1:
        parser.error(f"--cpus must be >= 1, got {args.cpus}")
    if args.cpus is not None and args.address:
        parser.error("--cpus sizes a local Ray; an existing cluster (--address) has its own")
    try:  # the optional dependencies, named before any work starts
        import yaml  # noqa: F401
        if not args.report_only:
            import ray  # noqa: F401
    except ImportError as exc:
        raise UserError(f"batchrl sweep needs {exc.name}, which is not installed: pip install 'batchrl[sweep]'")
    from batchrl.training.sweep import main as run

    return run(args.config, args.cpus, args.address, args.report_only)


def evaluate(argv: list[str]) -> int:
    parser = command_parser("batchrl eval", COMMANDS["eval"])
    parser.add_argument("target", metavar="RUN_OR_MODEL",
                        help="a run folder, a model file, a version folder or models/NAME (highest version)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes to run")
    parser.add_argument("--seed", type=int, default=0, help="episode i is reset with seed SEED + i")
    parser.add_argument("--env", help="Gymnasium id to use instead of the dataset's evaluation environment")
    parser.add_argument("--target-return", type=float, default=None,
                        help="sequence policies: the return to condition on (default: the model's own)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N: where a run folder's policy "
                                                        "runs (torch), or an exported model's (onnxruntime)")
    args = parser.parse_args(argv)
    from batchrl.training.device import resolve_device
    from batchrl.training.evaluation import check_observation_size, sequence_agent, stateless
    from batchrl.training.evaluation import evaluate as run_eval

    device = resolve_device(args.device)
    target = Path(args.target)
    if (target / "config.json").exists():
        from batchrl.training.trainer import load_policy, policy_act

        config, policy, ckpt = load_policy(target, str(device))
        if args.target_return is not None:
            if not hasattr(policy, "target_return"):
                raise UserError(f"{config.algorithm} is a feed-forward policy: --target-return applies only to "
                                "sequence policies (dt)")
            policy.target_return = args.target_return
        act, dataset_id, env_id = policy_act(policy), config.dataset, None
        obs_size = int(ckpt["normalization"]["obs_mean"].numel())
        what = f"run {target}"
        label = f"{what} ({config.algorithm}, step {int(ckpt['step'])})"
    else:
        from batchrl.serving.runtime import choose_providers, load_model

        path, version = _model_file(target)
        model = load_model(target.name, version, path, choose_providers(device.type, device.index or 0))
        if args.target_return is not None and not model.is_sequence:
            raise UserError(f"{path} is a feed-forward policy: --target-return applies only to sequence policies")
        if model.is_sequence:
            goal = model.manifest.default_target_return if args.target_return is None else args.target_return
            act = sequence_agent(model.run, model.context_spec, goal)
        else:
            act = stateless(lambda obs: model.run({"observations": obs[None]})[0])
        dataset_id, env_id = model.manifest.dataset_id, model.manifest.env_id
        obs_size = math.prod(model.manifest.observation_space.shape)
        what = f"model {path}"
        label = f"{what} ({model.manifest.algorithm}, onnxruntime {', '.join(model.providers)})"
    env, ref = _eval_env(args.env, dataset_id, env_id)
    check_observation_size(env, obs_size, f"the {what}")
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
        raise UserError(f"{target} is neither a run folder (config.json) nor a model ({MODEL_FILE}, or "
                        "version folders holding one)")
    return target / str(complete[-1]) / MODEL_FILE, complete[-1]


def _eval_env(env_override: str | None, dataset_id: str, env_id: str | None):
    """The environment and reference scores: the dataset's evaluation env unless --env names one."""
    from batchrl.training.data import load_dataset
    from batchrl.training.evaluation import make_env, make_eval_env

    ref = (None, None)
    try:
        data = load_dataset(dataset_id)
        ref = (data.ref_min_score, data.ref_max_score)
    except (FileNotFoundError, ValueError) as exc:
        if env_override is None and env_id is None:
            raise
        print(f"note: dataset {dataset_id!r} not available ({exc}); using {env_override or env_id} "
              "with no reference scores", file=sys.stderr)
        return make_env(env_override or env_id), ref
    return (make_env(env_override) if env_override else make_eval_env(dataset_id)), ref


def add_fqe_options(parser: argparse.ArgumentParser) -> None:
    """The FQE settings of `batchrl ope` and `batchrl promote`."""
    from batchrl.training.ope import FQEConfig

    defaults = FQEConfig()
    parser.add_argument("--gamma", type=float, default=defaults.gamma, help="discount of the estimated values")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="gradient steps per FQE fit")
    parser.add_argument("--bootstrap", type=int, default=defaults.bootstrap,
                        help="FQE refits on episode-resampled data for the interval")
    parser.add_argument("--confidence", type=float, default=defaults.confidence, help="the interval's level")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the fits and of the resampling (the same seed: the same replicates)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")


def fqe_config(args):
    from batchrl.training.ope import FQEConfig

    return FQEConfig(gamma=args.gamma, steps=args.steps, bootstrap=args.bootstrap, confidence=args.confidence,
                     seed=args.seed)


def feed_forward_model(target: Path, name: str, role: str = "model"):
    """The exported model at ``target`` (a file, a version folder or models/NAME), refused if it is a sequence
    model: FQE's Q(s, a) cannot condition on an episode's context."""
    from batchrl.serving.runtime import load_model

    path, version = _model_file(target)
    model = load_model(name, version, path, ["CPUExecutionProvider"])
    if model.is_sequence:
        raise UserError(f"the {role} {path} is a sequence model ({model.manifest.algorithm}): its action depends on "
                        "the episode's context, which FQE's Q(s, a) cannot condition on; evaluate it with batchrl eval")
    return model


def model_policy(model):
    """A feed-forward model as FQE's policy: raw observations [N, obs] -> raw actions [N, act]."""
    return lambda obs: model.run({"observations": obs})


def ope(argv: list[str]) -> int:
    parser = command_parser("batchrl ope", COMMANDS["ope"])
    parser.add_argument("model", metavar="MODEL", help="an exported feed-forward model: a model file, a version "
                                                       "folder or models/NAME (highest version)")
    parser.add_argument("--dataset", help="Minari dataset id or path (default: the one the model was trained on)")
    add_fqe_options(parser)
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args = parser.parse_args(argv)
    from batchrl.training.data import load_dataset
    from batchrl.training.device import resolve_device
    from batchrl.training.ope import estimate

    device = resolve_device(args.device)  # before the model and the data load
    config = fqe_config(args)
    model = feed_forward_model(Path(args.model), Path(args.model).name)
    path = model.path
    data = load_dataset(args.dataset or model.manifest.dataset_id)
    check_fits(model, data)
    result = estimate(data, model_policy(model), config, str(device))
    out = {"model": str(path), "dataset": data.dataset_id, "gamma": result.gamma, "value": result.value,
           "low": result.low, "high": result.high, "method": result.method, "replicates": result.replicates,
           "transitions": data.size, "episodes": int(len(data.episode_starts)), "steps_per_fit": config.steps}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    interval = (f", {result.confidence:.0%} interval [{result.low:.2f}, {result.high:.2f}]"
                if result.low is not None else "")
    print(f"{path} ({model.manifest.algorithm}) on {data.dataset_id} ({data.size} transitions, "
          f"{len(data.episode_starts)} episodes)")
    print(f"FQE estimate of the discounted value (gamma {result.gamma}, reward units, not a normalised score): "
          f"{result.value:.2f}{interval}")
    print(f"interval: {result.method}; {config.steps} steps per fit")
    return 0


def check_fits(model, data) -> None:
    """UserError naming both when the model's observations or actions are not the dataset's."""
    for what, expected, got in (("observations", math.prod(model.manifest.observation_space.shape), data.obs_dim),
                                ("actions", math.prod(model.manifest.action_space.shape), data.act_dim)):
        if expected != got:
            raise UserError(f"dataset {data.dataset_id!r} has {what} of size {got}, but {model.path} has {expected}")


def data(argv: list[str]) -> int:
    parser = command_parser("batchrl data", COMMANDS["data"])
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    imports = actions.add_parser(
        "import", help="reassemble experience rows into episodes and write them as a Minari dataset",
        description="Reassemble experience rows (protos/experience.py; or your own logs with --map) into episodes "
                    "by session and step index, and write them as a Minari dataset, chunk by chunk.",
        formatter_class=_Help, allow_abbrev=False)
    imports.add_argument("sources", nargs="+", metavar="SOURCE",
                         help="Parquet or CSV files, or folders of them (experience-*.parquet shards by default)")
    imports.add_argument("--output", required=True, metavar="ID_OR_PATH",
                         help="a Minari dataset id ((namespace/)name-vN, written under $MINARI_DATASETS_PATH) or a "
                              "folder path (starting with ., / or ~, or not of the id form)")
    imports.add_argument("--model", help="an exported model (file, version folder or models/NAME): its manifest "
                                         "gives the spaces, the environment and the reference scores")
    imports.add_argument("--merge", metavar="DATASET",
                         help="a Minari dataset (id or path) copied first; its spaces must agree, its environment "
                              "and reference scores are kept")
    imports.add_argument("--env", help="Gymnasium id giving the spaces and environment (without --model or --merge; "
                                       "with none of the three the spaces are inferred and no environment is written)")
    imports.add_argument("--format", choices=["experience", "parquet", "csv"],
                         help="how to read the sources (default: experience for .parquet, csv for .csv)")
    imports.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                         help="the column holding FIELD (session_id, step, observation, action, reward, ending); "
                              "COLUMN ending in * stacks the scalar columns PREFIX0, PREFIX1, ... (repeatable). "
                              "ending is optional: a file without an ending column (and no --map ending=...) has "
                              "no end rows, so each episode ends truncated at its last row (its observation the "
                              "final one, its action dropped, and with --reward-of action its reward), or is "
                              "dropped with --drop-unfinished")
    imports.add_argument("--reward-of", choices=["previous", "action"], default="previous",
                         help="previous: a row's reward was earned by the previous row's action (the experience "
                              "log's way); action: by the row's own action")
    imports.add_argument("--drop-unfinished", action="store_true",
                         help="drop episodes without an end row instead of truncating them at their last row")
    imports.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output")
    imports.add_argument("--on-conflict", choices=["first", "last"],
                         help="copies of a step (same session and step index) that differ in a value are refused "
                              "unless this says which to keep: the first or the last, by the log's time, then by "
                              "order in the files (identical copies, a retried step, are kept once and counted)")
    args = parser.parse_args(argv)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("batchrl data import needs pyarrow, which is not installed: pip install "
                        "'batchrl[experience]'") from None
    from batchrl.training.experience_import import import_experience, parse_mapping

    summary = import_experience(args.sources, args.output, model=_model_file(Path(args.model))[0] if args.model
                                else None, merge=args.merge, env=args.env, format=args.format,
                                mapping=parse_mapping(args.map), reward_of=args.reward_of,
                                drop_unfinished=args.drop_unfinished, overwrite=args.overwrite,
                                on_conflict=args.on_conflict)
    print(summary)
    return 0


def export(argv: list[str]) -> int:
    parser = command_parser("batchrl export", COMMANDS["export"])
    parser.add_argument("run", metavar="RUN", help="run folder")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--repository", "-r", default="models", help="model repository root")
    parser.add_argument("--atol", type=float, default=1e-5, help="max abs ONNX-vs-torch difference allowed")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="export a run whose checkpoint is short of its --steps (still training or stopped); "
                             "refused without it. The manifest records training_steps < planned_steps")
    args = parser.parse_args(argv)
    from batchrl.training.export import export_run

    out = export_run(args.run, args.name, args.repository, atol=args.atol, allow_unfinished=args.allow_unfinished)
    manifest = out["manifest"]
    if int(manifest.get("trainingSteps", 0)) < int(manifest.get("plannedSteps", 0)):
        print(f"warning: {args.run} is unfinished (step {manifest['trainingSteps']} of {manifest['plannedSteps']}); "
              "exported as --allow-unfinished asked", file=sys.stderr)
    print(f"wrote {out['path']} (version {out['version']}); ONNX vs torch max abs diff "
          f"{out['max_abs_diff']:.2e} on {out['probes']} probe inputs (observations, or contexts for sequence models)")
    return 0


def serve(argv: list[str]) -> int:
    from batchrl.serve import main

    return main(argv)


def promote(argv: list[str]) -> int:
    from batchrl.promote import main

    return main(argv)


def rollout(argv: list[str]) -> int:
    from batchrl.rollout import main

    return main(argv)


def add_client_options(parser: argparse.ArgumentParser, admin: bool = False) -> None:
    """How every command that calls a server (models, rollout) connects: TLS and tokens, named as `serve`
    names its side of them. ``admin``: the command also takes the admin token, which --token-file then
    means (as it did before the names matched serve's); elsewhere --token-file is the data-plane token's."""
    parser.add_argument("--tls-ca", metavar="PEM", help="connect over TLS, trusting the server certificate this CA "
                                                        "signed (serve --tls-cert); without it, plaintext")
    parser.add_argument("--client-cert", metavar="PEM",
                        help="client certificate for a server requiring mutual TLS (serve --client-ca); with "
                             "--client-key")
    parser.add_argument("--client-key", metavar="PEM", help="the (unencrypted) private key of --client-cert")
    parser.add_argument("--data-token-file", *([] if admin else ["--token-file"]), metavar="FILE",
                        help="file holding the server's data-plane token (serve --data-token-file; default: "
                             "$BATCHRL_DATA_TOKEN; neither: none)")
    parser.add_argument("--wait", type=wait_seconds, default=CONNECT_TIMEOUT, metavar="SECONDS",
                        help="how long to wait for the server to answer before giving up (default: %(default)g); "
                             "a server just started in the background answers once its models are loaded")
    if admin:
        parser.add_argument("--admin-token-file", "--token-file", metavar="FILE",
                            help="file holding the admin token (serve --admin-token-file; default: "
                                 "$BATCHRL_ADMIN_TOKEN); sent on data-plane calls too, where it is accepted")


def wait_seconds(value: str) -> float:
    """argparse type of --wait: finite seconds > 0."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{value!r}: expected seconds > 0 (e.g. 30)")
    return seconds


def connect(args: argparse.Namespace, token: str | None = None):
    """A PolicyClient to --server as add_client_options' options say, a server answering within --wait
    seconds (a one-line ConnectionError otherwise). ``token``: sent instead of the data-plane token."""
    from batchrl.serving.auth import DATA_TOKEN_ENV, read_token
    from batchrl.serving.client import PolicyClient

    client = PolicyClient(args.server, tls_ca=args.tls_ca, client_cert=args.client_cert, client_key=args.client_key,
                          token=token or read_token(args.data_token_file, DATA_TOKEN_ENV))
    try:
        client.wait_ready(args.wait)
    except BaseException:
        client.close()
        raise
    return client


def models(argv: list[str]) -> int:
    parser = command_parser("batchrl models", COMMANDS["models"])
    parser.add_argument("action", choices=["list", "load", "unload"])
    parser.add_argument("name", nargs="?", help="model name (load, unload)")
    parser.add_argument("--version", type=int, default=None, help="load: one version (default: every new one)")
    parser.add_argument("--server", default="127.0.0.1:50051", type=server_address, help="server address host:port")
    add_client_options(parser, admin=True)
    args = parser.parse_args(argv)
    if args.action != "list" and not args.name:
        parser.error(f"{args.action} needs a model NAME")
    from batchrl.serving.auth import read_admin_token

    admin_token = read_admin_token(args.admin_token_file)
    with connect(args, admin_token) as client:
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
    return 0


HANDLERS = {"train": train, "sweep": sweep, "eval": evaluate, "ope": ope, "promote": promote, "data": data,
            "export": export, "serve": serve, "rollout": rollout, "models": models}


def usage() -> str:
    lines = ["usage: batchrl [--version] [--debug] COMMAND [options]   (batchrl COMMAND --help for its options)",
             "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {text}" for name, text in COMMANDS.items()]
    lines += ["", f"A reported error is one line; --debug (or {DEBUG_ENV}=1) shows its traceback."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = bool(os.environ.get(DEBUG_ENV))
    while argv and argv[0] in ("--debug", "--version"):
        if argv.pop(0) == "--version":
            from batchrl.version import package_version

            print(f"batchrl {package_version()}")
            return 0
        debug = True
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(usage())
        print(f"\nbatchrl: unknown command {command!r}", file=sys.stderr)
        return 2
    try:
        return HANDLERS[command](rest)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"batchrl {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only the user's mistakes are reported in one line
        problem = user_error(exc)
        if problem is None or debug:
            raise
        if not (isinstance(exc, Interrupted) and int(os.environ.get("RANK", "0"))):  # rank 0 says it for all
            print(f"batchrl {command}: error: {problem}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)


def user_error(exc: BaseException) -> str | None:
    """One line for an exception that reports a mistake of the user's; None for a bug (traceback)."""
    if isinstance(exc, (UserError, FileNotFoundError, FileExistsError, ValueError, ConnectionError)):
        return " ".join(str(exc).split()) or type(exc).__name__
    code = getattr(exc, "code", None)  # a gRPC error the server answered with: its status and message
    if callable(code) and callable(getattr(exc, "details", None)):
        return f"the server answered {code().name}: {' '.join(str(exc.details()).split())}"
    return None


if __name__ == "__main__":
    sys.exit(main())
