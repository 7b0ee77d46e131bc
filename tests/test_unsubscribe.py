"""Tests for :mod:`mailrelay.unsubscribe`: the unsubscribe URLs in posts, the
per-member copies that carry them, and the ``/unsubscribe/`` pages (in memory,
then end to end against a running relay over LMTP and HTTP, plain and TLS)."""

from __future__ import annotations

import email
import os
import re
from email import policy
from io import BytesIO

from twisted.internet import endpoints, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mailrelay.config import load_settings
from mailrelay.errors import RegistryUnavailable
from mailrelay.listproc.tokens import make_unsubscribe_token
from mailrelay.model import EntryState, MailingList
from mailrelay.registry import MemoryRegistry, SQLiteRegistry
from mailrelay.service import makeService
from mailrelay.testing import FakeMTA, ThrowawayCA
from mailrelay.testing.lmtp import connect_lmtp
from mailrelay.unsubscribe import UnsubscribePage, UnsubscribeURLs
from mailrelay.web import WebRoot, make_site
from tests.support import as_deferred, free_port, temp_dir, wait_for_port
from tests.test_metrics import _UnixEndpoints
from tests.test_runner import MEMBERS, RunnerCase

LIST = "test@example.com"
SECRET = bytes(range(32))
URLS = UnsubscribeURLs("https://lists.example.com/", SECRET)
ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = "application/x-www-form-urlencoded"
_URL = re.compile(r"<(https://[^>]+)>")


