"""eventsourcing persistence for Warden: events stored in JetStream.

`jetstream` is the persistence module (`PERSISTENCE_MODULE=shared.persistence.jetstream`);
`bridge` lets its synchronous recorders use the process's one asyncio NATS connection.
"""
