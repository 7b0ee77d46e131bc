"""Tests for :mod:`mailrelay.metrics` and :mod:`mailrelay.web`: the Prometheus
metrics of a running relay, scraped over HTTP with twisted.web's Agent."""

from __future__ import annotations

import os
import shutil
import tempfile

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import endpoints, reactor, task
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.config import load_settings
from mailrelay.interfaces import IRelayObserver
from mailrelay.metrics import OTHER_LISTS, RelayMetrics
from mailrelay.observer import NO_OBSERVER, ObserverFanout
from mailrelay.service import makeService
from mailrelay.testing import FakeMTA
from mailrelay.testing.lmtp import connect_lmtp
from mailrelay.web import WebRoot
from tests.support import as_deferred
from tests.test_service import POST, RelayCase


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


class ObserverTests(SynchronousTestCase):
    def test_observers_provide_the_interface(self):
        """The no-op observer, the metrics and the fan-out all provide IRelayObserver."""
        verifyObject(IRelayObserver, NO_OBSERVER)
        verifyObject(IRelayObserver, RelayMetrics(task.Clock()))
        verifyObject(IRelayObserver, ObserverFanout(NO_OBSERVER))

    def test_fanout_tells_each(self):
        """A fan-out hands each call to every observer, in order."""
        one, two = RelayMetrics(), RelayMetrics()
        fanout = ObserverFanout(one, two)
        fanout.message_accepted(3)
        for metrics in (one, two):
            value = metrics.registry.get_sample_value("mailrelay_lmtp_recipients_accepted_total")
            self.assertEqual(value, 3)
        self.assertRaises(AttributeError, getattr, fanout, "no_such_event")

    def test_registries_are_separate(self):
        """Two relays in one process never share counters (no global registry)."""
        one, two = RelayMetrics(), RelayMetrics()
        one.lmtp_session_opened()
        self.assertEqual(one.registry.get_sample_value("mailrelay_lmtp_sessions_total"), 1)
        self.assertEqual(two.registry.get_sample_value("mailrelay_lmtp_sessions_total"), 0)

    def test_list_labels_are_bounded(self):
        """Lists beyond the label limit are counted under 'other'."""
        metrics = RelayMetrics(max_list_labels=2)
        for address in ("a@x.org", "b@x.org", "c@x.org", "d@x.org", "a@x.org"):
            metrics.recipients_queued(address, 1)
        get = metrics.registry.get_sample_value
        self.assertEqual(
            get("mailrelay_recipients_total", {"list": "a@x.org", "outcome": "queued"}), 2
        )
        self.assertEqual(
            get("mailrelay_recipients_total", {"list": OTHER_LISTS, "outcome": "queued"}), 2
        )
        self.assertIsNone(
            get("mailrelay_recipients_total", {"list": "c@x.org", "outcome": "queued"})
        )

    def test_scrape_tolerates_a_broken_spool(self):
        """A spool that cannot be read leaves its gauges out; the rest is served."""

        class Broken:
            def counts(self):
                raise OSError("gone")

        metrics = RelayMetrics(task.Clock())
        metrics.watch(spool=Broken(), breaker_state=lambda: "open")
        get = metrics.registry.get_sample_value
        self.assertIsNone(get("mailrelay_spool_entries", {"state": "queued"}))
        self.assertEqual(get("mailrelay_circuit_breaker_state", {"state": "open"}), 1)

    def test_web_root_mounts(self):
        """Pages mount at one path segment each; a taken or nested path is refused."""
        root = WebRoot()
        root.mount("metrics", Resource())
        self.assertRaises(ValueError, root.mount, "metrics", Resource())
        self.assertRaises(ValueError, root.mount, "a/b", Resource())


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    """Every HTTP request of the Agent goes to one unix socket."""

    def __init__(self, path: str):
        self._path = path

    def endpointForURI(self, uri):  # noqa: N802 - twisted.web's naming
        return endpoints.UNIXClientEndpoint(reactor, self._path)


