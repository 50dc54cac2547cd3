"""The serving engine: one model, one thread, continuous batching, one precision per batch.

Requests wait in arrival order. The engine serves one precision at a time (the model's nested layers are
switched in memory between batches, `runtime.set_precision`; one copy of the int8 codes serves every width):

  * **admission** (every step): waiting requests of the precision being served join the running batch, up to
    `max_batch` rows — their prompts are prefilled together (left-padded) and their KV cache rows are merged into
    the running cache (padded on the left, masked), so a request never waits for a batch to finish;
  * **switching**: when a request of another precision has waited `switch_after_s`, admission stops, the batch
    drains, and the model switches to the precision of the oldest waiting request (FIFO across precisions,
    batched within one);
  * **decode**: one forward of every running row per step on the packed kernels; each row samples with its own
    temperature / top-p / seeded generator (transformers' own warpers, so a seed gives what `bitnest generate`
    gives), stops at EOS, a stop string or `max_tokens`, and leaves the batch (its cache rows are dropped).

Requests that name no precision are served at the policy's current one (policy.py). Events go back to the
caller through `job.emit` (thread-safe): ("delta", text), ("done", info), ("error", message).
"""
from __future__ import annotations

import logging
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .policy import Signals
from .precision import Precision

log = logging.getLogger("bitnest.serve")
TICK_S = 0.05  # how often the policy and the gauges are updated


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    precision: Precision | None = None  # None: the policy's current precision
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # filled in by the engine
    served: Precision | None = None
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    first_token_at: float | None = None


