"""OpenAI-compatible HTTP API (`/v1/completions`, `/v1/chat/completions`, `/v1/models`) over the same
engine as gRPC. Needs the `[http]` extra (FastAPI and uvicorn); nothing here is imported otherwise.

schemas.py   request bodies (pydantic, unknown fields refused) and response shapes
errors.py    OpenAI's error shape; ServeError -> HTTP status, in one place
service.py   OpenAIService: the protocol logic (no web framework), shared by `serve` and Ray Serve
app.py       the FastAPI app: routes, bearer auth, error handlers, SSE streaming
server.py    HttpServer: uvicorn inside the server's event loop, bound before the model loads
"""
