"""`batchrl promote NAME --candidate RUN_OR_MODEL --dataset ID`: a new version enters the repository only when
off-policy evaluation says it is better than the deployed one.

Both policies are estimated by fitted Q evaluation (training/ope.py) with the same settings, on the same data
and the same bootstrap replicates; the candidate is published as the next version of NAME only when the lower
bound of the interval of the paired difference (candidate − deployed) is above 0 (``--force`` publishes anyway).
The published file's manifest records how it got there (``promotion``). promote only writes the repository: a
running server picks the version up at its next repository poll (`batchrl serve --poll SECONDS`), or when an
operator calls `batchrl models load NAME` (admin token); promote itself holds no token and calls no server.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from batchrl.errors import UserError


def main(argv: list[str]) -> int:
    from batchrl.cli import COMMANDS, add_fqe_options, check_fits, command_parser, feed_forward_model, \
        fqe_config, model_policy

    parser = command_parser("batchrl promote", COMMANDS["promote"])
    parser.add_argument("name", metavar="NAME", help="the deployed model's name in the repository")
    parser.add_argument("--candidate", required=True, metavar="RUN_OR_MODEL",
                        help="a run folder (exported first, checked against torch) or an exported model")
    parser.add_argument("--dataset", required=True, help="Minari dataset id or path both are estimated on")
    parser.add_argument("--repository", "-r", default="models", help="model repository root")
    add_fqe_options(parser)
    parser.add_argument("--force", action="store_true",
                        help="publish the candidate whatever the estimates say (the manifest says it was forced)")
    args = parser.parse_args(argv)
    from batchrl.training.data import load_dataset
    from batchrl.training.export import export_run, publish
    from batchrl.training.ope import compare

    config = fqe_config(args)
    repository = Path(args.repository)
    if not (repository / args.name).is_dir():
        raise UserError(f"nothing named {args.name!r} is deployed in {repository}: publish a first version with "
                        f"batchrl export RUN --name {args.name} --repository {repository}")
    deployed = feed_forward_model(repository / args.name, args.name, "deployed model")
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(args.candidate)
        if (candidate / "config.json").is_file():
            candidate = Path(export_run(candidate, args.name, Path(tmp) / "export")["path"])
        models = {"candidate": feed_forward_model(candidate, args.name, "candidate"), "deployed": deployed}
        data = load_dataset(args.dataset)
        for model in models.values():
            check_fits(model, data)
        result = compare(data, model_policy(models["candidate"]), model_policy(models["deployed"]), config,
                         args.device)
        level = f"{config.confidence:.0%}"
        figures = (f"candidate {result.candidate.value:.2f}, deployed (version {deployed.version}) "
                   f"{result.deployed.value:.2f}; candidate − deployed {result.difference:+.2f}, {level} interval "
                   f"[{result.low:+.2f}, {result.high:+.2f}] over B={config.bootstrap} paired replicates "
                   f"(FQE, gamma {config.gamma}, {config.steps} steps per fit, on {data.dataset_id})")
        print(figures)
        if not result.better and not args.force:
            raise UserError(f"not promoted: the lower bound {result.low:+.2f} of candidate − deployed is not above "
                            "0 (--force publishes it anyway)")
        how = "gate passed" if result.better else "forced (the gate would have refused)"
        marked = Path(tmp) / "model.onnx"
        _mark(models["candidate"].path, marked, f"{how}: {figures}")
        version, final = publish(repository, args.name, marked)
    print(f"promoted: {final} (version {version}); a server polling the repository loads it at its next poll, "
          f"or load it now with: batchrl models load {args.name}")
    return 0


def _mark(source: Path, target: Path, promotion: str) -> None:
    """Copy the model with ``promotion`` in its manifest (the ONNX metadata the server reads)."""
    import onnx

    from batchrl.protos.contract import MANIFEST_KEY

    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key == MANIFEST_KEY:
            manifest = json.loads(prop.value)
            manifest["promotion"] = promotion
            prop.value = json.dumps(manifest)
            break
    else:
        raise UserError(f"{source} holds no batchrl manifest")
    onnx.save(model, str(target))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
