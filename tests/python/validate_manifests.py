"""Validates rendered Kubernetes manifests offline.

Built-in kinds are checked with kubernetes-validate (the OpenAPI schemas of the Kubernetes release,
strict: unknown fields are errors). The Prometheus Operator kinds are not in those schemas: they are
checked against the parts of their CRD schemas (monitoring.coreos.com/v1) the manifests use, with
unknown fields refused at every level written here.

Usage: validate_manifests.py KUBERNETES_VERSION RENDERED.yaml
Prints one JSON object: {"resources": ["Kind/name", ...], "errors": ["...", ...]}.
"""

import json
import sys

import jsonschema
import kubernetes_validate
import yaml

STRING = {"type": "string"}
STRING_MAP = {"type": "object", "additionalProperties": STRING}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": STRING,
        "namespace": STRING,
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": STRING_MAP,
        "matchExpressions": {"type": "array"},
    },
    "additionalProperties": False,
}
RELABEL_CONFIG = {
    "type": "object",
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "separator": STRING,
        "targetLabel": STRING,
        "regex": STRING,
        "modulus": {"type": "integer"},
        "replacement": STRING,
        "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                            "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                            "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                            "dropequal", "DropEqual"]},
    },
    "additionalProperties": False,
}


def custom_resource(spec):
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": STRING,
            "metadata": METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


CRD_SCHEMAS = {
    "ServiceMonitor": custom_resource({
        "type": "object",
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": {"type": "object"},
            "jobLabel": STRING,
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "port": STRING,
                        "targetPort": {"type": ["string", "integer"]},
                        "path": STRING,
                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "honorLabels": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": RELABEL_CONFIG},
                        "metricRelabelings": {"type": "array", "items": RELABEL_CONFIG},
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    }),
    "PodMonitor": custom_resource({"type": "object"}),
    "PrometheusRule": custom_resource({
        "type": "object",
        "required": ["groups"],
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": DURATION,
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["expr"],
                                "properties": {
                                    "alert": STRING,
                                    "record": STRING,
                                    "expr": {"type": ["string", "integer"]},
                                    "for": DURATION,
                                    "keep_firing_for": DURATION,
                                    "labels": STRING_MAP,
                                    "annotations": STRING_MAP,
                                },
                                "additionalProperties": False,
                            },
                        },
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    }),
}


def main():
    version, path = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        documents = [d for d in yaml.safe_load_all(f) if d]
    resources, errors = [], []
    for document in documents:
        kind = document.get("kind", "<no kind>")
        name = document.get("metadata", {}).get("name", "<no name>")
        resources.append(f"{kind}/{name}")
        try:
            if document.get("apiVersion") == "monitoring.coreos.com/v1":
                schema = CRD_SCHEMAS.get(kind)
                if schema is None:
                    errors.append(f"{kind}/{name}: no schema for this Prometheus Operator kind")
                    continue
                jsonschema.validate(document, schema)
            else:
                kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{kind}/{name}: {e.message} at {'/'.join(str(p) for p in e.path)}")
        except jsonschema.ValidationError as e:
            errors.append(f"{kind}/{name}: {e.message} at {'/'.join(str(p) for p in e.path)}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{kind}/{name}: {e}")
        except kubernetes_validate.InvalidSchemaError as e:
            errors.append(f"{kind}/{name}: {e}")
    print(json.dumps({"resources": resources, "errors": errors}))


if __name__ == "__main__":
    main()
