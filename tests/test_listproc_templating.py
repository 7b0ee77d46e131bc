"""Tests for :mod:`mailrelay.listproc.templating`: finding and filling reply texts."""

from __future__ import annotations

import os
from importlib import resources

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.listproc.templating import PLACEHOLDERS, Templates, check_template
from tests.support import temp_dir


def write(directory: str, language: str, name: str, text: str | bytes) -> None:
    os.makedirs(os.path.join(directory, language), exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    with open(os.path.join(directory, language, f"{name}.txt"), "wb") as f:
        f.write(data)


class ShippedTemplateTests(SynchronousTestCase):
    def test_every_template_shipped_and_valid(self):
        """Each known template ships in English and uses only its own placeholders."""
        shipped = resources.files("mailrelay.listproc").joinpath("templates", "en")
        names = {p.name[:-4] for p in shipped.iterdir() if p.name.endswith(".txt")}
        self.assertEqual(names, set(PLACEHOLDERS))
        for name in PLACEHOLDERS:
            self.assertEqual(check_template(name, Templates().text(name)), [], name)

    def test_subject_line(self):
        """A leading 'Subject:' line becomes the subject, not part of the body."""
        rendered = Templates().render("welcome", {"display_name": "Test", "address": "a@x"})
        self.assertEqual(rendered.subject, "Welcome to the Test mailing list")
        self.assertTrue(rendered.body.startswith("Welcome! a@x"))
        self.assertEqual(Templates().render("confirm-join", {}).subject, "")


class OverrideTests(SynchronousTestCase):
    def test_search_order(self):
        """List directory first, then site, then shipped."""
        list_dir, site_dir = temp_dir(self), temp_dir(self)
        write(site_dir, "en", "welcome", "site $address")
        write(site_dir, "en", "goodbye", "site goodbye")
        write(list_dir, "en", "welcome", "list $address")
        templates = Templates((list_dir, site_dir))
        self.assertEqual(templates.render("welcome", {"address": "a@x"}).body, "list a@x")
        self.assertEqual(templates.text("goodbye"), "site goodbye")
        self.assertIn("Help for", templates.text("help"))

    def test_edits_seen_at_once(self):
        """Files are read on each use: an edit is used without a restart."""
        site_dir = temp_dir(self)
        templates = Templates((site_dir,))
        write(site_dir, "en", "welcome", "one")
        self.assertEqual(templates.text("welcome"), "one")
        write(site_dir, "en", "welcome", "two")
        self.assertEqual(templates.text("welcome"), "two")

    def test_language(self):
        """The list's language is tried first, English after it."""
        site_dir = temp_dir(self)
        write(site_dir, "de", "welcome", "Willkommen $address")
        templates = Templates((site_dir,), language="de")
        self.assertEqual(templates.render("welcome", {"address": "a@x"}).body, "Willkommen a@x")
        self.assertIn("Help for", templates.text("help"))

    def test_bad_override_falls_back(self):
        """An override that is not UTF-8 or too big is skipped for the next one."""
        site_dir = temp_dir(self)
        write(site_dir, "en", "welcome", b"\xff\xfe bad")
        write(site_dir, "en", "goodbye", "x" * (65 * 1024))
        templates = Templates((site_dir,))
        self.assertIn("Welcome!", templates.text("welcome"))
        self.assertIn("has been removed", templates.text("goodbye"))

    def test_missing_placeholder_left_as_written(self):
        """An unknown placeholder in an operator's file does not fail the reply."""
        site_dir = temp_dir(self)
        write(site_dir, "en", "welcome", "Hi $adress, cost $$5, $")
        self.assertEqual(
            Templates((site_dir,)).render("welcome", {"address": "a@x"}).body,
            "Hi $adress, cost $5, $",
        )

    def test_invalid_names(self):
        """Path-like names and language codes are refused."""
        self.assertRaises(KeyError, Templates().text, "../welcome")
        self.assertRaises(KeyError, Templates().text, "no-such-template")
        for language in ("../en", "EN", "e", "en-US", ""):
            self.assertRaises(ValueError, Templates, (), language)
        Templates((), "pt_BR")


class CheckTemplateTests(SynchronousTestCase):
    def test_problems_reported(self):
        """Unknown placeholders, lone $ and unknown template names are reported."""
        self.assertEqual(check_template("welcome", "Hi $address of ${list_address}"), [])
        problems = check_template("welcome", "Hi $adress $ $token")
        self.assertEqual(len(problems), 3)
        self.assertIn("unknown placeholder $adress", problems)
        self.assertEqual(check_template("nope", ""), ["no template is called 'nope'"])
