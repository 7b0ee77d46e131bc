"""Tests for :mod:`mailrelay.postfix`: the Postfix transport and relay-domains maps."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.errors import InvalidAddress
from mailrelay.postfix import (
    SUBADDRESS_ORDER,
    PostfixMapError,
    check_nexthop,
    domains_map,
    list_addresses,
    lmtp_nexthop,
    relay_domains,
    transport_map,
)
from tests.support import require_program

# What Mailman 3's postfix_lmtp holds for test@example.com and other@example.net
# with lmtp_port 9024 (from its test suite, header and column padding aside):
# domains sorted, lists sorted, posting address first, then the sub-addresses.
MAILMAN_POSTFIX_LMTP = """\
# Aliases which are visible only in the @example.com domain.
test@example.com                       lmtp:[127.0.0.1]:9024
test-bounces@example.com               lmtp:[127.0.0.1]:9024
test-confirm@example.com               lmtp:[127.0.0.1]:9024
test-join@example.com                  lmtp:[127.0.0.1]:9024
test-leave@example.com                 lmtp:[127.0.0.1]:9024
test-owner@example.com                 lmtp:[127.0.0.1]:9024
test-request@example.com               lmtp:[127.0.0.1]:9024
test-subscribe@example.com             lmtp:[127.0.0.1]:9024
test-unsubscribe@example.com           lmtp:[127.0.0.1]:9024

# Aliases which are visible only in the @example.net domain.
other@example.net                       lmtp:[127.0.0.1]:9024
other-bounces@example.net               lmtp:[127.0.0.1]:9024
other-confirm@example.net               lmtp:[127.0.0.1]:9024
other-join@example.net                  lmtp:[127.0.0.1]:9024
other-leave@example.net                 lmtp:[127.0.0.1]:9024
other-owner@example.net                 lmtp:[127.0.0.1]:9024
other-request@example.net               lmtp:[127.0.0.1]:9024
other-subscribe@example.net             lmtp:[127.0.0.1]:9024
other-unsubscribe@example.net           lmtp:[127.0.0.1]:9024
"""
MAILMAN_POSTFIX_DOMAINS = """\
example.com example.com
example.net example.net
"""


def entries(text: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of a postmap source, in order, as postmap reads them."""
    pairs = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split(None, 1)
            pairs.append((key, value.strip()))
    return pairs


def groups(text: str) -> list[list[str]]:
    """The blank-line separated groups of keys (one per list), comments left out."""
    result: list[list[str]] = [[]]
    for line in text.splitlines():
        if not line.strip():
            if result[-1]:
                result.append([])
        elif not line.startswith("#"):
            result[-1].append(line.split()[0])
    return [group for group in result if group]


class ListAddressesTests(SynchronousTestCase):
    def test_mailman_order(self):
        """A list's addresses are its posting address, then the eight sub-addresses
        sorted, exactly as Mailman's alias utility lists them."""
        self.assertEqual(
            list_addresses("Test@Example.com"),
            (
                "test@example.com",
                "test-bounces@example.com",
                "test-confirm@example.com",
                "test-join@example.com",
                "test-leave@example.com",
                "test-owner@example.com",
                "test-request@example.com",
                "test-subscribe@example.com",
                "test-unsubscribe@example.com",
            ),
        )
        self.assertEqual(len(SUBADDRESS_ORDER), 8)

    def test_invalid(self):
        """An address that cannot be a list's is refused by name."""
        for address in ("nodomain", "a+b@example.com", ""):
            with self.subTest(address=address):
                e = self.assertRaises(InvalidAddress, list_addresses, address)
                self.assertIn(repr(address), str(e))


class TransportMapTests(SynchronousTestCase):
    nexthop = "lmtp:[127.0.0.1]:9024"

    def test_matches_mailman(self):
        """Two lists in two domains give the entries of Mailman's postfix_lmtp, in its
        order and grouping (one block per list, domains and lists sorted)."""
        text = transport_map(["other@example.net", "test@example.com"], self.nexthop)
        self.assertEqual(entries(text), entries(MAILMAN_POSTFIX_LMTP))
        self.assertEqual(groups(text), groups(MAILMAN_POSTFIX_LMTP))

    def test_sorted_lists_in_a_domain(self):
        """Lists of one domain are sorted by local part, whatever the input order."""
        text = transport_map(["zeta@example.com", "Alpha@example.com"], self.nexthop)
        self.assertEqual(
            [group[0] for group in groups(text)], ["alpha@example.com", "zeta@example.com"]
        )

    def test_aligned_and_postmap_syntax(self):
        """Every entry line is ``key`` + at least two spaces + nexthop, in one column,
        and every other line is a comment or blank."""
        text = transport_map(["test@example.com", "a-much-longer-name@example.org"], self.nexthop)
        columns = set()
        for line in text.splitlines():
            if line and not line.startswith("#"):
                self.assertTrue(line.endswith("  " + self.nexthop), line)
                columns.add(line.index(self.nexthop))
        self.assertEqual(len(columns), 1)
        self.assertTrue(text.endswith("\n"))

    def test_shared_address_written_once(self):
        """``test-join@`` as both a list and test's join address appears once, in the
        block of the list of that name (it wins RCPT resolution), so postmap sees no
        duplicate key."""
        text = transport_map(["test@example.com", "test-join@example.com"], self.nexthop)
        keys = [key for key, _value in entries(text)]
        self.assertEqual(len(keys), len(set(keys)))
        self.assertEqual(len(keys), 17)
        test_block, join_block = groups(text)
        self.assertNotIn("test-join@example.com", test_block)
        self.assertEqual(join_block[0], "test-join@example.com")

    def test_duplicate_input_lists(self):
        """The same list given twice (in any case) is written once."""
        text = transport_map(["test@example.com", "TEST@example.com"], self.nexthop)
        self.assertEqual(len(entries(text)), 9)

    def test_no_lists(self):
        """Without lists the map has comments only, which postmap accepts."""
        text = transport_map([], self.nexthop)
        self.assertEqual(entries(text), [])
        self.assertTrue(text.startswith("# "))

    def test_bad_nexthop(self):
        """A nexthop without ``transport:`` or with white space is refused."""
        for nexthop in ("", "127.0.0.1", "lmtp:[127.0.0.1]:24 x", ":x"):
            with self.subTest(nexthop=nexthop):
                self.assertRaises(PostfixMapError, transport_map, ["t@example.com"], nexthop)
                self.assertRaises(PostfixMapError, check_nexthop, nexthop)
        self.assertEqual(check_nexthop("lmtp:unix:private/lmtp"), "lmtp:unix:private/lmtp")


