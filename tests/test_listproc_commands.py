"""Tests for :mod:`mailrelay.listproc.commands`: reading -request commands."""

from __future__ import annotations

from email.message import EmailMessage

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.listproc.commands import (
    CommandKind,
    ModerationAction,
    Outcome,
    html_to_text,
    immediate_outcome,
    parse_commands,
    parse_moderation,
)


def mail(body: str = "", subject: str | None = None, *, headers: dict | None = None) -> bytes:
    head = "From: Anne <anne@example.org>\r\nTo: test-request@example.com\r\n"
    if subject is not None:
        head += f"Subject: {subject}\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    return (head + "\r\n" + body.replace("\n", "\r\n")).encode("utf-8")


def kinds(parsed):
    return [c.kind for c in parsed.commands]


class CommandLineTests(SynchronousTestCase):
    def test_subject_then_body(self):
        """The Subject is the first command, then the body's lines in order."""
        parsed = parse_commands(mail("leave\nhelp\n", subject="join"))
        self.assertEqual(kinds(parsed), [CommandKind.JOIN, CommandKind.LEAVE, CommandKind.HELP])
        self.assertEqual([c.source for c in parsed.commands], ["subject", "body", "body"])

    def test_aliases_and_case(self):
        """subscribe/unsubscribe are join/leave; command words are case-insensitive."""
        parsed = parse_commands(mail("SUBSCRIBE\nUnsubscribe\nHelp\n"))
        self.assertEqual(kinds(parsed), [CommandKind.JOIN, CommandKind.LEAVE, CommandKind.HELP])
        self.assertEqual([c.word for c in parsed.commands], ["subscribe", "unsubscribe", "help"])

    def test_reply_prefixes_dropped(self):
        """Re:, Fwd:, AW:, numbered and repeated prefixes are ignored."""
        for subject in ("Re: join", "RE: Fwd: join", "AW: join", "Re[2]: join", "SV:join"):
            parsed = parse_commands(mail("", subject=subject))
            self.assertEqual(kinds(parsed), [CommandKind.JOIN], subject)
            self.assertEqual(parsed.commands[0].line, "join")

    def test_encoded_subject(self):
        """An RFC 2047 encoded Subject is decoded before reading."""
        parsed = parse_commands(mail("", subject="=?utf-8?q?Re=3A_join?="))
        self.assertEqual(kinds(parsed), [CommandKind.JOIN])

    def test_blank_and_quoted_lines_skipped(self):
        """Blank lines and lines quoted with > are neither read nor counted."""
        parsed = parse_commands(mail("\n\n> join\n>leave\n  \nhelp\n"))
        self.assertEqual(kinds(parsed), [CommandKind.HELP])

    def test_signature_ends_the_text(self):
        """Nothing after a '-- ' line (or a bare '--' whose space was stripped) is read."""
        for separator in ("-- ", "--"):
            parsed = parse_commands(mail(f"help\n{separator}\njoin\n"))
            self.assertEqual(kinds(parsed), [CommandKind.HELP], separator)
            self.assertEqual(parsed.unprocessed, ())

    def test_end_stops_reading(self):
        """end (and Mailman's alias stop) stops reading; what follows is unprocessed."""
        for word in ("end", "stop"):
            parsed = parse_commands(mail(f"help\n{word}\njoin\nleave\n"))
            self.assertEqual(kinds(parsed), [CommandKind.HELP, CommandKind.END])
            self.assertEqual(parsed.unprocessed, ("join", "leave"))

    def test_confirm_stops_reading(self):
        """As in Mailman, nothing after a confirm is read: a reply quotes the request."""
        token = "ab" * 20
        parsed = parse_commands(mail("join\nleave\n", subject=f"Re: confirm {token.upper()}"))
        self.assertEqual(kinds(parsed), [CommandKind.CONFIRM])
        self.assertEqual(parsed.commands[0].token, token)
        self.assertEqual(parsed.unprocessed, ("join", "leave"))

    def test_confirm_without_token(self):
        """A confirm with no token is invalid, with a clear error."""
        command = parse_commands(mail("confirm\n")).commands[0]
        self.assertEqual(command.kind, CommandKind.CONFIRM)
        self.assertIsNone(command.token)
        self.assertIn("token", command.error)
        self.assertEqual(immediate_outcome(command), Outcome.INVALID)

    def test_at_most_ten_lines(self):
        """At most 10 command lines are read, the Subject included; the rest
        (up to 10) are kept as unprocessed."""
        body = "\n".join(f"help {i}" for i in range(30))
        parsed = parse_commands(mail(body, subject="help"))
        self.assertEqual(len(parsed.commands), 10)
        self.assertEqual(parsed.commands[-1].line, "help 8")
        self.assertEqual(len(parsed.unprocessed), 10)
        self.assertEqual(parsed.unprocessed[0], "help 9")

    def test_limit_is_configurable(self):
        """max_lines changes the limit."""
        parsed = parse_commands(mail("help\nhelp\nhelp\n"), max_lines=2)
        self.assertEqual(len(parsed.commands), 2)

    def test_unknown_commands_reported(self):
        """Anything else is an unknown command (reported, reading goes on)."""
        parsed = parse_commands(mail("Hello there\njoin\n", subject="Please add me"))
        self.assertEqual(
            kinds(parsed), [CommandKind.UNKNOWN, CommandKind.UNKNOWN, CommandKind.JOIN]
        )
        self.assertEqual(parsed.commands[0].word, "please")
        self.assertEqual(immediate_outcome(parsed.commands[0]), Outcome.UNKNOWN_COMMAND)

    def test_long_lines_cut(self):
        """A very long line is cut before it can be echoed in a reply."""
        parsed = parse_commands(mail("x" * 5000 + "\n"))
        self.assertLessEqual(len(parsed.commands[0].line), 210)

    def test_immediate_outcomes(self):
        """help, end and unknown need no storage; join, leave and confirm do."""
        parsed = parse_commands(mail("help\njoin\nleave\nfoo\nend\n"))
        self.assertEqual(
            [immediate_outcome(c) for c in parsed.commands],
            [Outcome.HELP, None, None, Outcome.UNKNOWN_COMMAND, Outcome.END],
        )


