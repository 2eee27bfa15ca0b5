"""Prometheus metrics of a Triton fleet, for the daemon's ``/metrics``.

:class:`FleetCollector` is a prometheus-client custom collector: registered in the
daemon's registry, each scrape reads :meth:`TritonFleet.servers` (no state of its own).

* ``xrwatch_triton_server_ready{server}`` - 1 while the server gets batches (checked and
  not backing off after a failure), else 0;
* ``xrwatch_triton_request_seconds{server}`` - a summary: count and total seconds of the
  answered inference requests (mean latency = sum / count);
* ``xrwatch_triton_errors_total{server}`` - failed or timed-out requests and checks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xrwatch.remote.triton import TritonFleet

logger = logging.getLogger(__name__)


class FleetCollector:
    """The fleet's per-server readiness, latency and errors, read at each scrape."""

    def __init__(self, fleet: TritonFleet) -> None:
        self.fleet = fleet

    def describe(self) -> list[Any]:
        return []  # families are built at collect time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )

        ready = GaugeMetricFamily(
            "xrwatch_triton_server_ready",
            "1 while the Triton server gets batches (checked, not backing off), else 0",
            labels=["server"],
        )
        latency = SummaryMetricFamily(
            "xrwatch_triton_request_seconds",
            "Answered inference requests to the Triton server and their total time",
            labels=["server"],
        )
        errors = CounterMetricFamily(
            "xrwatch_triton_errors",
            "Failed or timed-out requests and checks of the Triton server",
            labels=["server"],
        )
        for server in self.fleet.servers():
            url = [server["url"]]
            ready.add_metric(url, 1.0 if server["state"] == "ready" else 0.0)
            latency.add_metric(url, count_value=server["requests"], sum_value=server["seconds"])
            errors.add_metric(url, server["errors"])
        yield ready
        yield latency
        yield errors
