"""vienna-sdk: submit intents to a Vienna sidecar, wait for approval, execute or report; an httpx
transport that turns passbacks into a bounded wait and one retry with the warrant."""

from vienna_sdk.client import Answer, AsyncVienna, Denied, Expired, Vienna, ViennaError, WaitTimeout
from vienna_sdk.transport import AsyncWarrantTransport, WarrantTransport

__all__ = [
    "Answer",
    "AsyncVienna",
    "AsyncWarrantTransport",
    "Denied",
    "Expired",
    "Vienna",
    "ViennaError",
    "WaitTimeout",
    "WarrantTransport",
]
__version__ = "0.1.0"
