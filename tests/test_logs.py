"""The JSON log observer, and how ``twistd mailrelay`` installs it for ``[log] format = json``."""

from __future__ import annotations

import io
import json
import os
import signal
import sys

from twisted.application import service
from twisted.logger import ILogObserver, Logger, LogPublisher, eventsFromJSONLogFile
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import logs
from mailrelay.tap import StartupFailed, _Guarded, json_log_observer
from tests.support import temp_dir


class JSONObserverTests(SynchronousTestCase):
    def emit(self, out, **fields) -> None:
        publisher = LogPublisher(logs.json_observer(out))
        Logger(namespace="mailrelay.test", observer=publisher).info(
            "{message_id} to {count} recipient(s) of {list}", **fields
        )

    def test_one_json_object_per_line(self):
        """Each event is one line of plain JSON (no RS separator) with its fields,
        twisted's log_* keys and log_text, the line the text log would show."""
        out = io.StringIO()
        self.emit(out, event=logs.DEFERRED, message_id="<m@x>", count=2, list="l@x", code=451)
        self.emit(out, event=logs.DELIVERED, message_id="<m@x>", count=1, list="l@x", code=250)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertFalse(out.getvalue().startswith("\x1e"))
        first = json.loads(lines[0])
        self.assertEqual(
            (first["event"], first["message_id"], first["count"], first["code"]),
            ("deferred", "<m@x>", 2, 451),
        )
        self.assertEqual(first["log_text"], "<m@x> to 2 recipient(s) of l@x")
        self.assertEqual(first["log_namespace"], "mailrelay.test")
        self.assertEqual(first["log_level"]["name"], "info")
        self.assertIsInstance(first["log_time"], float)

    def test_read_back_by_twisted(self):
        """twisted.logger's eventsFromJSONLogFile reads the lines back as events."""
        out = io.StringIO()
        self.emit(out, event=logs.QUEUED, message_id="<m@x>", count=3, list="l@x")
        (event,) = eventsFromJSONLogFile(io.StringIO(out.getvalue()))
        self.assertEqual((event["event"], event["count"]), ("queued", 3))

    def test_recipients_listed_bounded(self):
        """listed() keeps the first LISTED_RECIPIENTS addresses, as a list."""
        addresses = [f"m{i}@x" for i in range(50)]
        self.assertEqual(logs.listed(addresses), addresses[: logs.LISTED_RECIPIENTS])
        self.assertEqual(logs.listed(("a@x",)), ["a@x"])

    def test_default_is_standard_output(self):
        """Called with no argument (twistd --logger), it writes to standard output."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = logs.json_observer()
        Logger(observer=observer).info("hello {who}", who="you")
        self.assertEqual(json.loads(out.getvalue())["who"], "you")

    def test_event_names(self):
        """The six stable event names."""
        self.assertEqual(
            logs.EVENTS, ("accepted", "queued", "delivered", "deferred", "failed", "bounced")
        )


class TwistdObserverTests(SynchronousTestCase):
    """json_log_observer() picks the same destination twistd's text log would."""

    def setUp(self):
        self.tmp = temp_dir(self)
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def test_nodaemon_without_logfile_is_stdout(self):
        """-n without --logfile, and --logfile=- with -n, write to standard output."""
        for options in ({"nodaemon": True}, {"nodaemon": True, "logfile": "-"}):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            observer = json_log_observer(options)
            Logger(observer=observer).info("x {n}", n=1)
            self.assertEqual(json.loads(out.getvalue())["n"], 1, options)

    def test_logfile(self):
        """--logfile=PATH gets the JSON lines, and SIGUSR1 rotates it as twistd does."""
        path = os.path.join(self.tmp, "relay.log")
        observer = json_log_observer({"logfile": path, "nodaemon": False})
        self.addCleanup(observer.close)
        Logger(observer=observer).info("x {n}", n=1)
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.loads(f.read())["n"], 1)
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))

    def test_daemon_default_is_twistd_log(self):
        """A daemon without --logfile writes twistd.log in the working directory."""
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.tmp)
        observer = json_log_observer({"nodaemon": False})
        self.addCleanup(observer.close)
        Logger(observer=observer).info("x {n}", n=2)
        with open(os.path.join(self.tmp, "twistd.log"), encoding="utf-8") as f:
            self.assertEqual(json.loads(f.read())["n"], 2)

    def test_logger_option_wins(self):
        """twistd --logger names an observer of its own: nothing is installed."""
        self.assertIsNone(json_log_observer({"logger": logs.json_observer, "nodaemon": True}))

    def test_refusals(self):
        """--syslog, a daemon logging to stdout, and an unwritable file are one-line errors."""
        cases = [
            ({"syslog": True}, "--syslog"),
            ({"logfile": "-", "nodaemon": False}, "standard output"),
            ({"logfile": os.path.join(self.tmp, "missing", "x.log")}, "cannot open the log file"),
        ]
        for options, text in cases:
            with self.assertRaises(StartupFailed) as caught:
                json_log_observer(options)
            self.assertIn(text, caught.exception.reason)

    def test_guarded_service_sets_the_application_observer(self):
        """Added to twistd's Application, the relay sets its ILogObserver
        component, which twistd logs to unless --logger names another."""
        observer = logs.json_observer(io.StringIO())
        application = service.Application("mailrelay")
        _Guarded(service.Service(), True, observer).setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)
        plain = service.Application("mailrelay")
        _Guarded(service.Service(), True).setServiceParent(plain)
        self.assertIsNone(plain.getComponent(ILogObserver))