def _head(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


class URLTests(SynchronousTestCase):
    def test_list_url(self):
        """The list-level URL names the list, lower-cased and percent-encoded."""
        self.assertEqual(
            URLS.list_url("Test@Example.com"),
            "https://lists.example.com/unsubscribe/list/test@example.com",
        )
        self.assertEqual(
            URLS.list_url("a?b/c@example.com"),
            "https://lists.example.com/unsubscribe/list/a%3Fb%2Fc@example.com",
        )

    def test_member_url_carries_the_token(self):
        """A member URL ends in the HMAC token for that list and member."""
        token = make_unsubscribe_token(SECRET, LIST, "anne@example.org")
        self.assertEqual(
            URLS.member_url(LIST, "Anne@Example.org"),
            f"https://lists.example.com/unsubscribe/{token}",
        )

    def test_bad_arguments(self):
        """A base URL that is not https://.../ or a short secret is refused; the
        secret is never shown in a repr."""
        self.assertRaises(ValueError, UnsubscribeURLs, "http://x.example/", SECRET)
        self.assertRaises(ValueError, UnsubscribeURLs, "https://x.example", SECRET)
        self.assertRaises(ValueError, UnsubscribeURLs, "https://x.example/", b"short")
        self.assertNotIn(repr(SECRET), repr(URLS))


class _CopiesCase(RunnerCase):
    """The runner with unsubscribe URLs; ``runner_options`` picks the copies."""

    def copies(self):
        """{recipient tuple: the DATA bytes sent}."""
        return {sent.rcpts: sent.message.data for sent in self.sender.sent}


class PersonalCopyTests(_CopiesCase):
    runner_options = {"personalize": True, "unsubscribe_urls": URLS}

    def test_each_member_gets_its_own_one_click_header(self):
        """With personalize each member gets a transaction of its own, from the
        plain -bounces address, whose copy starts with that member's
        List-Unsubscribe (one-click URL first, then mailto) and
        List-Unsubscribe-Post; everything after it is the same for all."""
        self.enqueue()
        copies = self.copies()
        self.assertEqual(sorted(copies), [(m,) for m in sorted(MEMBERS)])
        self.assertEqual({s.sender for s in self.sender.sent}, {"test-bounces@example.com"})
        rests = set()
        for (member,), data in copies.items():
            prefix = (
                f"List-Unsubscribe: <{URLS.member_url(LIST, member)}>,\r\n"
                " <mailto:test-leave@example.com>\r\n"
                "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
            ).encode()
            self.assertTrue(data.startswith(prefix), data[:300])
            rests.add(data[len(prefix) :])
            parsed = email.message_from_bytes(data, policy=policy.compat32)
            self.assertEqual(len(parsed.get_all("List-Unsubscribe")), 1)
            self.assertEqual(parsed["List-Id"], "Test List <test.example.com>")
        self.assertEqual(len(rests), 1)
        self.assertNotIn(b"List-Unsubscribe", rests.pop())

    def test_size_counts_the_prefix(self):
        """The SIZE a copy announces includes its own header lines."""
        self.enqueue()
        for sent in self.sender.sent:
            self.assertEqual(sent.message.size, len(sent.message.data))


class VERPCopyTests(_CopiesCase):
    runner_options = {"verp": True, "unsubscribe_urls": URLS}

    def test_verp_copies_are_personal(self):
        """VERP copies, one per member, carry that member's one-click URL too."""
        self.enqueue()
        for (member,), data in self.copies().items():
            self.assertIn(URLS.member_url(LIST, member).encode(), _head(data))
            self.assertIn(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", data)


class GroupedCopyTests(_CopiesCase):
    runner_options = {"unsubscribe_urls": URLS, "max_recipients": 2}

    def test_grouped_copies_have_the_list_page_and_no_post(self):
        """Copies shared by several members keep their chunks, name the -leave
        address and the list-level page, and never offer one-click."""
        self.enqueue()
        self.assertEqual(sorted(len(r) for r in self.copies()), [1, 2])
        for data in self.copies().values():
            head = _head(data)
            self.assertIn(
                b"List-Unsubscribe: <mailto:test-leave@example.com>,\r\n"
                b" <https://lists.example.com/unsubscribe/list/test@example.com>\r\n",
                head,
            )
            self.assertNotIn(b"List-Unsubscribe-Post", head)
            self.assertEqual(head.count(b"/unsubscribe/"), 1)


class PersonalWithoutURLTests(_CopiesCase):
    runner_options = {"personalize": True}

    def test_personal_copies_without_public_url_have_mailto_only(self):
        """Without a public URL personal copies carry the mailto form only."""
        self.enqueue()
        self.assertEqual(len(self.copies()), len(MEMBERS))
        for data in self.copies().values():
            self.assertIn(b"List-Unsubscribe: <mailto:test-leave@example.com>\r\n", data)
            self.assertNotIn(b"https://", data)
            self.assertNotIn(b"List-Unsubscribe-Post", data)

    def test_personalize_must_be_a_bool(self):
        """personalize="yes" is a TypeError, not a silent truth value."""
        self.assertRaises(TypeError, self.make_runner, personalize="yes")


def _request(site, method: bytes, path: bytes, body: bytes = b"", content_type: str = FORM):
    """Send one HTTP/1.1 request to ``site`` in memory: (status, headers, body)."""
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    protocol.makeConnection(transport)
    head = [
        b"%s %s HTTP/1.1" % (method, path),
        b"Host: lists.example.com",
        b"Connection: close",
        b"Content-Length: %d" % len(body),
    ]
    if body:
        head.append(b"Content-Type: " + content_type.encode())
    protocol.dataReceived(b"\r\n".join(head) + b"\r\n\r\n" + body)
    response = transport.value()
    status_line, _, rest = response.partition(b"\r\n")
    headers, _, payload = rest.partition(b"\r\n\r\n")
    fields = {}
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b": ")
        fields[name.lower()] = value
    if fields.get(b"transfer-encoding") == b"chunked":
        payload = _dechunk(payload)
    protocol.connectionLost(None)
    return int(status_line.split()[1]), fields, payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        length = int(size, 16)
        if not length:
            break
        out, data = out + data[:length], data[length + 2 :]
    return out


class PageTests(SynchronousTestCase):
    """The pages on a WebRoot over a MemoryRegistry, requests sent in memory."""

    def setUp(self):
        self.registry = MemoryRegistry()
        self.registry.create_list(LIST, "Test List")
        self.registry.add_members(LIST, ["anne@example.org", "bart@example.org"])
        root = WebRoot()
        root.mount("unsubscribe", UnsubscribePage(self.registry, SECRET))
        self.site = make_site(root)
        self.path = (
            URLS.member_url(LIST, "anne@example.org")
            .removeprefix("https://lists.example.com")
            .encode()
        )

    def members(self):
        return [m.address for m in self.registry.members(LIST)]

    def test_get_shows_a_button_and_changes_nothing(self):
        """GET (and HEAD) answer 200 with a form that POSTs the one-click field,
        and leave the member subscribed."""
        code, headers, body = _request(self.site, b"GET", self.path)
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"content-type"], b"text/html; charset=utf-8")
        self.assertEqual(headers[b"referrer-policy"], b"no-referrer")
        self.assertIn(b'<form method="post" action="">', body)
        self.assertIn(b'name="List-Unsubscribe" value="One-Click"', body)
        self.assertIn(b"anne@example.org", body)
        self.assertEqual(_request(self.site, b"HEAD", self.path)[0], 200)
        self.assertIn("anne@example.org", self.members())

    def test_post_unsubscribes_at_once(self):
        """POST List-Unsubscribe=One-Click removes the member and answers 200;
        other members stay."""
        code, _, body = _request(self.site, b"POST", self.path, ONE_CLICK)
        self.assertEqual(code, 200)
        self.assertIn(b"Unsubscribed", body)
        self.assertEqual(self.members(), ["bart@example.org"])

    def test_multipart_post(self):
        """The field sent as multipart/form-data (RFC 8058 allows it) works too."""
        body = (
            b'--b\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
            b"One-Click\r\n--b--\r\n"
        )
        code, _, _ = _request(
            self.site, b"POST", self.path, body, "multipart/form-data; boundary=b"
        )
        self.assertEqual(code, 200)
        self.assertEqual(self.members(), ["bart@example.org"])

    def test_non_member_gets_the_same_answer(self):
        """A second POST (no longer a member) gets the same 200 and text: the
        page is no membership oracle; so does a list deleted meanwhile."""
        first = _request(self.site, b"POST", self.path, ONE_CLICK)
        second = _request(self.site, b"POST", self.path, ONE_CLICK)
        self.assertEqual((first[0], first[2]), (second[0], second[2]))
        self.registry.delete_list(LIST)
        third = _request(self.site, b"POST", self.path, ONE_CLICK)
        self.assertEqual((third[0], third[2]), (first[0], first[2]))

    def test_post_without_the_field_is_refused(self):
        """A POST without List-Unsubscribe=One-Click in its body (empty, another
        value, or the field only in the query string) is 400 and changes nothing."""
        for path, body in [
            (self.path, b""),
            (self.path, b"List-Unsubscribe=Yes"),
            (self.path + b"?List-Unsubscribe=One-Click", b""),
            (self.path + b"?List-Unsubscribe=One-Click", ONE_CLICK),
        ]:
            with self.subTest(path=path, body=body):
                self.assertEqual(_request(self.site, b"POST", path, body)[0], 400)
        self.assertIn("anne@example.org", self.members())

    def test_forged_tokens_change_nothing(self):
        """Tokens with a changed list, a changed member, a changed or cut MAC,
        from another key, or garbage answer 404 to GET and POST."""
        token = make_unsubscribe_token(SECRET, LIST, "anne@example.org")
        payload, mac = token.split(".")
        other_member = make_unsubscribe_token(SECRET, LIST, "bart@example.org").split(".")[0]
        other_list = make_unsubscribe_token(SECRET, "other@example.com", "anne@example.org")
        flipped = ("A" if mac[0] != "A" else "B") + mac[1:]
        forged = [
            f"{other_member}.{mac}",
            f"{other_list.split('.')[0]}.{mac}",
            f"{payload}.{flipped}",
            f"{payload}.{mac[:-3]}",
            make_unsubscribe_token(b"k" * 32, LIST, "bart@example.org"),
            "nonsense",
            "%ff%fe.x",
            "x" * 3000,
        ]
        for bad in forged:
            with self.subTest(token=bad[:40]):
                path = f"/unsubscribe/{bad}".encode()
                self.assertEqual(_request(self.site, b"GET", path)[0], 404)
                self.assertEqual(_request(self.site, b"POST", path, ONE_CLICK)[0], 404)
        self.assertEqual(_request(self.site, b"POST", self.path + b"/more", ONE_CLICK)[0], 404)
        self.assertEqual(self.members(), ["anne@example.org", "bart@example.org"])

    def test_list_page(self):
        """The list-level page explains the -leave address; an unknown list is 404;
        it takes no POST."""
        code, _, body = _request(self.site, b"GET", b"/unsubscribe/list/test@example.com")
        self.assertEqual(code, 200)
        self.assertIn(b'href="mailto:test-leave@example.com"', body)
        self.assertEqual(_request(self.site, b"GET", b"/unsubscribe/list/no@example.com")[0], 404)
        self.assertEqual(_request(self.site, b"GET", b"/unsubscribe/list/%ff")[0], 404)
        self.assertEqual(_request(self.site, b"GET", b"/unsubscribe/")[0], 404)
        code = _request(self.site, b"POST", b"/unsubscribe/list/test@example.com", ONE_CLICK)[0]
        self.assertEqual(code, 405)
        code, headers, _ = _request(self.site, b"PUT", self.path, ONE_CLICK)
        self.assertEqual((code, headers[b"allow"]), (405, b"GET, HEAD, POST"))
        self.assertEqual(len(self.members()), 2)

    def test_unavailable_registry_is_503(self):
        """When the registry cannot be written the POST is 503 with Retry-After:
        the mail client may try again, and nothing was claimed to be done."""

        def unavailable(*args):
            raise RegistryUnavailable("database is locked")

        self.registry.remove_members = unavailable
        code, headers, _ = _request(self.site, b"POST", self.path, ONE_CLICK)
        self.assertEqual((code, headers[b"retry-after"]), (503, b"60"))

    def test_html_is_escaped(self):
        """Addresses are HTML-escaped on the pages."""
        self.registry.create_list("x&y@example.com", "<b>Evil</b>")
        path = b"/unsubscribe/list/x%26y@example.com"
        code, _, body = _request(self.site, b"GET", path)
        self.assertEqual(code, 200)
        self.assertIn(b"x&amp;y-leave@example.com", body)
        self.assertNotIn(b"<b>Evil", body)


