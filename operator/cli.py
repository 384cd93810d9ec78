"""`selfalign`: one entry point for users, CI pipelines and the operator's container.

Each command is a thin shell over a tested core; imports happen inside the command so that
`selfalign validate` in a CI job does not load torch or vLLM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from .local import load_run, run_local

    documents = _manifests(args.file)
    if len(documents) != 1:
        print(f"{args.file}: expected one SelfAlignRun, found {len(documents)} documents", file=sys.stderr)
        return 2
    run = load_run(documents[0], _uri(args.storage) if args.storage else None)
    print(f"run {run.name}: {run.spec.rounds} round(s) of {run.spec.recipe}; artifacts in {run.uri}")
    return run_local(run, args.scratch)


def _status(args: argparse.Namespace) -> int:
    from .report import status_command

    return status_command(args.run, _uri(args.storage))


def _report(args: argparse.Namespace) -> int:
    from .report import report_command

    return report_command(args.run, args.out, _uri(args.storage))


def _validate(args: argparse.Namespace) -> int:
    from .validate import validate_files

    results = validate_files([str(p) for p in args.files])
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

    from .jobs import render_round
    from .settings import OperatorSettings
    from .spec import SpecError

    documents = _manifests(args.file)
    if len(documents) != 1:
        print(f"{args.file}: expected one SelfAlignRun, found {len(documents)} documents", file=sys.stderr)
        return 1
    try:
        objects = render_round(documents[0], args.round, OperatorSettings.from_env(os.environ))
    except SpecError as exc:
        for error in exc.errors:
            print(f"{args.file}: {error}", file=sys.stderr)
        return 1
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0


def _dedup(args: argparse.Namespace) -> int:
    from selfalign.stages.dedup import dedup_file

    counts = dedup_file(_uri(args.pool) if args.pool else None, _uri(args.candidates), _uri(args.out), args.threshold)
    print(json.dumps(counts))
    return 0


def _coverage(args: argparse.Namespace) -> int:
    from selfalign.stages.coverage_report import coverage_command

    report = coverage_command(reference=_uri(args.reference), instructions=_uri(args.instructions),
                              out_dir=str(args.out), gaps=args.gaps, similarity=args.similarity, k=args.k,
                              embedder=args.embedder)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}))
    return 0


def _operator(args: argparse.Namespace) -> int:
    from .handlers import run_operator

    run_operator(namespaces=args.namespace or None, peering=args.peering, liveness=args.liveness,
                 metrics_port=args.metrics_port)
    return 0


def _manifests(path: Path) -> list[dict]:
    """YAML documents as kubectl reads them (`2e-5` is a number, not a string)."""
    import yaml

    from .validate import ManifestLoader

    return [d for d in yaml.load_all(path.read_text(), Loader=ManifestLoader) if d]


def _uri(path_or_uri: str) -> str:
    """Plain paths on the command line become file:// URIs; URIs pass through."""
    if "://" in path_or_uri:
        return path_or_uri
    return Path(path_or_uri).resolve().as_uri()


def build_parser() -> argparse.ArgumentParser:
    from .local import DEFAULT_STORAGE

    parser = argparse.ArgumentParser(prog="selfalign", description="Iterative LLM self-alignment campaigns.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("run", help="run a whole campaign on this machine (the local backend)")
    p.add_argument("file", type=Path, help="a SelfAlignRun manifest, e.g. examples/tiny.yaml")
    p.add_argument("--storage", help="storage root instead of the spec's (a directory or URI)")
    p.add_argument("--scratch", type=Path, default=Path(os.environ.get("SELFALIGN_SCRATCH",
                   Path.home() / ".cache" / "selfalign")), help="local directory for model files")
    p.set_defaults(func=_run)

    p = commands.add_parser("status", help="where the local runs stand, or one run stage by stage")
    p.add_argument("run", nargs="?", help="a run name under STORAGE/local, a run folder, or a run URI")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root, a directory or URI (default: %(default)s)")
    p.set_defaults(func=_status)

    p = commands.add_parser("report", help="a static HTML report of a run, readable offline")
    p.add_argument("run", help="a run name under STORAGE/local, a run folder, or a run URI")
    p.add_argument("--out", required=True, type=Path, help="directory for index.html")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root, a directory or URI (default: %(default)s)")
    p.set_defaults(func=_report)

    p = commands.add_parser("validate", help="check SelfAlignRun manifests offline (CRD schema + typed spec)")
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(func=_validate)

    p = commands.add_parser("render", help="print every object the operator would create for a round")
    p.add_argument("file", type=Path)
    p.add_argument("--round", type=int, default=0)
    p.set_defaults(func=_render)

    p = commands.add_parser("dedup", help="drop ROUGE-L near-duplicates of a pool from a JSONL file")
    p.add_argument("--pool", help="JSONL with `instruction` already accepted (optional)")
    p.add_argument("--candidates", required=True, help="JSONL with `instruction`")
    p.add_argument("--out", required=True, help="where the kept rows are written")
    p.add_argument("--threshold", type=float, default=0.7, help="reject when ROUGE-L F1 > this")
    p.set_defaults(func=_dedup)

    p = commands.add_parser("coverage", help="how well an instruction set covers a reference corpus")
    p.add_argument("--reference", required=True, help="JSONL with `text` (optional id, domain) or text lines")
    p.add_argument("--instructions", required=True, help="JSONL with `instruction` (optional input, output)")
    p.add_argument("--out", required=True, type=Path, help="directory for report.json, gaps.jsonl, coverage.png")
    p.add_argument("--gaps", type=int, default=100, help="gap documents to select")
    p.add_argument("--similarity", type=float, default=0.5, help="covered when nearest item is this similar")
    p.add_argument("--k", type=int, default=10, help="neighbours for the density score")
    p.add_argument("--embedder", default="builtin://all-minilm-l6-v2", help="sentence-transformers model URI")
    p.set_defaults(func=_coverage)

    p = commands.add_parser("operator", help="run the Kubernetes operator (in its Deployment)")
    p.add_argument("--namespace", action="append", help="watch only these namespaces (repeatable)")
    p.add_argument("--peering", help="kopf peering name; replicas sharing it elect one active operator")
    p.add_argument("--liveness", help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("SELFALIGN_METRICS_PORT", "8080")),
                   help="Prometheus /metrics port (0 disables)")
    p.set_defaults(func=_operator)
    return parser


def _user_error_types() -> tuple[type[Exception], ...]:
    """Errors that carry a message for the user (bad input, storage): print it, no traceback."""
    from selfalign.stages.context import StageError

    from .spec import SpecError

    types: list[type[Exception]] = [StageError, SpecError]
    storage = sys.modules.get("selfalign.stages.storage")
    if storage is not None:
        types.append(storage.StorageError)
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        if not isinstance(exc, _user_error_types()):
            raise
        print(f"selfalign {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
