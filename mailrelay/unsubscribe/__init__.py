"""Unsubscribing by URL: the URLs put into ``List-Unsubscribe`` and the web
pages behind them (RFC 8058 one-click, RFC 2369)."""

from mailrelay.unsubscribe.page import UnsubscribePage
from mailrelay.unsubscribe.urls import LIST_SEGMENT, MOUNT, UnsubscribeURLs

__all__ = ["LIST_SEGMENT", "MOUNT", "UnsubscribePage", "UnsubscribeURLs"]
