"""The endpoint's HTTP surface, without Ray: one FastAPI app per model that speaks three
protocols over it.

- core.py: the model behind the routes (Backend, Service), errors, limits, auth, body reading,
  the one table of outputs, the Route record;
- native.py: clfsys's own JSON routes (/predict, /predict/batch, /metadata, /healthz);
- v2.py: the Open Inference Protocol (KServe V2);
- tfserving.py: TF Serving's REST API;
- asgi.py: NameRouter (root routing by model name), call_asgi, MetricsMiddleware;
- app.py: build_api, which registers the three.

The default model's prefix is the server root. Every 4xx is `{"error": "..."}`, which is also the
error shape of both standard protocols. `build_api(backend, ...)` takes any `Backend`: the Serve
replica in clfsys.serve, or `DirectBackend` (a Predictor in this process).
"""

from clfsys.http.app import build_api
from clfsys.http.asgi import Forwarded, MetricsMiddleware, NameRouter, call_asgi
from clfsys.http.core import Backend, DirectBackend, HttpError, Limits, token_digest

__all__ = ["Backend", "DirectBackend", "Forwarded", "HttpError", "Limits", "MetricsMiddleware",
           "NameRouter", "build_api", "call_asgi", "token_digest"]
