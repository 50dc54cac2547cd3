"""/metrics in Prometheus text format (prometheus_client, one registry per server)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("bitnest_requests", "Finished requests", ["precision", "finish_reason"], registry=r)
        self.rejected = Counter("bitnest_rejected_requests", "Requests answered with an error status", ["status"], registry=r)
        self.prompt_tokens = Counter("bitnest_prompt_tokens", "Prompt tokens of finished requests", ["precision"], registry=r)
        self.completion_tokens = Counter("bitnest_completion_tokens", "Generated tokens", ["precision"], registry=r)
        self.latency = Histogram("bitnest_request_latency_seconds", "Arrival to last token", ["precision"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("bitnest_time_to_first_token_seconds", "Arrival to first token (queueing included)",
                              ["precision"], buckets=LATENCY_BUCKETS, registry=r)
        self.precision_bits = Gauge("bitnest_precision_bits", "Bits per weight of the precision being served now", registry=r)
        self.policy_bits = Gauge("bitnest_policy_precision_bits", "Bits per weight the policy gives requests that name none", registry=r)
        self.queue = Gauge("bitnest_queue_depth", "Requests waiting", registry=r)
        self.running = Gauge("bitnest_running_requests", "Requests in the running batch", registry=r)
        self.rss = Gauge("bitnest_resident_memory_bytes", "Process resident memory", registry=r)
        self.switches = Counter("bitnest_precision_switches", "In-memory precision switches", ["to"], registry=r)
        self.switch_seconds = Counter("bitnest_precision_switch_seconds", "Time spent switching precision", registry=r)
        self.policy_changes = Counter("bitnest_policy_changes", "Adaptive policy precision changes", registry=r)
        self._policy_seen = 0

    def gauges(self, engine, sig) -> None:
        self.queue.set(len(engine._waiting))
        self.running.set(len(engine._rows))
        self.rss.set(sig.rss_bytes)
        self.policy_bits.set(engine.caps.bits_per_weight(engine.policy.current))
        self.precision_bits.set(engine.caps.bits_per_weight(engine.serving))
        n = engine.policy.n_changes
        if n > self._policy_seen:
            self.policy_changes.inc(n - self._policy_seen)
            self._policy_seen = n

    def first_token(self, job, seconds: float) -> None:
        self.ttft.labels(job.served.label).observe(seconds)

    def done(self, job, finish: str) -> None:
        p = job.served.label
        self.requests.labels(p, finish).inc()
        self.prompt_tokens.labels(p).inc(len(job.prompt_ids))
        self.completion_tokens.labels(p).inc(len(job.ids))
        self.latency.labels(p).observe(time.monotonic() - job.arrived)

    def switch(self, ev: dict) -> None:
        self.switches.labels(ev["to"]).inc()
        self.switch_seconds.inc(ev["seconds"])

    def render(self) -> bytes:
        return generate_latest(self.registry)

