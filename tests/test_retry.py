"""Tests for :mod:`mailrelay.retry`: classification, backoff with jitter, giving up."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.mta.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    DataRefused,
    SenderRefused,
    TLSFailed,
)
from mailrelay.retry import (
    SITE_PROBLEM_CODES,
    RetryPolicy,
    Verdict,
    backoff,
    classify,
    classify_error,
    next_attempt_at,
)


class ClassifyTests(SynchronousTestCase):
    def test_mailman_rule(self):
        """2xx is delivered; 5xx except 552 permanent; 4xx, 444 and 552 temporary (Mailman)."""
        self.assertIs(classify(250), Verdict.DELIVERED)
        self.assertIs(classify(251), Verdict.DELIVERED)
        for code in (550, 551, 553, 554, 500):
            self.assertIs(classify(code), Verdict.PERMANENT, code)
        for code in (421, 450, 451, 452, 444, 552):
            self.assertIs(classify(code), Verdict.TEMPORARY, code)

    def test_auth_codes_are_site_problems(self):
        """530, 534, 535, 538 and 571 blame the site, never the recipient."""
        self.assertEqual(SITE_PROBLEM_CODES, {530, 534, 535, 538, 571})
        for code in SITE_PROBLEM_CODES:
            self.assertIs(classify(code), Verdict.SITE_PROBLEM, code)

    def test_flag_wins(self):
        """A failure flagged site_problem is one whatever its code (444 for TLS)."""
        self.assertIs(classify(444, site_problem=True), Verdict.SITE_PROBLEM)

    def test_errors(self):
        """DeliveryErrors are classified by flag and code: TLS and AUTH failures are
        site problems, as is a 530 to MAIL FROM that is not flagged; a whole
        message refused with 552 5.3.4 (too big) is permanent, like 554, while
        any other 552 stays temporary."""
        self.assertIs(classify_error(TLSFailed(444, b"handshake")), Verdict.SITE_PROBLEM)
        self.assertIs(classify_error(AuthenticationFailed(535, b"5.7.8 no")), Verdict.SITE_PROBLEM)
        self.assertIs(classify_error(SenderRefused(530, b"5.7.0 auth first")), Verdict.SITE_PROBLEM)
        self.assertIs(classify_error(ConnectionFailed(444, b"refused")), Verdict.TEMPORARY)
        self.assertIs(classify_error(DataRefused(554, b"5.7.1 spam")), Verdict.PERMANENT)
        self.assertIs(classify_error(DataRefused(552, b"5.3.4 too big")), Verdict.PERMANENT)
        self.assertIs(classify_error(SenderRefused(552, b" 5.3.4 too big")), Verdict.PERMANENT)
        self.assertTrue(DataRefused(552, b"5.3.4 too big").permanent)
        self.assertIs(classify_error(DataRefused(552, b"4.2.2 storage")), Verdict.TEMPORARY)
        self.assertFalse(DataRefused(552, b"4.2.2 storage").permanent)
        self.assertIs(classify(552), Verdict.TEMPORARY)  # one recipient's 552

    def test_bad_input(self):
        """A code that is not an int, or an error without one, is a TypeError."""
        self.assertRaises(TypeError, classify, "550")
        self.assertRaises(TypeError, classify, True)
        self.assertRaises(TypeError, classify_error, ValueError("x"))


class BackoffTests(SynchronousTestCase):
    def test_doubles_from_min_to_max(self):
        """Without jitter the delays are Postfix's: 300, 600, 1200, 2400, then 4000 for ever."""
        delays = [
            backoff(n, min_backoff=300, max_backoff=4000, random=random.Random(1), jitter=0)
            for n in range(1, 8)
        ]
        self.assertEqual(delays, [300, 600, 1200, 2400, 4000, 4000, 4000])

    def test_jitter_spreads_within_bounds(self):
        """With jitter, delays for the same attempt differ but stay within 25% of the
        nominal delay and within min..max."""
        rng = random.Random(7)
        first = [backoff(1, min_backoff=300, max_backoff=4000, random=rng) for _ in range(200)]
        self.assertGreater(len(set(first)), 150)
        self.assertTrue(all(300 <= d <= 375 for d in first))
        third = [backoff(3, min_backoff=300, max_backoff=4000, random=rng) for _ in range(200)]
        self.assertTrue(all(900 <= d <= 1500 for d in third))
        late = [backoff(40, min_backoff=300, max_backoff=4000, random=rng) for _ in range(200)]
        self.assertTrue(all(3000 <= d <= 4000 for d in late))
        self.assertGreater(len(set(late)), 150)

    def test_injected_random_makes_it_repeatable(self):
        """The same seed gives the same delays."""
        a = [
            backoff(n, min_backoff=300, max_backoff=4000, random=random.Random(3))
            for n in range(1, 6)
        ]
        b = [
            backoff(n, min_backoff=300, max_backoff=4000, random=random.Random(3))
            for n in range(1, 6)
        ]
        self.assertEqual(a, b)

    @given(st.integers(1, 10_000), st.floats(1, 1e5), st.floats(1, 1e5), st.floats(0, 0.99))
    def test_always_between_min_and_max(self, attempt, low, high, jitter):
        """Whatever the attempt and settings, the delay is within min..max."""
        low, high = min(low, high), max(low, high)
        delay = backoff(
            attempt, min_backoff=low, max_backoff=high, random=random.Random(0), jitter=jitter
        )
        self.assertTrue(low <= delay <= high)

    def test_bad_attempt(self):
        """Attempts count from 1."""
        self.assertRaises(
            ValueError, backoff, 0, min_backoff=1, max_backoff=2, random=random.Random()
        )


class NextAttemptTests(SynchronousTestCase):
    def kwargs(self):
        return dict(
            retry_period=3600, min_backoff=300, max_backoff=4000, random=random.Random(5), jitter=0
        )

    def test_first_failure_counts_from_now(self):
        """Without a first attempt time the period starts now."""
        self.assertEqual(next_attempt_at(1000, 1, None, **self.kwargs()), 1300)

    def test_last_retry_lands_on_the_deadline(self):
        """A retry that would fall after the deadline happens at the deadline."""
        self.assertEqual(next_attempt_at(1000 + 3500, 5, 1000, **self.kwargs()), 1000 + 3600)

    def test_gives_up_at_the_deadline(self):
        """At or after first attempt + retry_period: None (give up)."""
        self.assertIsNone(next_attempt_at(1000 + 3600, 6, 1000, **self.kwargs()))
        self.assertIsNone(next_attempt_at(1000 + 9999, 6, 1000, **self.kwargs()))

    def test_policy(self):
        """RetryPolicy checks its settings and applies the same functions."""
        policy = RetryPolicy(retry_period=3600, min_backoff=300, max_backoff=4000, jitter=0)
        self.assertEqual(policy.backoff(2, random.Random()), 600)
        self.assertEqual(policy.next_attempt_at(0, 1, None, random.Random()), 300)
        for bad in (
            dict(min_backoff=0),
            dict(min_backoff=500, max_backoff=400),
            dict(retry_period=-1),
            dict(jitter=1),
            dict(max_backoff=float("inf")),
            dict(min_backoff="300"),
        ):
            with self.assertRaises(ValueError, msg=bad):
                RetryPolicy(**bad)
