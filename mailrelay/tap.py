"""``twistd mailrelay``: command-line options and the service maker."""

from __future__ import annotations

import os

from twisted.python import usage

from mailrelay.config import load_settings
from mailrelay.errors import ConfigurationError


class Options(usage.Options):
    synopsis = "[-C CONFIG]"
    longdesc = (
        "Run the mailrelay LMTP server, spool and delivery runner. Without -C the "
        "file named by $MAILRELAY_CONFIG is read, and without that the embedded "
        "defaults apply (LMTP on 127.0.0.1:8024, spool under ./var, smarthost localhost:25)."
    )
    optParameters = [
        ["config", "C", None, "configuration file (INI)"],
    ]

    def postOptions(self):  # noqa: N802
        path = self["config"] or os.environ.get("MAILRELAY_CONFIG") or None
        try:
            self["settings"] = load_settings(path)
        except ConfigurationError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options):  # noqa: N802
    # The reactor is imported here, never at module level: twistd installs the
    # one chosen with -r before calling us.
    from twisted.internet import reactor

    from mailrelay.service import makeService as make

    return make(options["settings"], reactor)
