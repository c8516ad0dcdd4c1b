"""The demo worker: a real HTTP model server with a fake model, for trying hive anywhere.

``python -m hive.demo_worker --port P --model M`` serves the routes an SGLang server serves, with
the same shapes, so that hive, an sglang-router and any OpenAI client can drive it exactly as they
drive a real model server, on a laptop or in CI, with no GPU and no weights:

* ``GET /health`` and ``/health_generate``: 503 ``{"status": "loading"}`` while the fake model
  "loads" (``--load-seconds``; the port already listens meanwhile), then 200 ``{"status": "ok"}``.
* ``GET /get_model_info`` (``/model_info``) and ``GET /get_server_info`` (``/server_info``): what
  a router reads when a worker joins. The server info also tells where the worker runs: its pid,
  its CPU affinity, the allowed CPUs of each of its threads, ``CUDA_VISIBLE_DEVICES`` and the
  ``HIVE_WORKER_ID`` hive gave it, so that placement and pinning can be checked from outside.
* ``GET /v1/models``, ``POST /generate`` (SGLang native), ``POST /v1/completions`` and
  ``POST /v1/chat/completions`` (OpenAI, ``"stream": true`` as Server-Sent Events). The text is
  deterministic: it names the worker (``[<worker id>@<port>] <model> says: ``) and goes on with
  words derived from the prompt, one word per token, up to the request's token limit (16 unless
  the request says otherwise). ``--latency-ms`` makes each generation take that long.
* ``GET /get_load`` (requests and tokens in flight, as a router's power-of-two policy reads
  them) and ``POST /flush_cache`` (a no-op), so that a router's fan-outs succeed too.

When hive started it (``HIVE_URL``, ``HIVE_WORKER_ID`` and ``HIVE_WORKER_TOKEN`` are set), it
heartbeats ``{"state": "ready"|"busy", "in_flight": n}`` to
``{HIVE_URL}/v1/workers/{HIVE_WORKER_ID}/heartbeat`` once loaded, every
``HIVE_HEARTBEAT_INTERVAL`` seconds and at once whenever it turns busy or ready again.
``HIVE_URL`` may be ``http://host:port`` or ``unix:///path/to/hive.sock``; ``--no-heartbeat``
turns heartbeats off. Once loaded it prints one line ``ready_at=<unix time> port=<P>`` to stdout.

SIGTERM or SIGINT stops it cleanly (exit code 0). ``--fail-after S`` simulates a crash: after S
seconds it prints ``demo worker: simulated failure after S s`` to stderr and exits with code 3.

It imports only the standard library and aiohttp, so it starts in a fraction of a second.

The package, one concern a module:

* ``server``: ``DemoWorker``, the state every route reads (loaded, in flight), its life (listen,
  load, signals, ``--fail-after``) and the health and info routes; ``Options``.
* ``sglang`` and ``openai``: the routes of each protocol (generation; SGLang's load and cache).
* ``heartbeat``: where heartbeats go, from hive's environment, and the loop that sends them.
* ``model``: the fake model, deterministic words from the prompt.
* ``http``: what both route families share: ``BadRequest``, errors as JSON, SSE.
* ``affinity``: the CPUs the process and its threads may run on, for ``/get_server_info``.
* ``output``: one flushed line to stdout or stderr, aiohttp's logs as one line.
* ``cli``: the command line, ``main``; ``__main__`` runs it.
"""

from hive.demo_worker.cli import main

__all__ = ["main"]