class DomainsTests(SynchronousTestCase):
    def test_matches_mailman(self):
        """The domains map has Mailman's postfix_domains entries: ``domain domain``."""
        text = domains_map(["test@example.com", "other@example.net", "x@example.com"])
        self.assertEqual(entries(text), entries(MAILMAN_POSTFIX_DOMAINS))

    def test_relay_domains(self):
        """relay_domains gives each domain once, sorted and lower-cased."""
        self.assertEqual(
            relay_domains(["b@Example.ORG", "a@example.com", "c@example.org"]),
            ("example.com", "example.org"),
        )
        self.assertEqual(relay_domains([]), ())


class NexthopTests(SynchronousTestCase):
    def test_derived(self):
        """The nexthop reaches the LMTP endpoint: the bound address in brackets (no MX
        lookup), loopback for a wildcard bind, ``unix:`` for a socket."""
        cases = {
            "tcp:8024:interface=127.0.0.1": "lmtp:[127.0.0.1]:8024",
            "tcp:port=24:interface=192.0.2.7": "lmtp:[192.0.2.7]:24",
            "tcp:8024": "lmtp:[127.0.0.1]:8024",
            "tcp:8024:interface=0.0.0.0": "lmtp:[127.0.0.1]:8024",
            "tcp6:8024:interface=\\:\\:1": "lmtp:[::1]:8024",
            "tcp6:8024:interface=\\:\\:": "lmtp:[::1]:8024",
            "tcp6:8024": "lmtp:[::1]:8024",
            "tcp:8024:interface=localhost": "lmtp:[localhost]:8024",
            "unix:/run/mailrelay/lmtp.sock:mode=660": "lmtp:unix:/run/mailrelay/lmtp.sock",
            "unix:address=/run/m.sock": "lmtp:unix:/run/m.sock",
        }
        for endpoint, nexthop in cases.items():
            with self.subTest(endpoint=endpoint):
                self.assertEqual(lmtp_nexthop(endpoint), nexthop)

    def test_not_derivable(self):
        """Endpoints whose address Postfix cannot be told are refused with a hint."""
        for endpoint, hint in (
            ("systemd:domain=INET:index=0", "--nexthop"),
            ("ssl:8024:privateKey=k.pem", "lmtp_tls_wrappermode"),
            ("unix:/run/my socket", "white space"),
            ("tcp:interface=127.0.0.1", "no port"),
            ("unix:", "no socket path"),
            ("stdio:", "cannot derive"),
        ):
            with self.subTest(endpoint=endpoint):
                e = self.assertRaises(PostfixMapError, lmtp_nexthop, endpoint)
                self.assertIn(hint, str(e))
                self.assertIsInstance(e, ValueError)


class PostmapTests(SynchronousTestCase):
    def test_postmap_accepts_and_resolves(self):
        """postmap builds the map without a warning, and looking up any list address
        (sub-addresses included) answers the LMTP nexthop; the domains map too."""
        postmap = require_program("postmap")
        directory = tempfile.mkdtemp(prefix="mailrelay-test-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        lists = ["test@example.com", "test-join@example.com", "other@example.net"]
        transport = os.path.join(directory, "transport")
        domains = os.path.join(directory, "domains")
        # A private configuration directory: postmap reads main.cf, and the
        # machine's own may not exist (Debian's "No configuration").
        conf = os.path.join(directory, "conf")
        os.mkdir(conf)
        with open(os.path.join(conf, "main.cf"), "w", encoding="utf-8") as f:
            f.write("compatibility_level = 3.6\n")
        with open(transport, "w", encoding="utf-8") as f:
            f.write(transport_map(lists, "lmtp:[127.0.0.1]:8024"))
        with open(domains, "w", encoding="utf-8") as f:
            f.write(domains_map(lists))
        for path in (transport, domains):
            built = subprocess.run(
                [postmap, "-c", conf, f"hash:{path}"], capture_output=True, text=True, timeout=30
            )
            self.assertEqual((built.returncode, built.stderr), (0, ""))
        keys = "\n".join(
            [
                "test-bounces@example.com",
                "TEST@example.com",
                "test-join@example.com",
                "other-unsubscribe@example.net",
                "nobody@example.com",
            ]
        )
        looked_up = subprocess.run(
            [postmap, "-c", conf, "-q", "-", f"hash:{transport}"],
            input=keys + "\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(
            entries(looked_up.stdout),
            [
                ("test-bounces@example.com", "lmtp:[127.0.0.1]:8024"),
                ("TEST@example.com", "lmtp:[127.0.0.1]:8024"),
                ("test-join@example.com", "lmtp:[127.0.0.1]:8024"),
                ("other-unsubscribe@example.net", "lmtp:[127.0.0.1]:8024"),
            ],
        )
        found = subprocess.run(
            [postmap, "-c", conf, "-q", "example.net", f"hash:{domains}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(found.stdout.strip(), "example.net")
