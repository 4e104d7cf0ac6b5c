"""Validate rendered Kubernetes manifests strictly, failing on kinds we have no schema for.

Runs with the tools venv's python (it imports kubernetes_validate):

    .venv-tools/bin/python deploy/tools/validate_manifests.py -k 1.30 -k 1.37 rendered.yaml ...

Why not the `kubernetes-validate` CLI: it only *warns* about kinds it has no schema for and
exits 0, so a typo in a CRD kind or an unshipped CRD would pass. Here:

- built-in kinds are validated by kubernetes_validate.validate(strict=True) (unknown fields
  fail) for every requested Kubernetes version;
- custom kinds are validated against the JSON schemas shipped in deploy/schemas/
  (`<kind>-<group's first label>-<version>.json`, the naming kubernetes-validate uses);
- any other kind is a failure.

Prints one JSON object per (document, version) on stdout and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

DEFAULT_SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def schema_file_name(api_version: str, kind: str) -> str:
    # monitoring.coreos.com/v1 -> monitoring-v1 (same rule as kubernetes_validate)
    short = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return f"{kind.lower()}-{short}.json"


def validate_doc(doc: dict[str, Any], version: str, schemas: Path) -> tuple[bool, str, str]:
    """Returns (ok, source of the schema, message)."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        return True, "kubernetes-validate", ""
    except SchemaNotFoundError:
        pass
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return False, "kubernetes-validate", f"{path}: {e.message}"
    crd_schema = schemas / schema_file_name(doc["apiVersion"], doc["kind"])
    if not crd_schema.is_file():
        return (
            False,
            "none",
            (
                f"no schema for {doc['apiVersion']} {doc['kind']}: neither a built-in kind of "
                f"Kubernetes {version} nor a CRD schema at {crd_schema}"
            ),
        )
    schema = json.loads(crd_schema.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = list(validator.iter_errors(doc))
    if errors:
        # best_match descends into anyOf/oneOf to the most specific error.
        best = jsonschema.exceptions.best_match(errors)
        path = ".".join(str(p) for p in best.absolute_path)
        return False, crd_schema.name, f"{path}: {best.message}"[:500]
    return True, crd_schema.name, ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument(
        "-k",
        "--kubernetes-version",
        action="append",
        dest="versions",
        help="repeatable; default 1.30 and the newest the package ships",
    )
    ap.add_argument("--schemas", type=Path, default=DEFAULT_SCHEMAS)
    args = ap.parse_args(argv)
    versions = args.versions or ["1.30", kubernetes_validate.utils.latest_version()]
    failed = 0
    for name in args.files:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            for version in versions:
                ok, source, msg = validate_doc(doc, version, args.schemas)
                failed += not ok
                print(
                    json.dumps(
                        {
                            "file": name,
                            "kind": doc.get("kind"),
                            "apiVersion": doc.get("apiVersion"),
                            "name": (doc.get("metadata") or {}).get("name"),
                            "version": version,
                            "ok": ok,
                            "schema": source,
                            "message": msg,
                        }
                    )
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
