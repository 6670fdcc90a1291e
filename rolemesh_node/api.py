"""The node's own endpoints (Klein): health, readiness, model list, inventory.

The proxy routes live in :mod:`rolemesh_node.proxy`; the root resource in
:mod:`rolemesh_node.web` sends everything else here. Unknown paths and wrong
methods get OpenAI-style JSON errors, like every other error of the node.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from werkzeug.exceptions import MethodNotAllowed, NotFound

from .errors import set_error
from .metrics import CONTENT_TYPE
from .node import Node
from .proxy import request_id


def _json(request: Any, doc: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(doc).encode()


class NodeAPI:
    app = Klein()

    def __init__(self, node: Node, metrics: Any = None) -> None:
        self.node = node
        self.metrics = metrics

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: Any) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        node = self.node
        return _json(request, {
            "status": "ok",
            "node_id": node.node_id,
            "uptime_s": round(node.uptime_s(), 3),
            "devices": len(node.devices),
            "discovered": node.discovered,
        })

    @app.route("/ready", methods=["GET", "HEAD"])
    def ready(self, request: Any) -> bytes:
        """200 when the node serves, 503 while it starts, stops, or cannot serve."""
        request.setHeader(b"x-request-id", request_id(request))
        serving = self.node.serving()
        return _json(request, serving.to_json(), 200 if serving.ready else 503)

    @app.route("/v1/models", methods=["GET"])
    def models(self, request: Any) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        return _json(request, self.node.models_json())

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    def model(self, request: Any, model_id: str) -> bytes:
        """One model, as OpenAI's ``GET /v1/models/{model}`` (an alias finds its model too)."""
        request.setHeader(b"x-request-id", request_id(request))
        spec = self.node.config.resolve_model(model_id)
        if spec is None:
            return set_error(request, 404, f"The model {model_id[:200]!r} does not exist on this node",
                             "model_not_found")
        return _json(request, self.node.model_json(spec))

    @app.route("/v1/node/inventory", methods=["GET"])
    def inventory(self, request: Any) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        return _json(request, self.node.inventory_json())

    @app.route("/metrics", methods=["GET"])
    def prometheus(self, request: Any) -> bytes:
        if self.metrics is None:
            return set_error(request, 404, "metrics are off on this node", "not_found")
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        return self.metrics.render()

    @app.handle_errors(NotFound)
    def not_found(self, request: Any, failure: Failure) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        path = request.path.decode("utf-8", "replace")[:200]
        return set_error(request, 404, f"no route {path!r} on this node", "not_found")

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: Any, failure: Failure) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        allowed = getattr(failure.value, "valid_methods", None) or []
        method = request.method.decode("latin-1")
        return set_error(request, 405, f"{method} is not allowed on {request.path.decode('utf-8', 'replace')}",
                         "method_not_allowed", headers={"Allow": ", ".join(allowed)})
