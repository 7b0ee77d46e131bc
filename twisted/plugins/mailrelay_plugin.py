"""twistd plugin: ``twistd mailrelay``.

Kept import-light on purpose: importing twisted.mail or the reactor here would
install the default reactor and break ``twistd -r asyncio mailrelay``.
"""

from twisted.application.service import ServiceMaker

mailrelay = ServiceMaker(
    "mailrelay",
    "mailrelay.tap",
    "Mailing-list relay: LMTP in, durable spool, SMTP out",
    "mailrelay",
)