@dataclass(eq=False)
class _Row:
    job: Job
    gen: torch.Generator
    pos: int      # position id of the next input token
    last: int     # the token fed next


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Engine:
    def __init__(self, model, tokenizer, caps, policy, *, max_batch: int = 16, switch_after_s: float = 0.25,
                 cache_slices: bool = False, metrics=None):
        self.model, self.tok, self.caps, self.policy = model, tokenizer, caps, policy
        self.max_batch, self.switch_after_s, self.cache_slices = max_batch, switch_after_s, cache_slices
        self.metrics = metrics
        self.device = next(model.parameters()).device
        import inspect
        # transformers ≥ 5.24 names the KV cache argument `cache` (`past_key_values` is deprecated there)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.serving: Precision = caps.loaded or caps.own
        self.switches: list[dict] = []
        self._waiting: list[Job] = []
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, L) 1 = a real token in the cache
        self._cv = threading.Condition()
        self._running = False
        self._last_tick = float("-inf")
        self._thread: threading.Thread | None = None
        if caps.switchable and caps.loaded is None:  # loaded as a per-layer mix: start from one width
            self._switch(caps.own, initial=True)

    # ------------------------------------------------------------------ outside the engine thread
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="bitnest-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cv:
            self._waiting.append(job)
            self._cv.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + len(self._rows)

    # ------------------------------------------------------------------ the engine thread
    def _resolve(self, job: Job) -> Precision:
        return job.precision if job.precision is not None else self.policy.current

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                if not self._running and not self._rows and not self._waiting:
                    return
                if not self._rows and not self._waiting:
                    self._cv.wait(0.05)
                self._waiting = [j for j in self._waiting if not j.cancelled]
            try:
                self._tick()
                self._step()
            except Exception as e:  # noqa: BLE001 — a failed batch fails its requests, not the server
                log.exception("bitnest serve: a batch failed")
                for r in self._rows:
                    r.job.emit(("error", f"{type(e).__name__}: {e}"))
                self._rows, self._cache, self._mask = [], None, None

    def _tick(self) -> None:
        """Policy and gauges, at most every TICK_S (hold times are seconds: no /proc read per decode step)."""
        now = time.monotonic()
        if now - self._last_tick < TICK_S:
            return
        self._last_tick = now
        sig = Signals(queue=self.queue_depth, ttft_p90_ms=self.policy.ttft_p90_ms(now), rss_bytes=rss_bytes())
        self.policy.tick(sig, now)
        if self.metrics is not None:
            self.metrics.gauges(self, sig)

    def _step(self) -> None:
        now = time.monotonic()
        with self._cv:
            waiting = list(self._waiting)
        if not self._rows and waiting:
            target = self._resolve(waiting[0])  # the oldest request picks the next precision
            if target != self.serving:
                self._switch(target)
        admit = []
        if waiting and len(self._rows) < self.max_batch:
            stale_other = any(self._resolve(j) != self.serving and now - j.arrived > self.switch_after_s for j in waiting)
            if not stale_other or not self._rows:
                admit = [j for j in waiting if self._resolve(j) == self.serving][: self.max_batch - len(self._rows)]
        if admit:
            with self._cv:
                ids = {id(j) for j in admit}
                self._waiting = [j for j in self._waiting if id(j) not in ids]
            self._prefill(admit)
        if self._rows:
            self._decode()

    def _switch(self, p: Precision, initial: bool = False) -> None:
        if not self.caps.switchable:
            return
        t0 = time.perf_counter()
        self.model.set_precision(self.caps.mix(p), cache=self.cache_slices)
        dt = time.perf_counter() - t0
        ev = {"time": time.time(), "from": self.serving.label, "to": p.label, "seconds": dt}
        if not initial:
            self.switches.append(ev)
            del self.switches[:-1000]  # bounded: the latest 1000 (all are counted in /metrics)
            log.info("bitnest serve: switched %s → %s in %.3f s", ev["from"], ev["to"], dt)
            if self.metrics is not None:
                self.metrics.switch(ev)
        self.serving = p

    def step_seconds(self, p: Precision, batch: int, steps: int = 5, prompt: int = 8) -> float:
        """Median seconds of one decode step of `batch` rows at precision p (after a `prompt`-token prefill):
        what a rung of the adaptive ladder costs under load. Call before start(); leaves p switched in."""
        from transformers import DynamicCache
        self._switch(p, initial=True)
        V = self.model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        x = torch.randint(V, (batch, prompt), generator=g)                      # (B, P)
        mask = torch.ones(batch, prompt, dtype=torch.long)                     # (B, P)
        pos = torch.arange(prompt).expand(batch, prompt)                       # (B, P)
        cache = DynamicCache()
        with torch.no_grad():
            self._forward(x, mask, pos, cache)
            ts = []
            for t in range(steps + 1):  # the first step warms up (first-use work of the kernels)
                mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], 1)  # (B, L + 1)
                t0 = time.perf_counter()
                self._forward(x[:, :1], mask, torch.full((batch, 1), prompt + t), cache)
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts[1:])

    def _forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache):
        out = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :].float()  # (B, V)

    def _prefill(self, jobs: list[Job]) -> None:
        from transformers import DynamicCache
        P = max(len(j.prompt_ids) for j in jobs)
        x = torch.zeros(len(jobs), P, dtype=torch.long)      # (n, P) left-padded
        mask = torch.zeros(len(jobs), P, dtype=torch.long)   # (n, P)
        for i, j in enumerate(jobs):
            x[i, P - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[i, P - len(j.prompt_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)             # (n, P) per-row positions
        cache = DynamicCache()
        logits = self._forward(x, mask, pos, cache)          # (n, V)
        rows = []
        for i, j in enumerate(jobs):
            j.served = self.serving
            seed = j.seed if j.seed is not None else random.randrange(2**63)
            rows.append(_Row(j, torch.Generator().manual_seed(seed), len(j.prompt_ids), 0))
        self._merge(rows, cache, mask)
        self._advance(rows, logits)

    def _merge(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        """Append new rows (their cache and mask) to the running batch, left-padding the shorter side."""
        if self._cache is None:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        La, Lb = self._mask.shape[1], mask.shape[1]
        L = max(La, Lb)
        for la, lb in zip(self._cache.layers, cache.layers):
            for attr in ("keys", "values"):
                a, b = getattr(la, attr), getattr(lb, attr)  # (B, H, La, D), (n, H, Lb, D)
                a = torch.nn.functional.pad(a, (0, 0, L - La, 0))
                b = torch.nn.functional.pad(b, (0, 0, L - Lb, 0))
                setattr(la, attr, torch.cat([a, b], 0))      # (B + n, H, L, D)
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (L - La, 0)),
                                torch.nn.functional.pad(mask, (L - Lb, 0))], 0)  # (B + n, L)
        self._rows = self._rows + rows

    def _decode(self) -> None:
        x = torch.tensor([[r.last] for r in self._rows])                   # (B, 1)
        self._mask = torch.cat([self._mask, torch.ones(len(self._rows), 1, dtype=torch.long)], 1)  # (B, L + 1)
        pos = torch.tensor([[r.pos] for r in self._rows])                   # (B, 1)
        logits = self._forward(x, self._mask, pos, self._cache)            # (B, V)
        for r in self._rows:
            r.pos += 1
        self._advance(self._rows, logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each row's next token, stream its text, and drop rows that finished."""
        now = time.monotonic()
        keep = []
        for i, r in enumerate(rows):
            j = r.job
            if j.cancelled:  # the client went away: stop spending compute on it
                if self.metrics is not None:
                    self.metrics.done(j, "cancelled")
                continue
            tok = self._sample(r, logits[i:i + 1])
            if j.first_token_at is None:
                j.first_token_at = now
                self.policy.observe_ttft(now - j.arrived, now)
                if self.metrics is not None:
                    self.metrics.first_token(j, now - j.arrived)
            finish = None
            if self.eos is not None and tok == self.eos:
                finish = "stop"
            else:
                j.ids.append(tok)
                finish = self._emit_text(j)
                if finish is None and len(j.ids) >= j.max_tokens:
                    finish = "length"
            if finish is not None:
                if finish == "length" or tok == self.eos:
                    self._emit_text(j, final=True)
                j.emit(("done", {"finish_reason": finish, "prompt_tokens": len(j.prompt_ids),
                                 "completion_tokens": len(j.ids), "precision": j.served.label,
                                 "ttft_s": j.first_token_at - j.arrived, "seconds": time.monotonic() - j.arrived}))
                if self.metrics is not None:
                    self.metrics.done(j, finish)
                continue
            r.last = tok
            keep.append(r)
        done = {id(r) for r in rows} - {id(r) for r in keep}
        self._drop([r for r in self._rows if id(r) not in done])

    def _drop(self, keep: list[_Row]) -> None:
        """Keep these rows of the running batch (their cache rows), trimming columns that are padding for all."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        ids = {id(r) for r in keep}
        idx = torch.tensor([i for i, r in enumerate(self._rows) if id(r) in ids])
        self._cache.batch_select_indices(idx.to(self.device))
        self._mask = self._mask[idx]
        k = int((self._mask.cumsum(1) == 0).sum(1).min())  # leading columns that no row uses
        if k:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., k:, :], layer.values[..., k:, :]
            self._mask = self._mask[:, k:]
        self._rows = [r for r in self._rows if id(r) in ids]

    def _sample(self, r: _Row, logits: torch.Tensor) -> int:
        """logits (1, V) float32 → a token: greedy at temperature 0, else transformers' temperature and top-p
        warpers and one multinomial draw from the row's own generator (as `generate` does with a seed)."""
        j = r.job
        if j.temperature == 0:
            return int(logits.argmax(-1))
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
        scores = TemperatureLogitsWarper(j.temperature)(None, logits)
        if j.top_p < 1.0:
            scores = TopPLogitsWarper(j.top_p)(None, scores)
        probs = torch.softmax(scores, dim=-1)  # (1, V)
        return int(torch.multinomial(probs, 1, generator=r.gen))

    def _emit_text(self, j: Job, final: bool = False) -> str | None:
        """Send the new text of `j`; hold back what could still become a stop string or an incomplete
        UTF-8 sequence. Returns "stop" when a stop string appeared (the text is cut before it)."""
        text = self.tok.decode(j.ids, skip_special_tokens=True)
        for s in j.stop:
            at = text.find(s, max(0, j.sent - len(s) + 1))
            if at != -1:
                if at > j.sent:
                    j.emit(("delta", text[j.sent:at]))
                j.sent = at
                return "stop"
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                return None
            hold = max((len(s) - 1 for s in j.stop), default=0)
            end = max(j.sent, len(text) - hold)
        if end > j.sent:
            j.emit(("delta", text[j.sent:end]))
            j.sent = end
        return None
