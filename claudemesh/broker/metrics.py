"""
The broker's Prometheus metrics, in a registry the broker owns (not the
process-wide default one, so two brokers in one test process stay apart).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class BrokerMetrics:
    def __init__(self, registry=None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections_active = Gauge(
            "claudemesh_connections_active", "Authenticated WebSocket sessions now open.",
            registry=r)
        self.connections_total = Counter(
            "claudemesh_connections", "Authenticated WebSocket sessions opened.", registry=r)
        self.connections_rejected = Counter(
            "claudemesh_connections_rejected", "Connections or hellos refused, by reason.",
            ["reason"], registry=r)
        self.messages_routed = Counter(
            "claudemesh_messages_routed", "Messages stored and acknowledged, by priority.",
            ["priority"], registry=r)
        self.messages_rejected = Counter(
            "claudemesh_messages_rejected", "Sends refused, by reason.", ["reason"],
            registry=r)
        self.pushes = Counter(
            "claudemesh_pushes", "Message pushes written to sessions.", registry=r)
        self.push_failures = Counter(
            "claudemesh_push_failures",
            "Pushes a connection could not take; their deliveries are offered again "
            "after the lease.", registry=r)
        self.deliveries_queued = Gauge(
            "claudemesh_deliveries_queued", "Deliveries waiting for a recipient.",
            registry=r)
        self.redeliveries = Counter(
            "claudemesh_redeliveries", "Deliveries pushed again after a lease ended.",
            registry=r)
        self.hook_requests = Counter(
            "claudemesh_hook_requests", "Hook status requests, by result.", ["result"],
            registry=r)
        self.frame_errors = Counter(
            "claudemesh_frame_errors", "Frames answered with an error, by code.", ["code"],
            registry=r)
        self.store_batch_seconds = Histogram(
            "claudemesh_store_batch_seconds", "Time to commit one batch of store writes.",
            registry=r)
        self.store_batch_size = Histogram(
            "claudemesh_store_batch_size", "Operations per committed store batch.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)
        self.store_transaction_seconds = Histogram(
            "claudemesh_store_transaction_seconds",
            "Time of one store transaction, by its name.", ["transaction"], registry=r)

    def observe_transaction(self, desc, seconds):
        """
        The store's C{on_transaction} hook: time one named transaction.
        """
        self.store_transaction_seconds.labels(desc).observe(seconds)
