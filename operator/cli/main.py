"""`selfalign`: one entry point for users, CI pipelines and the operator's container.

Each command is a thin shell over a tested core; imports happen inside the command so that
`selfalign validate` in a CI job does not load torch or vLLM. A mistake in what the user gave
(a file, a name, a flag, a refused API call) is one line naming it, exit code 2, no traceback
unless `--debug`.

The commands that look at runs and steer them (status, report, logs, suspend, resume, retry)
are in run_commands.py; this module holds the parser, the error handling and the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user gave: printed as one line, exit code 2."""


# --- commands ---------------------------------------------------------------------------------

def _run(args: argparse.Namespace) -> int:
    from .local import load_run, run_local

    _check(args.file, cluster=False)
    documents = _manifests(args.file)
    if len(documents) != 1:
        raise UserError(f"{args.file}: expected one SelfAlignRun, found {len(documents)} documents")
    run = load_run(documents[0], path_uri(args.storage) if args.storage else None)
    print(f"run {run.name}: {run.spec.rounds} round(s) of {run.spec.recipe}; artifacts in {run.uri}")
    live = sys.stdout if sys.stdout.isatty() and not args.verbose else None
    return run_local(run, args.scratch, verbose=args.verbose, live=live)


def _validate(args: argparse.Namespace) -> int:
    from ..validate import validate_files

    results = validate_files([str(p) for p in args.files], cluster=not args.local, note=print)
    failed = 0
    for where, errors in results.items():
        if errors:
            failed += 1
            for error in errors:
                print(f"{where}: {error}")
        else:
            print(f"{where}: ok")
    return 1 if failed else 0


def _render(args: argparse.Namespace) -> int:
    import yaml

    from ..jobs import render_round
    from ..settings import OperatorSettings
    from ..spec import SpecError

    _check(args.file, cluster=True)
    documents = _manifests(args.file)
    if len(documents) != 1:
        raise UserError(f"{args.file}: expected one SelfAlignRun, found {len(documents)} documents")
    try:
        objects = render_round(documents[0], args.round, OperatorSettings.from_env(os.environ))
    except SpecError as exc:
        for error in exc.errors:
            print(f"{args.file}: {error}", file=sys.stderr)
        return 1
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0


def _dedup(args: argparse.Namespace) -> int:
    from selfalign.stages.text.dedup import dedup_file

    counts = dedup_file(path_uri(args.pool) if args.pool else None, path_uri(args.candidates),
                        path_uri(args.out), args.threshold)
    print(json.dumps(counts))
    return 0


def _coverage(args: argparse.Namespace) -> int:
    from selfalign.stages.vectors.coverage_report import coverage_command

    report = coverage_command(reference=path_uri(args.reference), instructions=path_uri(args.instructions),
                              out_dir=str(args.out), gaps=args.gaps, similarity=args.similarity, k=args.k,
                              embedder=args.embedder)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}))
    return 0


def _operator(args: argparse.Namespace) -> int:
    from ..handlers import run_operator
    from ..logging_setup import configure_logging

    configure_logging(args.log_format)
    run_operator(namespaces=args.namespace or None, peering=args.peering, liveness=args.liveness,
                 metrics_port=args.metrics_port)
    return 0


# --- files ------------------------------------------------------------------------------------

def _check(path: Path, cluster: bool) -> None:
    """The manifest as `selfalign validate` checks it; its errors as a UserError, one per line."""
    from ..validate import validate_files

    errors = [f"{where}: {error}" for where, found in validate_files([str(path)], cluster=cluster).items()
              for error in found]
    if errors:
        raise UserError("\n".join(errors))


def _manifests(path: Path) -> list[dict]:
    """YAML documents as kubectl reads them (`2e-5` is a number, not a string); `_check` first."""
    import yaml

    from ..validate import ManifestLoader

    return [d for d in yaml.load_all(path.read_text(), Loader=ManifestLoader) if d]


def path_uri(path_or_uri: str) -> str:
    """Plain paths on the command line become file:// URIs; URIs pass through."""
    if "://" in path_or_uri:
        return path_or_uri
    return Path(path_or_uri).resolve().as_uri()


