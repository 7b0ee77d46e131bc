"""Tests for list-address checks, RCPT resolution and host predicates in :mod:`mailrelay.addresses`."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.addresses import (
    _check_mailbox,
    check_list_address,
    check_mailbox,
    is_host_name,
    is_ip_address,
    is_loopback_host,
    resolve_recipient,
)
from mailrelay.errors import InvalidAddress, RegistryUnavailable
from mailrelay.model import CANONICAL_SUBADDRESS, SUBADDRESSES, Destination

LISTS = frozenset({"test@example.com"})


def _lists(*addresses: str):
    return frozenset(addresses).__contains__


class ResolveRecipientTests(SynchronousTestCase):
    """Mailman 3.3.10's split_recipient behaviour, as probed on a running server."""

    def assert_resolves(self, address, list_address, subaddress, lists=LISTS):
        self.assertEqual(
            resolve_recipient(address, lists.__contains__),
            Destination(list_address, subaddress, address.lower()),
        )

    def test_posting_address(self):
        """The posting address resolves to the list with no sub-address."""
        self.assert_resolves("test@example.com", "test@example.com", None)

    def test_case_insensitive(self):
        """Matching ignores case; the address is kept lower-cased."""
        self.assert_resolves("TEST@Example.COM", "test@example.com", None)

    def test_every_subaddress(self):
        """Every sub-address resolves, with -subscribe/-unsubscribe canonicalised."""
        for name in SUBADDRESSES:
            with self.subTest(name=name):
                self.assert_resolves(
                    f"test-{name}@example.com",
                    "test@example.com",
                    CANONICAL_SUBADDRESS.get(name, name),
                )
        self.assertEqual(
            resolve_recipient("test-subscribe@example.com", LISTS.__contains__).subaddress,
            "join",
        )
        self.assertEqual(
            resolve_recipient("test-unsubscribe@example.com", LISTS.__contains__).subaddress,
            "leave",
        )

    def test_plus_suffix_is_ignored_for_matching(self):
        """VERP bounces, confirmation cookies and plus-posts match; the address keeps the suffix."""
        self.assert_resolves(
            "test-bounces+bart=example.org@example.com", "test@example.com", "bounces"
        )
        self.assert_resolves("test-confirm+ABC123@example.com", "test@example.com", "confirm")
        self.assert_resolves("test+anything@example.com", "test@example.com", None)
        self.assert_resolves("test+a+b@example.com", "test@example.com", None)

    def test_rejected(self):
        """Removed, bogus and unknown names, and other domains, resolve to None."""
        for address in (
            "test-admin@example.com",
            "test-bogus@example.com",
            "notalist@example.com",
            "test@x.example.com",
            "-join@example.com",
            "join@example.com",
            "+test@example.com",
            "test-@example.com",
        ):
            with self.subTest(address=address):
                self.assertIsNone(resolve_recipient(address, LISTS.__contains__))

    def test_list_name_wins(self):
        """A list whose full name matches wins over a sub-address of a shorter list."""
        lists = frozenset({"test@example.com", "test-join@example.com"})
        self.assert_resolves("test-join@example.com", "test-join@example.com", None, lists)
        self.assert_resolves("test-join-join@example.com", "test-join@example.com", "join", lists)
        self.assert_resolves("test-join-leave@example.com", "test-join@example.com", "leave", lists)
        self.assert_resolves("test-leave@example.com", "test@example.com", "leave", lists)
        # Without the longer list, the same address is a command for the shorter one.
        self.assert_resolves("test-join@example.com", "test@example.com", "join")

    def test_lists_named_like_subaddresses(self):
        """Lists literally called join@ or -join@ are reachable (Mailman #433)."""
        lists = frozenset({"join@example.com", "-join@example.com"})
        self.assert_resolves("join@example.com", "join@example.com", None, lists)
        self.assert_resolves("-join@example.com", "-join@example.com", None, lists)
        self.assert_resolves("join-owner@example.com", "join@example.com", "owner", lists)

    def test_quoted_local_part(self):
        """A needlessly quoted local part is the same mailbox; one that needs quotes is no list."""
        self.assert_resolves('"test"@example.com', "test@example.com", None)
        self.assert_resolves('"test\\-join"@example.com', "test@example.com", "join")
        self.assertIsNone(resolve_recipient('"te st"@example.com', LISTS.__contains__))

    def test_invalid_syntax(self):
        """Anything that is not an RFC 5321 mailbox resolves to None without asking is_list."""
        asked = []
        for address in (
            "",
            "test",
            "test@",
            "@example.com",
            "a@b@c",
            "<test@example.com>",
            "test@example.com\r\nRCPT TO:<x@y>",
            " test@example.com",
            "test@exa mple.com",
            None,
            b"test@example.com",
            42,
        ):
            with self.subTest(address=address):
                self.assertIsNone(resolve_recipient(address, asked.append))
        self.assertEqual(asked, [])

    def test_asks_lower_case_candidates_only(self):
        """is_list is asked about lower-cased local@domain forms without the + suffix."""
        asked: list[str] = []

        def is_list(address):
            asked.append(address)
            return False

        self.assertIsNone(resolve_recipient("Foo-Bar-JOIN+X@Example.ORG", is_list))
        self.assertEqual(asked, ["foo-bar-join@example.org", "foo-bar@example.org"])

    def test_is_list_errors_propagate(self):
        """A store error is not mistaken for 'no such list' (451, not 550)."""

        def is_list(address):
            raise RegistryUnavailable("database is locked")

        self.assertRaises(RegistryUnavailable, resolve_recipient, "test@example.com", is_list)

    def test_non_ascii(self):
        """SMTPUTF8 list names resolve like ASCII ones."""
        lists = frozenset({"liste-été@exemple.fr"})
        self.assert_resolves(
            "LISTE-ÉTÉ-request@exemple.fr", "liste-été@exemple.fr", "request", lists
        )


