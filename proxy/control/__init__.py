"""The aiohttp control API."""