# --- the parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import run_commands as runs
    from .local import default_storage

    common = argparse.ArgumentParser(add_help=False)
    # Unset unless given, so that `selfalign --debug CMD` is not undone by CMD's own default.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--storage", default=default_storage(),
                       help="local runs: storage root, a directory or URI (default: %(default)s)")
    cluster = where.add_argument_group("a cluster instead of local runs (any of these selects it)")
    cluster.add_argument("-n", "--namespace", help="the runs' namespace (default: the context's)")
    cluster.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    cluster.add_argument("--context", help="kubeconfig context (default: the current one)")

    on_cluster = argparse.ArgumentParser(add_help=False)
    on_cluster.add_argument("run", help="the SelfAlignRun's name")
    on_cluster.add_argument("-n", "--namespace", help="the run's namespace (default: the context's)")
    on_cluster.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    on_cluster.add_argument("--context", help="kubeconfig context (default: the current one)")

    parser = argparse.ArgumentParser(prog="selfalign", description="Iterative LLM self-alignment campaigns.",
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('selfalign')}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("run", parents=[common], help="run a whole campaign on this machine (the local backend)")
    p.add_argument("file", type=Path, help="a SelfAlignRun manifest, e.g. examples/tiny.yaml")
    p.add_argument("--storage", help="storage root instead of the spec's (a directory or URI)")
    p.add_argument("--scratch", type=Path, default=Path(os.environ.get("SELFALIGN_SCRATCH",
                   Path.home() / ".cache" / "selfalign")), help="local directory for model files")
    p.add_argument("-v", "--verbose", action="store_true", help="stream the stages' own logs to the terminal")
    p.set_defaults(func=_run)

    p = commands.add_parser("status", parents=[common, where], help="where the runs stand, or one run stage by stage")
    p.add_argument("run", nargs="?", help="a run name, a local run folder, or a run URI")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="runs of every namespace (a cluster)")
    p.add_argument("-w", "--watch", action="store_true",
                   help="print again on every change; one run: until it ends (exit 0 Succeeded, 1 Failed)")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.set_defaults(func=runs.status)

    p = commands.add_parser("report", parents=[common, where], help="a static HTML report of a run, readable offline")
    p.add_argument("run", help="a run name, a local run folder, or a run URI")
    p.add_argument("--out", required=True, type=Path, help="directory for index.html")
    p.set_defaults(func=runs.report, all_namespaces=False)

    p = commands.add_parser("logs", parents=[common, where], help="a stage's own log (default: the current stage)")
    p.add_argument("run", help="a run name, a local run folder, or a run URI")
    p.add_argument("--round", type=int, help="round, counted from 1 as status shows it")
    p.add_argument("--stage", help="synthesize, assess, train, merge or coverage")
    p.add_argument("-f", "--follow", action="store_true", help="a cluster: stream the log while the stage runs")
    p.set_defaults(func=runs.logs, all_namespaces=False)

    for name, func, text in (("suspend", runs.suspend, "set spec.suspend: stop the running stage, start nothing new"),
                             ("resume", runs.resume, "clear spec.suspend: continue where the run stopped"),
                             ("retry", runs.retry, "raise spec.retry by one: run the failed stage again")):
        p = commands.add_parser(name, parents=[common, on_cluster], help=text)
        p.set_defaults(func=func)

    p = commands.add_parser("validate", parents=[common], help="check SelfAlignRun manifests offline "
                            "(CRD schema + typed spec); other kinds of objects are skipped")
    p.add_argument("files", nargs="+", type=Path, help="YAML files; - reads standard input")
    p.add_argument("--local", action="store_true", help="for `selfalign run`: file:// storage allowed")
    p.set_defaults(func=_validate)

    p = commands.add_parser("render", parents=[common],
                            help="print every object the operator would create for a round")
    p.add_argument("file", type=Path)
    p.add_argument("--round", type=int, default=0, help="round index, from 0 as in the Jobs' names (default: 0)")
    p.set_defaults(func=_render)

    p = commands.add_parser("dedup", parents=[common],
                            help="drop ROUGE-L near-duplicates of a pool from a JSONL file")
    p.add_argument("--pool", help="JSONL with `instruction` already accepted (optional)")
    p.add_argument("--candidates", required=True, help="JSONL with `instruction`")
    p.add_argument("--out", required=True, help="where the kept rows are written")
    p.add_argument("--threshold", type=float, default=0.7, help="reject when ROUGE-L F1 > this")
    p.set_defaults(func=_dedup)

    p = commands.add_parser("coverage", parents=[common],
                            help="how well an instruction set covers a reference corpus")
    p.add_argument("--reference", required=True, help="JSONL with `text` (optional id, domain) or text lines")
    p.add_argument("--instructions", required=True, help="JSONL with `instruction` (optional input, output)")
    p.add_argument("--out", required=True, type=Path, help="directory for report.json, gaps.jsonl, coverage.png")
    p.add_argument("--gaps", type=int, default=100, help="gap documents to select")
    p.add_argument("--similarity", type=float, help="covered when the nearest item is this similar "
                   "(default: as similar as the document's nearest other reference document)")
    p.add_argument("--k", type=int, default=10, help="neighbours for the density score")
    p.add_argument("--embedder", default="builtin://all-minilm-l6-v2", help="sentence-transformers model URI")
    p.set_defaults(func=_coverage)

    p = commands.add_parser("operator", parents=[common], help="run the Kubernetes operator (in its Deployment)")
    p.add_argument("--namespace", action="append", help="watch only these namespaces (repeatable)")
    p.add_argument("--peering", help="kopf peering name; replicas sharing it elect one active operator")
    p.add_argument("--liveness", help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("SELFALIGN_METRICS_PORT", "8080")),
                   help="Prometheus /metrics port (0 disables)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON object per line (level, logger, message, namespace, run)")
    p.set_defaults(func=_operator)
    return parser


def _user_error_types() -> tuple[type[Exception], ...]:
    """Errors that carry a message for the user (bad input, storage, the cluster): one line each."""
    from selfalign.stages.runtime.context import StageError

    from ..spec import SpecError

    types: list[type[Exception]] = [UserError, StageError, SpecError]
    for module, name in (("selfalign.stages.runtime.storage", "StorageError"),
                         ("selfalign.operator.cli.cluster_view", "ClusterError")):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        named_file = isinstance(exc, OSError) and exc.filename is not None  # a path the user gave
        if getattr(args, "debug", False) or not (named_file or isinstance(exc, _user_error_types())):
            raise
        message = f"{exc.filename}: {exc.strerror}" if named_file else str(exc)
        for line in message.splitlines() or [type(exc).__name__]:
            print(f"selfalign {args.command}: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # The package's own module, not this __main__ copy: run_commands raises the UserError it imports.
    from selfalign.operator.cli.main import main as package_main

    sys.exit(package_main())
