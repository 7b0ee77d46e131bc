"""The programs mailrelay is measured against (run as separate processes)."""
