"""The commands that look at runs and steer them: `status`, `report`, `logs`, `suspend`,
`resume`, `retry`.

They read local runs from storage, or SelfAlignRuns from a cluster when any of `-n`, `-A`,
`--kubeconfig` or `--context` is given (`cluster_view`); a local run is shown as a SelfAlignRun
object too, so `-o json|yaml` reads the same either way. `--watch` follows a cluster run through
a watch and a local run by reading its status.json again (a file has nothing to subscribe to).
`suspend`, `resume` and `retry` change the run's spec, as a GitOps commit would.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from .main import UserError, path_uri

TERMINAL = ("Succeeded", "Failed")
POLL_SECONDS = 2.0  # local --watch: how often status.json is read again


def status(args: argparse.Namespace) -> int:
    from .report import run_table, runs_table

    if args.run is None:
        shown = None
        for listed in _listings(args) if args.watch else iter([_list(args)]):
            objects = [obj for _, obj in listed]
            if objects != shown:
                _print(listed, args.output, lambda rows: runs_table([r for r, _ in rows]) if rows else _nothing(args),
                       objects)
                shown = objects
        return 0
    snapshots = _snapshots(args) if args.watch else iter([_one(args)])
    shown = None
    for run, obj, artifacts_read in snapshots:
        if obj != shown:
            _print(run, args.output, lambda r: run_table(r, artifacts_read).rstrip("\n"), obj)
            shown = obj
    return 0 if not args.watch or (shown or {}).get("status", {}).get("phase") == "Succeeded" else 1


def report(args: argparse.Namespace) -> int:
    from .report import read_run
    from .report_html import write_report

    found, _, artifacts_read = _one(args)
    if not artifacts_read:  # a cluster run: its artifacts are under its storage prefix
        found = dataclasses.replace(read_run(found.uri), name=found.name, status=found.status, spec=found.spec)
    page = write_report(found, args.out)
    print(f"report of run {found.name} ({found.status.get('phase', 'phase unknown')}): {page}")
    return 0


def logs(args: argparse.Namespace) -> int:
    run, _, _ = _one(args)
    round_, stage = _stage_of(run.status, args.round, args.stage)
    if _on_cluster(args):
        from . import cluster_view

        cluster = _cluster(args)
        job = run.record(round_, stage).get("job")
        pods = cluster_view.stage_pods(cluster, job) if job else []
        if not pods:
            raise UserError(f"run {run.name}: round {round_ + 1} {stage} has no Pod (not started, or deleted "
                            "with its Job after the Job's TTL)")
        for pod in pods:
            if len(pods) > 1:
                print(f"==> {pod['metadata']['name']} <==")
            for text in cluster_view.pod_log(cluster, pod["metadata"]["name"], args.follow):
                print(text, end="", flush=True)
        return 0
    from selfalign.stages.runtime import storage

    from .local import stage_log_uri

    uri = stage_log_uri(run.uri, round_, stage)
    if not storage.exists(uri):
        raise UserError(f"run {run.name}: no log of round {round_ + 1} {stage} at {uri}")
    print(storage.read_text(uri), end="")
    return 0


def suspend(args: argparse.Namespace) -> int:
    return _patch(args, {"suspend": True}, "suspended: the running stage stops; resume continues it")


def resume(args: argparse.Namespace) -> int:
    return _patch(args, {"suspend": False}, "resumed")


def retry(args: argparse.Namespace) -> int:
    from . import cluster_view

    obj = cluster_view.get_run(_cluster(args), args.run)
    phase = (obj.get("status") or {}).get("phase")
    if phase != "Failed":  # a retry only re-runs a stage that failed under a smaller spec.retry
        raise UserError(f"{args.run}: the run is {phase or 'not started'}, not Failed: nothing to retry")
    count = int((obj.get("spec") or {}).get("retry") or 0) + 1
    return _patch(args, {"retry": count}, f"spec.retry is now {count}: the failed stage runs again with a new Job")


# --- reading runs, locally or from a cluster --------------------------------------------------

def _on_cluster(args: argparse.Namespace) -> bool:
    return any(getattr(args, flag, None) for flag in ("namespace", "all_namespaces", "kubeconfig", "context"))


def _cluster(args: argparse.Namespace):
    from . import cluster_view

    return cluster_view.connect(args.kubeconfig, args.context, args.namespace)


def _list(args: argparse.Namespace) -> list[tuple[Any, dict[str, Any]]]:
    """(row, object) of every run: SelfAlignRuns, or local runs as SelfAlignRun-shaped objects."""
    if _on_cluster(args):
        from . import cluster_view

        objects = cluster_view.list_runs(_cluster(args), args.all_namespaces)
        return [(cluster_view.row(o, args.all_namespaces), o) for o in objects]
    from .report import list_runs

    return [(r, _local_object(r.name, r.spec, r.status)) for r in list_runs(path_uri(args.storage))]


def _nothing(args: argparse.Namespace) -> str:
    from .local import LOCAL_NAMESPACE

    if not _on_cluster(args):
        return f"no runs under {path_uri(args.storage)}/{LOCAL_NAMESPACE}/"
    return "no SelfAlignRuns" + ("" if args.all_namespaces else " in this namespace")


def _one(args: argparse.Namespace) -> tuple[Any, dict[str, Any], bool]:
    """(Run, its object, whether its artifacts were read) of the run the user named."""
    if _on_cluster(args):
        from . import cluster_view

        obj = cluster_view.get_run(_cluster(args), args.run)
        return cluster_view.as_run(obj), obj, False
    from .report import read_run, run_location

    found = read_run(run_location(args.run, path_uri(args.storage)))
    if not found.status and not found.manifests:
        raise UserError(f"no run at {found.uri} (selfalign status lists the runs under {args.storage})")
    return found, _local_object(found.name, found.spec, found.status), True


def _snapshots(args: argparse.Namespace) -> Iterator[tuple[Any, dict[str, Any], bool]]:
    """The run each time it changes, until it has finished (for the spec it was last given)."""
    if _on_cluster(args):
        from . import cluster_view

        changes = ((cluster_view.as_run(o), o, False) for kind, o in
                   cluster_view.watch_runs(_cluster(args), False, args.run) if kind != "DELETED")
    else:
        changes = _polled(lambda: _one(args))
    for snapshot in itertools.chain([_one(args)], changes):
        yield snapshot
        obj = snapshot[1]
        status, generation = obj.get("status") or {}, (obj.get("metadata") or {}).get("generation", 1)
        if status.get("phase") in TERMINAL and status.get("observedGeneration", generation) >= generation:
            return


def _polled(read: Callable[[], Any]) -> Iterator[Any]:
    while True:
        time.sleep(POLL_SECONDS)
        yield read()


def _listings(args: argparse.Namespace) -> Iterator[list[tuple[Any, dict[str, Any]]]]:
    """Every run, again each time one changes (a cluster's watch events; local: polled); until
    Ctrl-C."""
    listed = _list(args)
    yield listed
    if not _on_cluster(args):
        yield from _polled(lambda: _list(args))
        return
    from . import cluster_view

    current = {(o["metadata"].get("namespace"), o["metadata"]["name"]): o for _, o in listed}
    for kind, obj in cluster_view.watch_runs(_cluster(args), args.all_namespaces):
        key = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if kind == "DELETED":
            current.pop(key, None)
        else:
            current[key] = obj
        yield [(cluster_view.row(o, args.all_namespaces), o) for _, o in sorted(current.items())]


def _local_object(name: str, spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """A local run in the shape of a SelfAlignRun, so `-o json|yaml` reads the same everywhere."""
    from .local import LOCAL_NAMESPACE
    from ..naming import GROUP, KIND, VERSION

    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": LOCAL_NAMESPACE}, "spec": spec, "status": status}


def _print(value: Any, output: str, table: Callable[[Any], str], obj: Any) -> None:
    """`table(value)` for people; the object(s) as JSON or YAML for programs."""
    import yaml

    if isinstance(obj, list):
        obj = {"apiVersion": "v1", "kind": "List", "items": obj}
    if output == "json":
        print(json.dumps(obj, indent=2), flush=True)
    elif output == "yaml":
        print(yaml.safe_dump(obj, sort_keys=False) + "---", flush=True)
    else:
        print(table(value), flush=True)


def _stage_of(status: dict[str, Any], round_: int | None, stage: str | None) -> tuple[int, str]:
    """(round index, stage): as asked (rounds counted from 1), else where the run is."""
    from ..spec import STAGES

    index = round_ - 1 if round_ is not None else status.get("round")
    stage = stage or status.get("stage")
    if index is None or stage is None:
        raise UserError("the run has not started a stage yet: give --round and --stage")
    if index < 0 or stage not in STAGES:
        raise UserError(f"--round counts from 1 and --stage is one of {', '.join(STAGES)}")
    return index, stage


def _patch(args: argparse.Namespace, spec: dict[str, Any], done: str) -> int:
    from . import cluster_view
    from ..naming import KIND

    cluster = _cluster(args)
    stored = cluster_view.patch_spec(cluster, args.run, spec).get("spec") or {}
    dropped = [field for field, value in spec.items() if stored.get(field) != value]
    if dropped:  # an API server prunes fields its CRD does not define
        raise UserError(f"{args.run}: the cluster's {KIND} CRD has no spec.{dropped[0]}: the API server dropped it "
                        "(an operator version that has it is needed)")
    print(f"{args.run} (namespace {cluster.namespace}): {done}")
    return 0
