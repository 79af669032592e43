"""Flower's FedAvg and FedProx, also keeping what their aggregate throws away: each site's own figures per round."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from common.fileio import atomic_write_json


def _site_name(msg: Message) -> str:
    site = msg.content.get("site")
    return str(site["name"]) if site is not None and "name" in site else f"node-{msg.metadata.src_node_id}"


def site_replies(replies: list[Message], sent: set[int]) -> dict[str, dict]:
    """{site: its reply's metrics, or {"error": reason}} for the replies to messages sent to the
    node ids `sent`; a messaged node that sent nothing is absent."""
    # The SuperLink answers for a node that went offline with an error from itself (not from
    # the node): such errors belong to the messaged nodes that sent nothing.
    answered = {m.metadata.src_node_id for m in replies if m.metadata.src_node_id in sent}
    silent = sorted(sent - answered)
    sites: dict[str, dict] = {}
    for msg in replies:
        if msg.has_error():
            node = msg.metadata.src_node_id if msg.metadata.src_node_id in sent or not silent else silent.pop(0)
            sites[f"node-{node}"] = {"error": msg.error.reason}
        else:
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            sites[_site_name(msg)] = {k: float(v) for k, v in metrics.items()}
    return sites


class SiteRecording:
    """Mixin for a FedAvg-family strategy: `self.per_site[round][phase][site]` holds each reply's
    metrics or its error (Flower itself logs an error reply and goes on)."""

    def __init__(self, *, progress_path: Path | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.per_site: dict[int, dict[str, dict[str, dict]]] = {}
        self.progress_path = progress_path  # where `plan-server status` reads the current round
        self._sent: dict[tuple[int, str], set[int]] = {}  # (round, phase) -> node ids messaged

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent[(server_round, "train")] = {m.metadata.dst_node_id for m in messages}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._sent[(server_round, "evaluate")] = {m.metadata.dst_node_id for m in messages}
        return messages

    def _record(self, server_round: int, phase: str, replies: list[Message]) -> None:
        sites = self.per_site.setdefault(server_round, {}).setdefault(phase, {})
        sites.update(site_replies(replies, self._sent.get((server_round, phase), set())))
        if self.progress_path is not None:
            atomic_write_json(
                self.progress_path, {"round": server_round, "phase": phase, "sites": sites, "updated_at": time.time()}
            )

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
