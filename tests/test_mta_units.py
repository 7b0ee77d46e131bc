"""Unit tests of the outbound helpers: message encoding, credentials file, secure mode, chunking."""

from __future__ import annotations

import email
import os
import re
import tempfile

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.errors import ConfigurationError
from mailrelay.mta import SecureMode, as_secure_mode
from mailrelay.mta.bulk import chunkify
from mailrelay.mta.connection import InvalidSecureMode
from mailrelay.mta.credentials import CredentialsFile
from mailrelay.mta.message import prepare_message


def unstuff(wire: bytes) -> bytes:
    """What a receiving server reconstructs from DATA (RFC 5321 4.5.2)."""
    return b"".join(
        (line[1:] if line.startswith(b".") else line) + b"\r\n" for line in wire.split(b"\r\n")[:-1]
    )


class PrepareMessageTests(SynchronousTestCase):
    def test_line_ends_normalised(self):
        """Bare LF and bare CR become CRLF; CRLF stays CRLF (never CR CR LF)."""
        self.assertEqual(prepare_message(b"a\nb\r\nc\rd").data, b"a\r\nb\r\nc\r\nd\r\n")

    def test_crlf_input(self):
        """Input that already has CRLF line ends is kept as it is, and still stuffed."""
        self.assertEqual(prepare_message(b"a\r\nb\r\n").data, b"a\r\nb\r\n")
        self.assertEqual(prepare_message(b"a\r\n.\r\nb").data, b"a\r\n..\r\nb\r\n")
        self.assertEqual(prepare_message(b"a\r\r\nb\r\n").data, b"a\r\n\r\nb\r\n")

    def test_str_and_message_inputs(self):
        """str is UTF-8 encoded; an email.message.Message is serialised without Bcc."""
        self.assertEqual(
            prepare_message("Subject: é\n\nx\n").data, "Subject: é\r\n\r\nx\r\n".encode()
        )
        msg = email.message_from_string(
            "From: a@example.com\nBcc: secret@example.com\nSubject: s\n\nbody\n"
        )
        wire = prepare_message(msg)
        self.assertNotIn(b"secret@example.com", wire.data)
        self.assertIn(b"Subject: s\r\n\r\nbody\r\n", wire.data)
        self.assertEqual(msg["Bcc"], "secret@example.com")  # the caller's object is untouched

    def test_wrong_type(self):
        """Anything else is a TypeError naming the type."""
        self.assertRaises(TypeError, prepare_message, 42)

    def test_eight_bit_flag_and_size(self):
        """eight_bit says whether BODY=8BITMIME is needed; size is before dot-stuffing."""
        w = prepare_message(b".x\n")
        self.assertEqual((w.data, w.size, w.eight_bit), (b"..x\r\n", 4, False))
        self.assertTrue(prepare_message("ü".encode()).eight_bit)

    def test_message_id(self):
        """message_id reads the header for logs, or is empty."""
        self.assertEqual(prepare_message(b"Message-ID: <a@b>\n\nx\n").message_id, "<a@b>")
        self.assertEqual(prepare_message(b"Subject: x\n\nMessage-ID: <no>\n").message_id, "")

    @given(
        st.lists(
            st.sampled_from([b".", b"..", b"x", b".x", b"\r", b"\n", b"\r\n", b" ", b"\xc3\xa9"]),
            max_size=60,
        )
    )
    def test_round_trip(self, parts):
        """Whatever the input, the wire form never contains an early end of data and
        un-stuffs to the input with normalised line ends."""
        raw = b"".join(parts)
        wire = prepare_message(raw).data
        normalised = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
        if normalised and not normalised.endswith(b"\r\n"):
            normalised += b"\r\n"
        self.assertEqual(unstuff(wire), normalised)
        self.assertNotIn(b"\r\n.\r\n", b"\r\n" + wire)
        self.assertFalse(re.search(rb"(?<!\r)\n|\r(?!\n)", wire))


class CredentialsFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        fd, path = tempfile.mkstemp()
        os.write(fd, text.encode())
        os.close(fd)
        os.chmod(path, 0o600)
        self.addCleanup(os.unlink, path)
        return path

    def test_lookup_by_host_and_port(self):
        """Entries match host (case-insensitively) and port; port-less entries match any port; first match wins."""
        path = self.write(
            "# smarthosts\n"
            "machine smtp.example.com port 587 login relay password 's3cret word'\n"
            "machine SMTP.example.com login other password x\n"
            "machine mail.example.org port smtps login lists password hunter2\n"
            "default login fallback password xyzzy\n"
        )
        creds = CredentialsFile.load(path)
        self.assertEqual(creds.lookup("smtp.example.com", 587).password, "s3cret word")
        self.assertEqual(creds.lookup("Smtp.Example.Com", 25).user, "other")
        self.assertEqual(creds.lookup("mail.example.org", 465).user, "lists")
        self.assertEqual(creds.lookup("mail.example.org", 25).user, "fallback")
        self.assertNotIn("s3cret", repr(creds.lookup("smtp.example.com", 587)))

    def test_no_match(self):
        """Without a default entry an unknown destination has no credentials."""
        self.assertIsNone(
            CredentialsFile.load(self.write("machine a login u password p\n")).lookup("b", 25)
        )

    def test_errors_name_file_and_line(self):
        """A malformed line is a ConfigurationError naming the file and line number."""
        for text in (
            "machine a login u\n",
            "machine a port x login u password p\n",
            "login u password p\n",
            "machine a login u password p bogus 1\n",
            "machine 'a\n",
        ):
            path = self.write("\n" + text)
            e = self.assertRaises(ConfigurationError, CredentialsFile.load, path)
            self.assertIn(f"{path}, line 2", str(e))

    def test_others_may_read(self):
        """A credentials file the group or others may access is refused with an
        error naming the file and the fix (chmod 600), as ssh refuses such keys."""
        path = self.write("machine a login u password s3cret\n")
        for mode in (0o644, 0o640, 0o606):
            with self.subTest(mode=oct(mode)):
                os.chmod(path, mode)
                e = self.assertRaises(ConfigurationError, CredentialsFile.load, path)
                self.assertEqual(
                    str(e),
                    f"credentials file {path} is accessible to other users (mode {mode:04o}); "
                    f"it holds a password: run chmod 600 {path} (owned by the user mailrelay "
                    f"runs as)",
                )

    def test_unreadable(self):
        """A missing file is an error naming it."""
        e = self.assertRaises(ConfigurationError, CredentialsFile.load, "/nonexistent/authinfo")
        self.assertIn("/nonexistent/authinfo", str(e))


