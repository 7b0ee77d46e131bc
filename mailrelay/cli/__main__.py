"""``python -m mailrelay.cli``: the ``mailrelay`` command without its console script."""

import sys

from mailrelay.cli.entry import main

sys.exit(main())
