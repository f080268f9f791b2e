"""Manage model packages: list installed and downloadable models, show one, import, download, verify, delete.

    mim3d models list [--catalog Models.json]
    mim3d models info ID
    mim3d models import PATH.zip|FOLDER [--id ID]
    mim3d models download ID [--catalog FILE]
    mim3d models verify [ID ...]
    mim3d models delete ID

Models live in $MIM3D_HOME/models (default ~/.mim3d/models). Every answer is a "result" event on stdout; a download
reports "download" and "verify" progress, and stops on SIGTERM keeping the partial file, which the next download
of the same model resumes.
"""

from __future__ import annotations

import argparse
import logging

from . import registry
from .errors import BadInputError
from .protocol import Emitter
from .training.run_writer import StopController

log = logging.getLogger("mim3d.models")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="installed models and the catalog's downloadable ones")
    listing.add_argument("--catalog", default=str(registry.DEFAULT_CATALOG), help="catalog file (Models.json)")
    actions.add_parser("info", help="label table, provenance and settings of an installed model").add_argument("id")
    imports = actions.add_parser("import", help="install a package folder or .zip")
    imports.add_argument("path")
    imports.add_argument("--id", help="install under this id (default: the package's name)")
    download = actions.add_parser("download", help="download, verify and install a catalog model")
    download.add_argument("id")
    download.add_argument("--catalog", default=str(registry.DEFAULT_CATALOG), help="catalog file (Models.json)")
    verify = actions.add_parser("verify", help="check installed models' weights against model.json")
    verify.add_argument("ids", nargs="*", metavar="ID", help="default: every installed model")
    actions.add_parser("delete", help="remove an installed model").add_argument("id")


def run(args: argparse.Namespace, emitter: Emitter) -> None:
    home = registry.models_home()
    if args.action == "list":
        installed = [_installed_summary(m) for m in registry.list_installed(home)]
        ids = {m["id"]: m.get("version") for m in installed}
        available = [{"id": e.id, "name": e.name, "version": e.version, "size": e.size, "licence": e.licence,
                      "description": e.description, "expected": e.expected, **e.extra,
                      "installed": ids.get(e.id) == e.version} for e in registry.list_available(args.catalog)]
        for m in installed:
            log.info("installed %-24s %s", m["id"], m.get("problem") or f"{m['name']} {m['version']}")
        emitter.result(home=str(home), catalog=args.catalog, installed=installed, available=available)
    elif args.action == "info":
        emitter.result(**registry.info(args.id, home))
    elif args.action == "import":
        path = registry.import_package(args.path, args.id, home)
        emitter.result(id=path.name, path=str(path))
    elif args.action == "download":
        entry = registry.catalog_entry(args.id, args.catalog)
        stop = StopController(None)
        try:
            path = registry.download(entry, emitter.progress, stop.requested, home)
        finally:
            stop.close()
        emitter.result(id=entry.id, version=entry.version, path=str(path))
    elif args.action == "verify":
        _verify(args.ids or [m.id for m in registry.list_installed(home)], home, emitter)
    elif args.action == "delete":
        registry.delete(args.id, home)
        emitter.result(id=args.id, deleted=True)


def _installed_summary(model: registry.InstalledModel) -> dict:
    if model.info is None:
        return {"id": model.id, "path": str(model.path), "problem": model.problem}
    return {"id": model.id, "path": str(model.path), "name": model.info.name, "version": model.info.version,
            "description": model.info.description, "labels": list(model.info.labels.names)}


def _verify(ids: list[str], home, emitter: Emitter) -> None:
    """Check every id; the result lists them all, or a bad-input error names every one that failed."""
    results = {}
    for model_id in ids:
        try:
            registry.verify(model_id, home)
            results[model_id] = "ok"
        except BadInputError as e:
            results[model_id] = str(e)
    failed = [i for i, r in results.items() if r != "ok"]
    if failed:
        raise BadInputError(f"{len(failed)} of {len(ids)} model(s) failed verification: "
                            + "; ".join(results[i] for i in failed))
    emitter.result(verified=results)

