"""Message Batches API emulator: a loopback HTTP server the official ``anthropic`` SDK talks to.

Run: ``cd include && python -m batches_emulator --port 8099 [flags]`` (``make emulator``), or from
Python ``batches_emulator.testing.EmulatorProcess(*flags)``. State lives in SQLite (``--db``,
default ``./.emulator/emulator.sqlite``) and survives restarts. A batch's state is computed from its
timestamps whenever it is looked at; the one thing that runs in the background is the finalisation
of a batch of more than 2,000 requests (its results computed once on a worker thread, so other
clients are never kept waiting; it reads ``in_progress`` until its results are stored).

Endpoints: ``POST/GET /v1/messages/batches``, ``GET/DELETE /v1/messages/batches/{id}``,
``POST .../{id}/cancel``, ``GET .../{id}/results`` (JSONL, seeded shuffle, ``\\n`` line ends),
``POST /v1/messages``, ``POST /v1/messages/count_tokens``, ``GET /v1/models[/{id}]``. Auth by
``x-api-key`` or ``Authorization: Bearer`` with a key given by ``--api-key`` (repeatable, default
``emulator-key``; real-looking ``sk-ant-`` keys are refused); ``anthropic-version`` 2023-06-01 or 2026-10-21.
Unknown query parameters (``beta=true``) are ignored.

Lifecycle. A batch is ``in_progress`` for ``--processing-seconds`` (real seconds); request i
"finishes" at a seeded fraction of that. ``expires_at`` = created + 24 h and ``archived_at`` is set
29 days after creation, both in *emulated* time: emulated = epoch0 + (real - epoch0) * ``--time-scale``
(``--expire-after-seconds N`` = ``--time-scale 86400/N``). Requests unfinished at expiry become
``expired``; after archiving the results download answers 404. Cancel sets ``canceling`` for
``--cancel-seconds``; requests not finished at the cancel time become ``canceled``. Delete is allowed
only once ended (else 400 invalid_request_error). Params are validated when the batch ends
(``errored`` invalid_request_error): stream, max_tokens < 1 or above the model's limit,
temperature/top_p/top_k under 2026-10-21, fast mode, unknown model, prompt over the context window.

Token formula (also used by count_tokens, so the two always agree):
    tokens(text) = ceil(utf8_bytes(text) / 4)
    input = 3 + tokens(canonical JSON of the output schema, if any)
              + sum(tokens(canonical JSON of each tool))
              + system text tokens
              + sum over messages (3 + content tokens)
    content tokens: text -> tokens(text); tool_use -> tokens(name) + tokens(JSON input);
    tool_result -> its content; image/document -> 1000; anything else -> tokens(canonical JSON).
    output = tokens(answer text), or tokens(tool name) + tokens(JSON input) for a tool_use.
Prompt caching: parts are hashed in that order; a part with ``cache_control`` is a breakpoint, and a
top-level ``cache_control`` on the request (automatic caching, messages.create and batch params
alike) adds one on the last content block of the last message. A breakpoint is cacheable when its
running total reaches the model's minimum (``model.CACHE_MIN_TOKENS``, dated: 4,096 for Haiku 4.5
and Opus 4.5/4.6, 1,024 for Sonnet 4.5/4.6, ...; ``--cache-min-tokens [MODEL=]N`` overrides); a
shorter one neither writes nor reads, without an error. The longest prefix readable when the
request started (5 min, or 1 h for ``ttl: "1h"``, emulated time, refreshed by each use) is
``cache_read_input_tokens``, the rest up to the last cacheable breakpoint is
``cache_creation_input_tokens``; input_tokens is the remainder, so
input + cache_creation + cache_read == count_tokens. Batch requests run concurrently: each one runs
for 10 % of ``--processing-seconds`` before it finishes, and an entry is readable only once the
request that wrote it has finished, so the requests that started before the first write completed
write too (as on the real API, where cache hits in a batch are best effort).

Answers are deterministic functions of the prompt: prose text; with
``output_config.format = {"type":"json_schema","schema":...}`` JSON valid against the schema (also the
constraints ``anthropic.transform_schema`` moves into descriptions); with a forced ``tool_choice``
(type tool or any) a ``tool_use`` block valid against ``input_schema`` and stop_reason ``tool_use``;
``max_tokens`` stop with truncated text when the answer does not fit.

Other flags: ``--host`` (127.0.0.1), ``--port``, ``--max-requests`` (100000 per batch),
``--cache-min-tokens [MODEL=]N``, ``--retry-after-ms``, ``--parent-pid`` (exit when that process is gone;
``EmulatorProcess`` passes its own), ``--log-level`` (uvicorn, default warning).

Fault flags (all seeded by ``--seed``, reproducible):
    --error-rate TYPE=RATE        errored results of that error type (repeatable)
    --expired-rate R              requests that never finish: the batch runs to expires_at
    --invalid-output-rate R       structured/tool JSON that violates the schema (batch results and
                                  POST /v1/messages)
    --truncate-rate R             stop_reason max_tokens with cut text (batch results and messages)
    --http-fault EP:STATUS:RATE   HTTP errors per endpoint: create, create_after (created, then the
                                  error), retrieve, list, cancel, delete, results, messages,
                                  count_tokens, models; 429s carry retry-after-ms (--retry-after-ms)
    --early-404-seconds N         retrieve/results 404 for N seconds after create
    --drop-results-after-lines N  first download of each batch is cut after N lines
    --max-body-bytes N            413 request_too_large above N bytes (default 256 MB)
    --max-queued-requests N       429 on create when requests still processing (all batches) would
                                  exceed N (the tier's batch queue limit; default unlimited)
"""
