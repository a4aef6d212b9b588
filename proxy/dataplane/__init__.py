"""The data plane: mitmproxy addons that adapt, decide, act, record and observe every exchange."""
