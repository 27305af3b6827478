"""Regenerate the strict KubeRay manifest schemas in this folder from KubeRay's CRDs.

    python tests/vendor/kuberay/convert.py PATH/TO/ray-operator/config/crd/bases

A CRD's `openAPIV3Schema` accepts any key the API server would prune, so a typo such as
`maxReplica` passes it silently. No Kubernetes API server runs in the tests, so this makes
the schema strict instead, and the tests validate manifests against it with `jsonschema`:

- the storage version's `openAPIV3Schema` is taken (the one the API server keeps);
- `additionalProperties: false` wherever `properties` are listed, unless the node carries
  `x-kubernetes-preserve-unknown-fields` or already says what extra keys may be;
- `x-kubernetes-int-or-string` becomes `anyOf: [integer, string]` where it is not already;
- `apiVersion` and `kind` must be the CRD's group/version and kind, and a manifest must
  have `apiVersion`, `kind`, `metadata` and `spec`.

CEL rules (`x-kubernetes-validations`) stay unchecked: only an API server evaluates them.
The output is compact JSON with sorted keys, so regenerating it is byte-for-byte stable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

CRDS = ("rayclusters", "rayjobs")  # what cluster/kuberay/ uses; rayservices: none of ours


def schema_name(plural: str) -> str:
    """The file a CRD's strict schema is written to."""
    return f"ray.io_{plural}.schema.json"


def _strict(node: Any) -> Any:
    """A copy of `node` with unknown keys forbidden and int-or-string spelled out."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def strict_schema(crd: dict[str, Any]) -> dict[str, Any]:
    """The storage version's manifest schema of a CustomResourceDefinition, made strict."""
    spec = crd["spec"]
    (version,) = [v for v in spec["versions"] if v.get("storage")]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    props = schema["properties"]
    props["apiVersion"] = {"type": "string", "enum": [f"{spec['group']}/{version['name']}"]}
    props["kind"] = {"type": "string", "enum": [spec["names"]["kind"]]}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


def dumps(schema: dict[str, Any]) -> str:
    """The committed form: compact, sorted, one trailing newline."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n"


def load_crd(path: Path) -> dict[str, Any]:
    """A CRD YAML file (the C loader where PyYAML has it: 10x faster on these 1 MB files)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader)


def convert(crd_dir: Path, out_dir: Path) -> list[Path]:
    """Write each CRD's strict schema into `out_dir`; the paths written."""
    written = []
    for plural in CRDS:
        crd = load_crd(crd_dir / f"ray.io_{plural}.yaml")
        path = out_dir / schema_name(plural)
        path.write_text(dumps(strict_schema(crd)))
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(argv[1]) if len(argv) == 2 else Path(__file__).parent
    for path in convert(Path(argv[0]), out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