class SecureModeTests(SynchronousTestCase):
    def test_parse(self):
        """Configuration strings map to modes, ignoring case and spaces."""
        self.assertIs(as_secure_mode("SMTPS"), SecureMode.IMPLICIT)
        self.assertIs(as_secure_mode(" starttls "), SecureMode.STARTTLS)
        self.assertIs(as_secure_mode("smtp"), SecureMode.INSECURE)
        self.assertIs(as_secure_mode(SecureMode.STARTTLS), SecureMode.STARTTLS)

    def test_invalid(self):
        """Anything else is a clear error listing the choices."""
        e = self.assertRaises(InvalidSecureMode, as_secure_mode, "tls")
        self.assertIn("'tls'", str(e))
        self.assertIn("smtp, smtps, starttls", str(e))
        self.assertIsInstance(e, ValueError)


class ChunkifyTests(SynchronousTestCase):
    def test_mailman_probe(self):
        """max 2: {b,c}@example.com then d@example.org, each bucket its own chunk, sorted."""
        self.assertEqual(
            chunkify(["cperson@example.com", "dperson@example.org", "bperson@example.com"], 2),
            [["bperson@example.com", "cperson@example.com"], ["dperson@example.org"]],
        )

    def test_buckets_largest_first_and_partial_chunks(self):
        """Buckets go largest first; a bucket's last partial chunk is not filled from another bucket."""
        rcpts = [f"u{i}@x.com" for i in range(3)] + [
            "a@x.net",
            "b@x.org",
            "c@x.de",
            "d@x.fr",
            "e@x.ca",
        ]
        chunks = chunkify(rcpts, 2)
        self.assertEqual(chunks[0], ["u0@x.com", "u1@x.com"])
        # com: [u0,u1],[u2]; net+org: [a,b]; other TLDs: [c,d]; ca: [e]
        self.assertEqual(sorted(map(len, chunks)), [1, 1, 2, 2, 2])
        self.assertEqual(sorted(sum(chunks, [])), sorted(rcpts))

    def test_zero_means_one_chunk(self):
        """max_recipients 0 sends everyone in one transaction; duplicates are sent once."""
        self.assertEqual(chunkify(["b@x.com", "a@x.org", "b@x.com"], 0), [["a@x.org", "b@x.com"]])
        self.assertEqual(chunkify([], 3), [])


class HeaderPrefixTests(SynchronousTestCase):
    def test_prefix_in_front(self):
        """with_header_prefix puts the lines in front; size and flags follow."""
        wire = prepare_message(b"Subject: x\r\n\r\n.dot\r\n")
        copy = wire.with_header_prefix(b"X-A: 1\r\nX-B: 2\r\n")
        self.assertEqual(copy.data, b"X-A: 1\r\nX-B: 2\r\n" + wire.data)
        self.assertEqual(copy.size, wire.size + 16)
        self.assertEqual((copy.eight_bit, copy.long_lines), (wire.eight_bit, wire.long_lines))
        self.assertIs(copy.for_server(eight_bit_mime=False), copy)

    def test_rewritten_once_per_message(self):
        """A copy that must be rewritten for the server is the message's own
        rewrite with the prefix in front: the rewrite is shared by every copy."""
        wire = prepare_message(b"Subject: x\r\n\r\n" + "é".encode() * 600 + b"\r\n")
        one = wire.with_header_prefix(b"X-A: 1\r\n").for_server(eight_bit_mime=False)
        two = wire.with_header_prefix(b"X-A: 2\r\n").for_server(eight_bit_mime=False)
        base = wire.for_server(eight_bit_mime=False)
        self.assertEqual(one.data, b"X-A: 1\r\n" + base.data)
        self.assertEqual(two.data, b"X-A: 2\r\n" + base.data)
        self.assertTrue(one.data.isascii())
        self.assertFalse(one.long_lines)

    def test_bad_prefix_refused(self):
        """The prefix must be whole ASCII CRLF lines, none starting with a dot or too long."""
        wire = prepare_message(b"Subject: x\r\n\r\nbody\r\n")
        for prefix in (
            b"X: 1",
            b"X: 1\n",
            b".X: 1\r\n",
            b"X: \xe9\r\n",
            b"X: " + b"a" * 1000 + b"\r\n",
        ):
            self.assertRaises(ValueError, wire.with_header_prefix, prefix)
