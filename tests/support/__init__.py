"""Real local servers that follow a provider's contract, for tests that talk to them over loopback."""