MEMBER = "member@example.org"
POSTER = MEMBER


class EndToEndCase(TestCase):
    """The relay (makeService, SQLite stores) with [http] public_url, a
    recording smarthost, posts over LMTP and a real HTTP client."""

    def write_config(self, http: str, **mta: str) -> None:
        values = {
            "lmtp_endpoint": f"unix:{self.socket}",
            "smtp_host": "127.0.0.1",
            "smtp_port": str(self.smarthost.port),
            **mta,
        }
        with open(self.config, "w") as f:
            f.write(
                "[paths]\nvar_dir = var\n[mta]\n"
                + "".join(f"{k} = {v}\n" for k, v in values.items())
                + f"[http]\n{http}"
            )

    def setUp(self):
        self.tmp = temp_dir(self)
        self.socket = os.path.join(self.tmp, "lmtp.sock")
        self.config = os.path.join(self.tmp, "mailrelay.ini")

    async def start(self, http: str, **mta: str) -> None:
        self.smarthost = FakeMTA(reactor, pipelining=True)
        await self.smarthost.start()
        self.addCleanup(self.smarthost.stop)
        self.write_config(http, **mta)
        self.settings = load_settings(self.config)
        os.makedirs(self.settings.paths.var_dir, exist_ok=True)
        self.registry = SQLiteRegistry(self.settings.paths.registry_path)
        self.addCleanup(self.registry.close)
        self.registry.create_list(LIST, "Test")
        self.registry.add_members(LIST, [MEMBER, "other@example.org"])
        self.service = makeService(self.settings, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    async def post(self) -> None:
        client = await connect_lmtp(endpoints.UNIXClientEndpoint(reactor, self.socket))
        await client.lhlo("mx.example.com")
        message = (
            f"From: Member <{POSTER}>\r\nTo: {LIST}\r\nSubject: news\r\n"
            "Message-ID: <news@example.org>\r\n\r\nHello.\r\n"
        ).encode()
        replies = await client.sendmail(POSTER, [LIST], message)
        await client.quit()
        self.assertEqual([r.code for r in replies], [250])
        runner = self.service.getServiceNamed("mailrelay-delivery")
        spool = self.service.getServiceNamed("mailrelay-stores")._spool
        for _ in range(500):
            await runner.when_idle()
            counts = spool.counts()
            if not (counts[EntryState.QUEUED] or counts[EntryState.INFLIGHT]):
                return
            await task.deferLater(reactor, 0.01, lambda: None)
        self.fail("the relay did not settle")

    def copy_for(self, address: str):
        (msg,) = [m for m in self.smarthost.messages if address in m["X-RcptTo"]]
        return msg

    def members(self) -> list[str]:
        return [m.address for m in self.registry.members(LIST)]

    async def fetch(self, agent, method: bytes, url: str, body: bytes | None = None):
        producer = None if body is None else FileBodyProducer(BytesIO(body))
        headers = Headers({b"Content-Type": [FORM.encode()]} if body is not None else {})
        response = await agent.request(method, url.encode(), headers, producer)
        return response.code, await readBody(response)


class EndToEndTests(EndToEndCase):
    def test_one_click_round_trip(self):
        """A personalised post carries the member's one-click URL and
        List-Unsubscribe-Post; GET shows the button (still a member), POST
        removes the member (200), a forged URL is 404 and changes nothing."""

        async def go():
            http_socket = os.path.join(self.tmp, "http.sock")
            await self.start(
                f"endpoint = unix:{http_socket}\npublic_url = https://lists.example.com/\n",
                personalize="yes",
            )
            await self.post()
            msg = self.copy_for(MEMBER)
            self.assertEqual(msg["List-Unsubscribe-Post"], "List-Unsubscribe=One-Click")
            (url,) = _URL.findall(msg["List-Unsubscribe"])
            self.assertTrue(url.startswith("https://lists.example.com/unsubscribe/"))
            self.assertIn("<mailto:test-leave@example.com>", msg["List-Unsubscribe"])
            other_url = _URL.findall(self.copy_for("other@example.org")["List-Unsubscribe"])
            self.assertNotEqual(other_url, [url])
            key = os.path.join(self.settings.paths.var_dir, "unsubscribe.key")
            self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)

            agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(http_socket))
            code, body = await self.fetch(agent, b"GET", url)
            self.assertEqual(code, 200)
            self.assertIn(b"<form", body)
            self.assertIn(MEMBER, self.members())

            forged = url[:-4] + ("AAAA" if not url.endswith("AAAA") else "BBBB")
            code, _ = await self.fetch(agent, b"POST", forged, ONE_CLICK)
            self.assertEqual(code, 404)
            self.assertIn(MEMBER, self.members())

            code, body = await self.fetch(agent, b"POST", url, ONE_CLICK)
            self.assertEqual(code, 200)
            self.assertNotIn(MEMBER, self.members())
            self.assertEqual(self.members(), ["other@example.org"])
            again = await self.fetch(agent, b"POST", url, ONE_CLICK)
            self.assertEqual(again, (200, body))

        return as_deferred(go())

    def test_grouped_copies_link_the_list_page(self):
        """Without personal copies the post names -leave and the list page, has
        no List-Unsubscribe-Post, and the list page answers 200."""

        async def go():
            http_socket = os.path.join(self.tmp, "http.sock")
            await self.start(
                f"endpoint = unix:{http_socket}\npublic_url = https://lists.example.com/\n"
            )
            await self.post()
            msg = self.copy_for(MEMBER)
            self.assertIsNone(msg["List-Unsubscribe-Post"])
            self.assertEqual(
                _URL.findall(msg["List-Unsubscribe"]),
                ["https://lists.example.com/unsubscribe/list/test@example.com"],
            )
            agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(http_socket))
            code, body = await self.fetch(agent, b"GET", _URL.findall(msg["List-Unsubscribe"])[0])
            self.assertEqual(code, 200)
            self.assertIn(b"test-leave@example.com", body)

        return as_deferred(go())

    def test_over_an_ssl_endpoint(self):
        """With an ssl: endpoint (TLS without a proxy) a client that trusts the
        certificate GETs and POSTs the one-click URL from a VERP copy."""

        async def go():
            ca = ThrowawayCA()
            pem = ca.write_server_cert(temp_dir(self), ("localhost",))
            port = free_port()
            await self.start(
                f"endpoint = ssl:{port}:interface=127.0.0.1:privateKey={pem}\n"
                f"public_url = https://localhost:{port}/\n",
                verp_delivery="yes",
            )
            await wait_for_port(reactor, port)
            await self.post()
            (url,) = _URL.findall(self.copy_for(MEMBER)["List-Unsubscribe"])
            self.assertTrue(url.startswith(f"https://localhost:{port}/unsubscribe/"))
            agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=ca.trust_root()))
            self.assertEqual((await self.fetch(agent, b"GET", url))[0], 200)
            self.assertIn(MEMBER, self.members())
            self.assertEqual((await self.fetch(agent, b"POST", url, ONE_CLICK))[0], 200)
            self.assertNotIn(MEMBER, self.members())

        return as_deferred(go())


class MailingListHeaderTests(SynchronousTestCase):
    def test_member_header_lines_stay_short(self):
        """Even for the longest addresses and public URL the one-click header
        lines stay within SMTP's 998 octets."""
        from mailrelay.listheaders import member_unsubscribe_fields

        long_list = MailingList(("l" * 64) + "@" + ("d" * 63 + ".") * 2 + "example")
        urls = UnsubscribeURLs("https://" + "p" * 180 + ".example/", SECRET)
        member = "m" * 64 + "@" + ("e" * 63 + ".") * 2 + "x" * 60
        fields = member_unsubscribe_fields(
            long_list, urls.member_url(long_list.posting_address, member)
        )
        self.assertLessEqual(max(len(line) for line in fields.split(b"\r\n")), 998)
