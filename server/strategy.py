"""Flower's FedAvg and FedProx, also keeping what their aggregate throws away: each site's own figures per round."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedProx


def _site_name(msg: Message) -> str:
    site = msg.content.get("site")
    return str(site["name"]) if site is not None and "name" in site else f"node-{msg.metadata.src_node_id}"


class SiteRecording:
    """Mixin for a FedAvg-family strategy: `self.per_site[round][phase][site]` holds each reply's
    metrics or its error (Flower itself logs an error reply and goes on)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.per_site: dict[int, dict[str, dict[str, dict]]] = {}

    def _record(self, server_round: int, phase: str, replies: list[Message]) -> None:
        sites = self.per_site.setdefault(server_round, {}).setdefault(phase, {})
        for msg in replies:
            if msg.has_error():
                sites[f"node-{msg.metadata.src_node_id}"] = {"error": msg.error.reason}
            else:
                metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
                sites[_site_name(msg)] = {k: float(v) for k, v in metrics.items()}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record(server_round, "train", replies)
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._record(server_round, "evaluate", replies)
        return super().aggregate_evaluate(server_round, replies)


class SiteRecordingFedAvg(SiteRecording, FedAvg):
    pass


class SiteRecordingFedProx(SiteRecording, FedProx):
    pass
