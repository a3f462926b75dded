"""`warden bench`: Warden's figures next to raw JetStream's, measured on one server in one run."""
