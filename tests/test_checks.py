"""Tests for the shared argument checks in :mod:`mailrelay._checks`."""

from __future__ import annotations

import math

from twisted.trial.unittest import SynchronousTestCase

from mailrelay._checks import check_count, check_positive


class CheckCountTests(SynchronousTestCase):
    def test_accepts_ints_from_minimum(self):
        """An int at or above the minimum (default 1) is returned unchanged."""
        self.assertEqual(check_count("n", 1), 1)
        self.assertEqual(check_count("n", 0, 0), 0)
        self.assertEqual(check_count("n", 10**9), 10**9)

    def test_refuses_the_rest(self):
        """Below the minimum, bools, floats and strings fail with one wording naming the argument."""
        for value in [0, -1, True, 1.0, "3", None]:
            with self.subTest(value=value):
                e = self.assertRaises(ValueError, check_count, "max_connections", value)
                self.assertEqual(str(e), f"max_connections must be an int >= 1, not {value!r}")
        e = self.assertRaises(ValueError, check_count, "inline_limit", -1, 0)
        self.assertEqual(str(e), "inline_limit must be an int >= 0, not -1")


class CheckPositiveTests(SynchronousTestCase):
    def test_accepts_positive_numbers(self):
        """A finite int or float above zero is returned unchanged."""
        self.assertEqual(check_positive("t", 0.5), 0.5)
        self.assertEqual(check_positive("t", 3), 3)

    def test_refuses_the_rest(self):
        """Zero, negatives, infinities, NaN, bools and strings fail naming the argument."""
        for value in [0, 0.0, -1, math.inf, math.nan, True, "1"]:
            with self.subTest(value=value):
                e = self.assertRaises(ValueError, check_positive, "timeout", value)
                self.assertEqual(str(e), f"timeout must be greater than zero, not {value!r}")
