"""List processing without storage: the pure building blocks of issue 12.

Each module has one job and works on bytes and frozen values only (no
storage, no reactor, no sending); the routing and storage layers call them:

* :mod:`~mailrelay.listproc.commands` — commands in ``-request`` mail, and
  owners' decisions in replies to held-post notices;
* :mod:`~mailrelay.listproc.safety` — may this mail be answered at all
  (loops, backscatter, the per-day cap);
* :mod:`~mailrelay.listproc.bounces` — who a bounce says failed (VERP,
  RFC 3464, flufl.bounce);
* :mod:`~mailrelay.listproc.tokens` — confirmation and one-click
  unsubscribe tokens, and the site secret;
* :mod:`~mailrelay.listproc.templating` — reply texts, operator overrides first;
* :mod:`~mailrelay.listproc.replies` — the messages mailrelay writes.
"""