class JoinOptionTests(SynchronousTestCase):
    def test_address_option_names_the_target(self):
        """join address=ADDR is about ADDR: the confirmation goes there, not to the requester."""
        command = parse_commands(mail("join address=<Bob@Example.NET>\n")).commands[0]
        self.assertEqual(command.error, "")
        self.assertEqual(command.address, "bob@example.net")
        self.assertEqual(command.target("anne@example.org"), "bob@example.net")

    def test_plain_join_targets_requester(self):
        """Without address=, the requester is the target."""
        command = parse_commands(mail("join\n")).commands[0]
        self.assertEqual(command.target("anne@example.org"), "anne@example.org")

    def test_bad_arguments_stop(self):
        """A bad, duplicate or digest argument is reported and (as Mailman) stops reading."""
        cases = {
            "join bob@example.net": "bad argument",
            "join address=": "bad argument",
            "join address=not-an-address": "bad address",
            "join address=a@example.net address=b@example.net": "duplicate argument",
            "join digest=mime": "digest delivery is not offered",
            "join colour=blue": "bad argument",
        }
        for line, error in cases.items():
            parsed = parse_commands(mail(f"{line}\nhelp\n"))
            self.assertEqual(len(parsed.commands), 1, line)
            self.assertIn(error, parsed.commands[0].error, line)
            self.assertEqual(parsed.unprocessed, ("help",), line)
            self.assertIsNone(parsed.commands[0].address)

    def test_digest_no_accepted(self):
        """digest=no (regular delivery) is accepted."""
        command = parse_commands(mail("join digest=no\n")).commands[0]
        self.assertEqual(command.error, "")