class ScrapeTests(RelayCase):
    """A relay with [http] endpoint set (a unix socket), scraped with Agent during a run."""

    async def start_relay(self, **mta):
        self.smarthost = FakeMTA(reactor, pipelining=True)
        await self.smarthost.start()
        self.addCleanup(self.smarthost.stop)
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.socket = os.path.join(self.tmp, "lmtp.sock")
        self.http_socket = os.path.join(self.tmp, "http.sock")
        self.config = os.path.join(self.tmp, "mailrelay.ini")
        values = {
            "lmtp_endpoint": f"unix:{self.socket}",
            "smtp_host": "127.0.0.1",
            "smtp_port": str(self.smarthost.port),
            "retry_min_backoff": "1h",
            **mta,
        }
        with open(self.config, "w") as f:
            f.write(
                "[paths]\nvar_dir = var\n[mta]\n"
                + "".join(f"{k} = {v}\n" for k, v in values.items())
                + f"[http]\nendpoint = unix:{self.http_socket}\n"
            )
        self.settings = load_settings(self.config)
        self.service = makeService(self.settings, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    async def delivered(self, count: int):
        await self.wait_for(lambda: len(self.smarthost.messages) >= count, f"{count} messages")

    async def scrape(self, path: bytes = b"/metrics"):
        agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(self.http_socket))
        response = await agent.request(b"GET", b"http://relay" + path)
        body = await readBody(response)
        return response, body.decode("utf-8")

    def test_counters_match_what_was_sent(self):
        """Sessions, accepted and refused recipients, held mail, copies queued,
        delivered, deferred and bounced per list, spool depth, SMTP connections
        and latency histograms, as scraped, match what the test sent."""

        async def go():
            await self.start_relay()
            self.admin("lists", "create", "test@example.com")
            self.admin(
                "members",
                "add",
                "test@example.com",
                "bart@example.com",
                "cate@example.org",
                "gone@example.net",
                "slow@example.net",
            )
            self.smarthost.reject("rcpt", 550, "5.1.1 no such user", match="gone@example.net")
            self.smarthost.reject("rcpt", 451, "4.2.0 try later", match="slow@example.net")
            client = await connect_lmtp(endpoints.UNIXClientEndpoint(reactor, self.socket))
            await client.lhlo("mx.example.com")
            replies = await client.sendmail(
                "anne@example.com",
                ["test@example.com", "nolist@example.com", "test-join@example.com"],
                POST,
            )
            self.assertEqual([r.code for r in replies], [250, 550, 250])
            await self.delivered(1)
            await self.service.getServiceNamed("mailrelay-delivery").when_idle()
            response, text = await self.scrape()
            self.assertEqual(response.code, 200)
            self.assertTrue(
                response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
            )
            samples = _samples(text)

            def value(name, **labels):
                return samples.get((name, tuple(sorted(labels.items()))))

            self.assertEqual(value("mailrelay_lmtp_sessions_total"), 1)
            self.assertEqual(value("mailrelay_lmtp_sessions_open"), 1)
            self.assertEqual(value("mailrelay_messages_accepted_total"), 1)
            self.assertEqual(value("mailrelay_lmtp_recipients_accepted_total"), 2)
            self.assertEqual(value("mailrelay_refused_total", reason="unknown_recipient"), 1)
            self.assertEqual(value("mailrelay_messages_held_total"), 1)
            lst = "test@example.com"
            self.assertEqual(value("mailrelay_recipients_total", list=lst, outcome="queued"), 4)
            self.assertEqual(value("mailrelay_recipients_total", list=lst, outcome="held"), 1)
            self.assertEqual(value("mailrelay_recipients_total", list=lst, outcome="delivered"), 2)
            self.assertEqual(value("mailrelay_recipients_total", list=lst, outcome="deferred"), 1)
            self.assertEqual(value("mailrelay_recipients_total", list=lst, outcome="bounced"), 1)
            self.assertEqual(value("mailrelay_spool_entries", state="retry"), 1)
            self.assertEqual(value("mailrelay_spool_entries", state="held"), 1)
            self.assertEqual(value("mailrelay_spool_entries", state="failed"), 1)
            self.assertGreaterEqual(value("mailrelay_spool_oldest_deferred_age_seconds"), 0)
            self.assertEqual(
                value("mailrelay_smtp_connections_opened_total"),
                self.smarthost.get_connection_count(),
            )
            self.assertEqual(value("mailrelay_smtp_connections_failed_total"), 0)
            self.assertGreaterEqual(value("mailrelay_smtp_connections_open"), 1)
            self.assertEqual(value("mailrelay_circuit_breaker_state", state="closed"), 1)
            self.assertEqual(
                value("mailrelay_smtp_transaction_seconds_count"), len(self.smarthost.transactions)
            )
            # The first copies went out; one copy still waits, so no "last" yet.
            self.assertEqual(value("mailrelay_post_first_delivery_seconds_count"), 1)
            self.assertEqual(value("mailrelay_post_last_delivery_seconds_count"), 0)

            await client.quit()
            get = self.service.metrics.registry.get_sample_value
            for _ in range(200):
                if get("mailrelay_lmtp_sessions_open") == 0:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)
            samples = _samples((await self.scrape())[1])
            self.assertEqual(value("mailrelay_lmtp_sessions_open"), 0)
            self.assertEqual(value("mailrelay_lmtp_sessions_total"), 1)

        return as_deferred(go())

    def test_index_names_the_pages(self):
        """/ lists the mounted pages; an unknown path is 404."""

        async def go():
            await self.start_relay()
            response, text = await self.scrape(b"/")
            self.assertEqual((response.code, text), (200, "mailrelay\n/metrics\n"))
            response, _ = await self.scrape(b"/nothing")
            self.assertEqual(response.code, 404)

        return as_deferred(go())

    def test_last_delivery_once_nothing_waits(self):
        """A post whose copies all went out is observed in both latency histograms."""

        async def go():
            await self.start_relay()
            self.admin("lists", "create", "test@example.com")
            self.admin("members", "add", "test@example.com", "bart@example.com")
            client = await self.lmtp()
            await client.sendmail("anne@example.com", ["test@example.com"], POST)
            await self.delivered(1)
            await self.service.getServiceNamed("mailrelay-delivery").when_idle()
            get = self.service.metrics.registry.get_sample_value
            self.assertEqual(get("mailrelay_post_first_delivery_seconds_count"), 1)
            self.assertEqual(get("mailrelay_post_last_delivery_seconds_count"), 1)

        return as_deferred(go())


class NoMetricsTests(RelayCase):
    def test_off_by_default(self):
        """Without [http] endpoint there is no HTTP listener and no metrics object."""

        async def go():
            await self.start_relay(2525)
            self.assertIsNone(self.service.metrics)
            self.assertIsNone(self.service.web_root)
            names = {child.name for child in self.service}
            self.assertNotIn("mailrelay-http", names)

        return as_deferred(go())