_ATOM = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=12)
_LOCAL = st.lists(_ATOM, min_size=1, max_size=3).map("-".join)
_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=3).map(".".join)
# What may follow the "+": any dot-string (VERP "bart=example.org", cookies).
_SUFFIX = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789=+-_", min_size=1, max_size=8),
    max_size=3,
).map(".".join)


class ResolveRecipientPropertyTests(SynchronousTestCase):
    """Properties of resolve_recipient over generated addresses."""

    @given(local=_LOCAL, domain=_DOMAIN, suffix=_SUFFIX, data=st.data())
    def test_posting_address_with_any_case_and_suffix(self, local, domain, suffix, data):
        """Any case mix and any +suffix still resolves to the posting address."""
        address = f"{local}+{suffix}@{domain}" if suffix else f"{local}@{domain}"
        mixed = "".join(c.upper() if data.draw(st.booleans()) else c for c in address)
        result = resolve_recipient(mixed, _lists(f"{local}@{domain}"))
        self.assertEqual(result, Destination(f"{local}@{domain}", None, address))

    @given(local=_LOCAL, domain=_DOMAIN, name=st.sampled_from(sorted(SUBADDRESSES)))
    def test_subaddress_of_existing_list(self, local, domain, name):
        """local-NAME@domain is NAME's canonical command when only local@domain is a list."""
        result = resolve_recipient(f"{local}-{name}@{domain}", _lists(f"{local}@{domain}"))
        self.assertEqual(result.list_address, f"{local}@{domain}")
        self.assertEqual(result.subaddress, CANONICAL_SUBADDRESS.get(name, name))

    @given(address=st.text(max_size=40), lists=st.frozensets(st.text(max_size=20), max_size=3))
    def test_never_raises_and_only_names_lists(self, address, lists):
        """Arbitrary text never raises, and a result always names a known list."""
        result = resolve_recipient(address, lists.__contains__)
        if result is not None:
            self.assertIn(result.list_address, lists)
            self.assertEqual(result.address, address.lower())


class CheckListAddressTests(SynchronousTestCase):
    """check_list_address refuses posting addresses that RCPT matching could never reach."""

    def test_lower_cases(self):
        """A valid address comes back lower-cased."""
        self.assertEqual(check_list_address("Test@Example.COM"), "test@example.com")

    def test_plus_refused(self):
        """A + in the local part is refused, naming the address and the reason."""
        e = self.assertRaises(InvalidAddress, check_list_address, "a+b@example.com")
        self.assertIn("a+b@example.com", str(e))
        self.assertIn("VERP", str(e))

    def test_quoted_refused(self):
        """A quoted local part is refused."""
        e = self.assertRaises(InvalidAddress, check_list_address, '"a b"@example.com')
        self.assertIn("quoted", str(e))

    def test_non_ascii_refused(self):
        """A non-ASCII local part or domain is refused (LMTP has no SMTPUTF8 here),
        naming the address and the xn-- way out; the xn-- form is accepted."""
        for address in ("liste-\u00e9t\u00e9@example.fr", "test@b\u00fccher.example"):
            with self.subTest(address=address):
                e = self.assertRaises(InvalidAddress, check_list_address, address)
                self.assertIn(repr(address), str(e))
                self.assertIn("must be ASCII", str(e))
                self.assertIn("SMTPUTF8", str(e))
        self.assertEqual(
            check_list_address("test@xn--bcher-kva.example"), "test@xn--bcher-kva.example"
        )

    def test_invalid_mailbox_refused(self):
        """Ordinary syntax errors are reported by check_mailbox's rules."""
        for address in ("", "test", "a@b@c", "test@", None):
            with self.subTest(address=address):
                self.assertRaises(InvalidAddress, check_list_address, address)