class MimeTests(SynchronousTestCase):
    def test_first_text_plain_part(self):
        """In multipart mail the first text/plain part is read; other parts are noted."""
        msg = EmailMessage()
        msg["Subject"] = ""
        msg.set_content("help\n")
        msg.add_alternative("<p>join</p>", subtype="html")
        msg.add_attachment(b"leave\n", maintype="text", subtype="plain", filename="x.txt")
        parsed = parse_commands(msg.as_bytes())
        self.assertEqual(kinds(parsed), [CommandKind.HELP])
        self.assertTrue(parsed.other_parts)
        self.assertFalse(parsed.from_html)

    def test_html_only(self):
        """HTML-only mail: commands come from the text, not the markup; quotes are skipped."""
        html = (
            "<html><head><title>join</title><style>p{}</style></head><body>"
            "<div>help</div><p>leave<br>end</p>"
            "<blockquote><p>join</p></blockquote></body></html>"
        )
        msg = EmailMessage()
        msg.set_content(html, subtype="html")
        parsed = parse_commands(msg.as_bytes())
        self.assertTrue(parsed.from_html)
        self.assertEqual(kinds(parsed), [CommandKind.HELP, CommandKind.LEAVE, CommandKind.END])

    def test_html_quote_inside_blockquote_ignored(self):
        """Text in a (nested) blockquote is never a command."""
        text = html_to_text(
            "<div>help</div><blockquote>join<blockquote>leave</blockquote>x</blockquote><p>end</p>"
        )
        self.assertEqual([line for line in text.splitlines() if line], ["help", "end"])

    def test_html_entities_and_signature(self):
        """Entities are decoded, and an HTML signature separator ends the text."""
        text = html_to_text("<p>h&#101;lp</p><div>--&nbsp;</div><p>join</p>")
        msg = EmailMessage()
        msg.set_content("<p>h&#101;lp</p><div>--&nbsp;</div><p>join</p>", subtype="html")
        self.assertIn("help", text)
        self.assertEqual(kinds(parse_commands(msg.as_bytes())), [CommandKind.HELP])

    def test_attached_message_not_read(self):
        """A forwarded (attached) message is not the sender's commands."""
        inner = EmailMessage()
        inner.set_content("join\n")
        outer = EmailMessage()
        outer.set_content("help\n")
        outer.add_attachment(inner)
        outer2 = EmailMessage()
        outer2.make_mixed()
        outer2.attach(_rfc822(inner))
        self.assertEqual(kinds(parse_commands(outer.as_bytes())), [CommandKind.HELP])
        self.assertEqual(kinds(parse_commands(outer2.as_bytes())), [])

    def test_charsets_and_encodings(self):
        """Quoted-printable and base64 bodies in any declared charset are decoded."""
        for charset, cte in (("iso-8859-1", "base64"), ("utf-8", "quoted-printable")):
            msg = EmailMessage()
            msg.set_content("help caf\u00e9\njoin\n", charset=charset, cte=cte)
            parsed = parse_commands(msg.as_bytes())
            self.assertEqual(kinds(parsed), [CommandKind.HELP, CommandKind.JOIN], charset)
            self.assertEqual(parsed.commands[0].line, "help caf\u00e9")


def _rfc822(inner: EmailMessage) -> EmailMessage:
    part = EmailMessage()
    part.set_content(inner)
    return part


class FailSafeTests(SynchronousTestCase):
    def test_garbage(self):
        """Random bytes, empty input and broken MIME give no commands and no exception."""
        samples = [
            b"",
            b"\x00\xff\xfe" * 100,
            b"Subject: =?bogus?q?join?=\r\n\r\n",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n",
            b"Content-Type: text/plain; charset=no-such-charset\r\n\r\nhelp\r\n",
            b"Subject: help\xff\xfe\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!notbase64",
        ]
        for sample in samples:
            parse_commands(sample)
        parsed = parse_commands(samples[4])
        self.assertEqual(kinds(parsed), [CommandKind.HELP])

    def test_undeclared_8bit(self):
        """8-bit text without a charset is read as UTF-8."""
        parsed = parse_commands("Subject: x\r\n\r\nhelp caf\u00e9\r\n".encode())
        self.assertEqual(parsed.commands[1].line, "help caf\u00e9")

    def test_huge_message(self):
        """Only the head of a huge message is read."""
        data = mail("help\n" + "x" * (20 * 1024 * 1024))
        self.assertEqual(kinds(parse_commands(data)), [CommandKind.HELP, CommandKind.UNKNOWN])


class ModerationTests(SynchronousTestCase):
    def test_reply_subject_skipped(self):
        """The 'Re: ...' subject of an owner's reply is passed over; the body decides."""
        decision = parse_moderation(mail("approve\n> discard\n", subject="Re: post needs approval"))
        self.assertEqual(decision.action, ModerationAction.APPROVE)

    def test_reject_reason(self):
        """reject REASON keeps the reason for the poster."""
        decision = parse_moderation(mail("Reject   off topic, sorry\n"))
        self.assertEqual(decision.action, ModerationAction.REJECT)
        self.assertEqual(decision.reason, "off topic, sorry")

    def test_discard_in_subject(self):
        """A decision word in the Subject counts too."""
        self.assertEqual(
            parse_moderation(mail("", subject="discard")).action, ModerationAction.DISCARD
        )

    def test_no_decision(self):
        """Quoted, signature-only or wordless replies decide nothing."""
        self.assertIsNone(parse_moderation(mail("> approve\n-- \napprove\n", subject="Re: x")))
        self.assertIsNone(parse_moderation(b""))
