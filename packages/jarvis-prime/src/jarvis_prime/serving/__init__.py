"""The serving kit: `prime serve`, an OpenAI-compatible HTTP server for PRIME models
(FastAPI + uvicorn), and the parts `jarvis serve` reuses (model host, key rule, errors).

    prime serve prime-135m-chat-v1 [--quant 4bit] [--host 127.0.0.1] [--port 8001] [--api-key KEY]
                [--admin-key KEY] [--allow-model-paths]

Routes: POST /v1/chat/completions (JSON or SSE stream ending in `data: [DONE]`),
POST /v1/completions, GET /v1/models, GET /health (ready only once a model is
loaded; no auth), GET /metrics (Prometheus text), POST /admin/models (hot-swap: the
admin key only, off without one).

How requests run: generation runs in a thread pool, so the event loop never blocks.
On the transformers backend, concurrent requests are decoded together (up to
`max_batch` per batch, models/batching.py: whatever is waiting when a batch starts
joins it). On llama.cpp they run one at a time in arrival order: llama-cpp-python's
high-level API decodes one sequence per context (continuous batching needs llama.cpp's
own server or vLLM). Requests admitted beyond those generating wait in a bounded
queue; when it is full the answer is 429 with Retry-After. /metrics has the batch
sizes (prime_batch_size).

Hot-swap: POST /admin/models loads the new model in the background while the old one
keeps serving; then new requests go to the new model, requests already running
finish on the old one, and the old one is closed when the last of them is done.
With `--served-model-name` clients keep one name across swaps; every response's
`system_fingerprint` says which model and version answered. `swap.SwapGate` decides
what a swap may load (catalog or store names; paths only with --allow-model-paths)
and lets one load run at a time (409 otherwise); `jarvis serve` uses the same gate.

The OpenAI API clients send (issue #23): `tools` / `tool_choice` (calls in messages
and stream deltas; forced calls under a grammar), `response_format` json_object and
json_schema (grammar-constrained), `logprobs` / `top_logprobs`, `n`, presence and
frequency penalties, `seed`; a prompt over the context is a 400 naming the numbers, or
with this server's `truncate: true` loses its oldest turns. See the package README.

Errors are OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}});
anything wrong with a request is a 4xx that names the field.

Modules, by job (as llama_cpp.server): `settings` (ServerConfig, API key rule),
`types` (request bodies), `errors` (APIError, the handlers, the error shapes), `host`
(the served model and hot-swap), `swap` (what a swap may load, one at a time), `middleware` (Guard, Metrics), `formatters` (the
JSON of each response kind), `completions` (admission, answering, streaming), `app`
(create_app: the routes; serve).
"""
