"""Channels: the sender's pumps and the receiver's listener and jobs."""
