"""Prometheus metrics shared by both backends (same names whether served by vLLM or transformers).

    kvedit_requests_total{endpoint,status}         completed inference requests (POST to an `INFERENCE_PATHS`
                                                   endpoint; series exist at 0 for `DECLARED_STATUSES` from the start)
    kvedit_prompt_tokens_total / kvedit_completion_tokens_total   tokens in / out
    kvedit_request_latency_seconds{endpoint}       request latency histogram
    kvedit_output_token_latency_seconds            latency / completion tokens, per request
    kvedit_router_hit_ratio                        routed tokens whose gate fired (cumulative)
    kvedit_router_hit_tokens / kvedit_router_tokens   the two counters behind it
    kvedit_memory_facts{memory}                    facts loaded
    kvedit_memory_version{memory}                  version served
    kvedit_memory_follow_errors{memory}            versions that could not be followed
    kvedit_memory_reload_seconds{memory}           commit time (Redis message) -> applied
    kvedit_memory_served{memory,default}           1 per memory a multi-memory replica serves
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_RELOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)

# The endpoints `kvedit_requests_total` and the latency histogram count, on both backends (the hf backend serves
# the first two). Only these paths become label values: any other path would add a series per distinct URL.
INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
# Statuses whose series are created at 0 when a backend declares its endpoints, so that `increase()` and `rate()`
# see the first error of a kind (a series born at 1 has no increase until its second sample).
DECLARED_STATUSES = ("200", "400", "401", "404", "500", "503")

_shared: dict[int, "ServingMetrics"] = {}
_shared_lock = threading.Lock()


class ServingMetrics:
    """The kvedit metric family in one registry."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter("kvedit_requests", "Completed HTTP requests", ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("kvedit_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.completion_tokens = Counter("kvedit_completion_tokens", "Tokens generated", registry=registry)
        self.latency = Histogram("kvedit_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=registry)
        self.token_latency = Histogram("kvedit_output_token_latency_seconds", "Request latency per generated token",
                                       buckets=_TOKEN_BUCKETS, registry=registry)
        self.hit_ratio = Gauge("kvedit_router_hit_ratio", "Fraction of routed tokens whose gate fired", registry=registry)
        self.hit_tokens = Gauge("kvedit_router_hit_tokens", "Tokens whose gate fired (cumulative)", registry=registry)
        self.routed_tokens = Gauge("kvedit_router_tokens", "Tokens seen by the routed layer (cumulative)", registry=registry)
        # The same as counters: the gauges sum over the memories served now, so they drop when one is removed or
        # reloaded; these only grow (a memory's counts that went down were reset: they count from zero again).
        self.hits_counter = Counter("kvedit_routed_hits", "Tokens whose gate fired", registry=registry)
        self.tokens_counter = Counter("kvedit_routed_tokens", "Tokens seen by the routed layer", registry=registry)
        self._last_counts: dict[str, tuple[int, int]] = {}
        self.facts = Gauge("kvedit_memory_facts", "Facts loaded", ["memory"], registry=registry)
        self.version = Gauge("kvedit_memory_version", "Memory version served", ["memory"], registry=registry)
        self.follow_errors = Gauge("kvedit_memory_follow_errors", "Versions that could not be followed", ["memory"],
                                   registry=registry)
        self.reload = Histogram("kvedit_memory_reload_seconds", "Commit (Redis message time) to applied",
                                ["memory"], buckets=_RELOAD_BUCKETS, registry=registry)
        self.served = Gauge("kvedit_memory_served", "Memories this replica serves (1 each; default=true for the "
                            "one the plain model name gets)", ["memory", "default"], registry=registry)
        self._served_labels: set[tuple[str, str]] = set()

    @classmethod
    def shared(cls, registry: CollectorRegistry = REGISTRY) -> "ServingMetrics":
        """One instance per registry (metric names can be registered only once)."""
        with _shared_lock:
            if id(registry) not in _shared:
                _shared[id(registry)] = cls(registry)
            return _shared[id(registry)]

    def declare_endpoints(self, paths: tuple[str, ...]) -> None:
        """Create the request series of the inference endpoints a backend serves, at 0."""
        for path in paths:
            if path not in INFERENCE_PATHS:
                raise ValueError(f"{path!r} is not an inference endpoint ({', '.join(INFERENCE_PATHS)})")
            for status in DECLARED_STATUSES:
                self.requests.labels(path, status)
            self.latency.labels(path)

    def observe_request(self, endpoint: str, status: int, seconds: float, usage: dict | None) -> None:
        """Count one completed request to `endpoint` (one of `INFERENCE_PATHS`; other paths are not counted)."""
        if endpoint not in INFERENCE_PATHS:
            return
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if usage:
            self.prompt_tokens.inc(int(usage.get("prompt_tokens") or 0))
            out = int(usage.get("completion_tokens") or 0)
            self.completion_tokens.inc(out)
            if out:
                self.token_latency.observe(seconds / out)

    def observe_memory(self, status: dict | None) -> None:
        """Update memory gauges from `MemoryFollower.status(drain=True)` (drained latencies observed once)."""
        if not status:
            return
        self._observe_one(status)
        self._count({str(status.get("memory")): (int(status.get("hits", 0)), int(status.get("tokens", 0)))})
        self._observe_hits(int(status.get("hits", 0)), int(status.get("tokens", 0)))

    def _observe_one(self, status: dict) -> None:
        name = str(status.get("memory"))
        if status.get("version") is not None:
            self.version.labels(name).set(status["version"])
        self.facts.labels(name).set(status.get("facts", 0))
        self.follow_errors.labels(name).set(status.get("errors", 0))
        reload = self.reload.labels(name)  # the series exists from the first scrape, so rate() sees the first reload
        for seconds in status.get("reload_seconds") or ():
            reload.observe(seconds)

    def _count(self, counts: dict[str, tuple[int, int]]) -> None:
        """Advance the counters by each memory's growth since the last observation."""
        with _shared_lock:
            for name, (hits, tokens) in counts.items():
                last_hits, last_tokens = self._last_counts.get(name, (0, 0))
                if hits < last_hits or tokens < last_tokens:  # reloaded: counting from zero again
                    last_hits = last_tokens = 0
                self.hits_counter.inc(hits - last_hits)
                self.tokens_counter.inc(tokens - last_tokens)
            self._last_counts = dict(counts)

    def _observe_hits(self, hits: int, tokens: int) -> None:
        self.hit_tokens.set(hits)
        self.routed_tokens.set(tokens)
        self.hit_ratio.set(hits / tokens if tokens else 0.0)

    def observe_memories(self, described: dict | None) -> None:
        """Update from a multi-memory replica's `{"default", "memories": [status, ...]}` (drained latencies).

        Per-memory gauges as `observe_memory`; the router counters summed over memories; a memory
        no longer served leaves `kvedit_memory_served` (its other series keep their last value).
        """
        if not described:
            return
        hits = tokens = 0
        labels: set[tuple[str, str]] = set()
        counts: dict[str, tuple[int, int]] = {}
        for status in described.get("memories") or ():
            self._observe_one(status)
            hits, tokens = hits + int(status.get("hits", 0)), tokens + int(status.get("tokens", 0))
            counts[str(status.get("memory"))] = (int(status.get("hits", 0)), int(status.get("tokens", 0)))
            if not status.get("retired"):
                labels.add((str(status.get("memory")), str(status.get("memory") == described.get("default")).lower()))
        self._observe_hits(hits, tokens)
        self._count(counts)
        with _shared_lock:
            for gone in self._served_labels - labels:
                self.served.remove(*gone)
            for label in labels:
                self.served.labels(*label).set(1)
            self._served_labels = labels
