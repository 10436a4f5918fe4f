"""Outgoing messages: the SMS gateway and SMTP adapters, the log transport, and the message templates."""
