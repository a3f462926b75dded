"""`warden demo`: a fleet of agents, some failing by design, governed end to end."""
