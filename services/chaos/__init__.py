"""`warden chaos`: Jepsen-style faults against a real deployment, then an oracle over the record."""
