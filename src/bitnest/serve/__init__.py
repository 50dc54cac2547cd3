"""`bitnest serve`: an OpenAI-compatible server where one Matryoshka checkpoint serves every precision.

    bitnest serve --model runs/mq [--port 8000] [--policy fixed|adaptive] [--api-key KEY]

    curl localhost:8000/v1/completions -d '{"prompt": "Once upon a time", "max_tokens": 32, "precision": "int2"}'
    curl localhost:8000/v1/completions -d '{"model": "mq@int4", "prompt": "Once upon a time"}'

One copy of the c-bit codes is in memory; the engine switches the nested layers between batches (engine.py),
so int8, int4, int2 and Mix'n'Match budgets are served side by side, each request at the precision it asks for
(`precision` field or a `NAME@int4` model id) or, when it names none, at the policy's (policy.py: `fixed`, or
`adaptive` — lower under queue / latency / memory pressure, higher when there is room). Every response says
which precision served it. /metrics is Prometheus text; /v1/precision shows the policy and every change.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import BitnestError


def make_server(model_path: str, *, policy: str = "fixed", precision=None, ladder: str | None = None,
                api_key: str | None = None, slo_ms: float | None = None, max_queue: int = 8,
                max_memory_mb: float | None = None, max_batch: int = 16, budgets: tuple[float, ...] = (),
                cache_slices: bool = False, dtype=None, name: str | None = None, allow_pickle: bool = False,
                switch_after_s: float = 0.25, up_hold_s: float = 5.0, down_hold_s: float = 1.0):
    """Load the model and build the server (not started): returns `app.Server`; `app.build_app(server)` is the
    ASGI app."""
    import torch

    from ..models.hf import load_model
    from .app import Server
    from .engine import Engine
    from .metrics import Metrics
    from .policy import Adaptive, Fixed, measured_ladder
    from .precision import Capabilities, parse

    if policy not in ("fixed", "adaptive"):
        raise BitnestError(f"--policy must be fixed or adaptive, got {policy!r}")
    loaded = load_model(model_path, dtype=dtype or torch.bfloat16, allow_pickle=allow_pickle)
    if loaded.tokenizer is None:
        raise BitnestError(f"{loaded.source} has no tokenizer: serving needs one (tokenizer.json or tokenizer.bin)")
    model = loaded.model.eval()
    qc = loaded.quantization_config or {}
    if qc.get("method") in ("onebit", "bitnet"):
        own_label = qc["method"]
    elif len(served := {lc.get("serve_bits", lc.get("bits")) for lc in (qc.get("modules") or {}).values()}) == 1 \
            and None not in served:  # what the layers serve (the recorded recipe may disagree: bitnest info says so)
        own_label = f"int{served.pop()}"
    elif qc.get("config", {}).get("bits"):
        own_label = f"int{qc['config']['bits']}"
    else:  # a full-precision model: its dtype
        own_label = str(next(model.parameters()).dtype).replace("torch.", "").replace("bfloat", "bf").replace("float", "fp")
    caps = Capabilities(model, own_label)

    def checked(v):
        try:
            return caps.check(parse(v))
        except ValueError as e:
            raise BitnestError(str(e)) from None

    for b in budgets:
        caps.check(parse(f"mix-{b}"))
    if policy == "adaptive":
        if not caps.switchable:
            raise BitnestError("--policy adaptive needs a Matryoshka checkpoint (sliced or matquant): this one serves "
                               f"only {caps.own.label}")
        auto = ladder in (None, "auto")
        steps = [str(b) for b in (caps.parent, 4, 3, 2) if b <= caps.parent] if auto else ladder.split(",")
        rungs = list(dict.fromkeys(checked(s.strip()) for s in steps))
        pol = Adaptive(rungs, max_queue=max_queue, slo_ms=slo_ms,
                       max_memory=int(max_memory_mb * 2**20) if max_memory_mb else None,
                       up_hold_s=up_hold_s, down_hold_s=down_hold_s)
    else:
        pol = Fixed(checked(precision) if precision is not None else (caps.loaded or caps.own))
    engine = Engine(model, loaded.tokenizer, caps, pol, max_batch=max_batch, cache_slices=cache_slices,
                    metrics=Metrics(), switch_after_s=switch_after_s)
    if policy == "adaptive" and auto:
        batch = max(1, max_batch // 2)
        secs = {p.label: engine.step_seconds(p, batch) for p in pol.ladder}
        pol.step_ms = {k: round(v * 1e3, 2) for k, v in secs.items()}
        pol.ladder = measured_ladder(pol.ladder, secs)
        engine._switch(pol.ladder[0], initial=True)
        logging.getLogger("bitnest.serve").warning(
            "bitnest serve: adaptive ladder %s (decode step at batch %d: %s)", " → ".join(p.label for p in pol.ladder),
            batch, ", ".join(f"{k} {v:.0f} ms" for k, v in pol.step_ms.items()))
    name = name or Path(loaded.source).name.removesuffix(".bin")
    return Server(engine, name, api_key=api_key, budgets=tuple(budgets))


def run(server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM; on either, stop accepting, finish the requests in flight, then return."""
    import uvicorn

    from .app import build_app

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = uvicorn.Config(build_app(server), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=float(os.environ.get("BITNEST_SHUTDOWN_TIMEOUT", 300)))
    uv = _uvicorn_server()(config)
    eng = server.engine
    widths = ", ".join(p.label for p in eng.caps.listed(server.budgets))
    logging.getLogger("bitnest.serve").warning(
        "bitnest serve: http://%s:%d/v1  model %s (serves %s; policy %s at %s)%s", host, port, server.name, widths,
        eng.policy.name, eng.policy.current.label, "" if server.api_key else "")
    uv.run()
    logging.getLogger("bitnest.serve").warning("bitnest serve: stopped after finishing the requests in flight")


def _uvicorn_server():
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn's own version re-raises SIGTERM after its graceful shutdown, so the process dies of the signal;
            a server that drained cleanly on request exits 0 instead (what supervisors and `docker stop` expect)."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server