class CheckMailboxShortcutTests(SynchronousTestCase):
    """check_mailbox answers the everyday address with one regular expression;
    it must agree with the whole grammar on every input."""

    @given(
        st.text(
            alphabet=st.sampled_from(list('ab.-_+@"\\ []:\r\n<>é9')) | st.characters(),
            max_size=30,
        )
    )
    def test_shortcut_agrees_with_grammar(self, address):
        """Valid and invalid alike, check_mailbox and the full check agree."""
        self.assertEqual(_verdict(check_mailbox, address), _verdict(_check_mailbox, address))

    def test_examples(self):
        """A few addresses at the edges of the shortcut."""
        for address, valid in (
            ("anne@example.com", True),
            ("a.b+c@x-y.example", True),
            ("a..b@example.com", False),
            ("a@-x.example", False),
            ("a@example..com", False),
            ("a@" + "x" * 63 + ".example", True),
            ("a@" + "x" * 64 + ".example", False),
            ("x" * 250 + "@a.b", True),
            ("x" * 251 + "@a.b", False),
            ('"a b"@example.com', True),
            ("josé@example.com", True),
            ("a@[192.0.2.1]", True),
            ("\ud800@example.com", False),  # a lone surrogate: no UTF-8 form
        ):
            self.assertEqual(_verdict(check_mailbox, address), valid, address)
            self.assertEqual(_verdict(_check_mailbox, address), valid, address)


def _verdict(check, address):
    try:
        check(address)
    except InvalidAddress:
        return False
    return True


class HostPredicateTests(SynchronousTestCase):
    """The one set of host predicates that the configuration and the SMTP client share."""

    def test_loopback_hosts(self):
        """localhost (and names under it) and loopback literals, bracketed, with a zone
        id, IPv4-mapped, in any case or with blanks around, are loopback."""
        for host in [
            "localhost",
            "LocalHost",
            "mail.localhost",
            "127.0.0.1",
            "127.0.0.2",
            "127.255.255.254",
            "::1",
            "[::1]",
            "[127.0.0.2]",
            "::1%lo",
            "[::1%lo]",
            "::ffff:127.0.0.1",
            " ::1 ",
        ]:
            with self.subTest(host=host):
                self.assertTrue(is_loopback_host(host))

    def test_not_loopback_hosts(self):
        """Names other than localhost, other addresses and malformed text are not
        loopback; nothing is looked up."""
        for host in [
            "example.com",
            "localhost.example.com",
            "mylocalhost",
            "192.0.2.1",
            "::",
            "0.0.0.0",
            "::ffff:192.0.2.1",
            "fe80::1%lo",
            "[example.com]",
            "[::1",
            "",
        ]:
            with self.subTest(host=host):
                self.assertFalse(is_loopback_host(host))

    def test_ip_address(self):
        """An IP address is exactly an IPv4 or IPv6 literal, without brackets."""
        for text in ["192.0.2.1", "::1", "2001:db8::1"]:
            with self.subTest(text=text):
                self.assertTrue(is_ip_address(text))
        for text in ["[::1]", "example.com", "256.0.0.1", "", "1.2.3"]:
            with self.subTest(text=text):
                self.assertFalse(is_ip_address(text))

    def test_host_name(self):
        """A host name is ASCII labels of letters, digits and inner hyphens (253 at most)."""
        for text in ["localhost", "smtp.example.com", "smtp.example.com.", "a-b.example"]:
            with self.subTest(text=text):
                self.assertTrue(is_host_name(text))
        for text in ["", "-a.example", "a-.example", "a..b", "a_b.example", "x" * 64, "[::1]"]:
            with self.subTest(text=text):
                self.assertFalse(is_host_name(text))
        self.assertFalse(is_host_name(".".join(["a" * 63] * 4)))
