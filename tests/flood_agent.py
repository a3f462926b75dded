"""A hostile agent that floods its own input subjects as fast as NATS lets it, in its own process.

It holds a real agent credential and publishes only where that credential may (so the server
stores every message), with the cheapest publish there is: a plain publish, no JetStream ack to
wait for, no reply address. Every verb is flooded in turn, so every service that reads agents'
inputs meets it, and every body is malformed, the input each service would otherwise record
(a durable write) one by one. It prints how many messages it sent once it is stopped (SIGTERM)
or has sent `--count`.

    python -m tests.flood_agent NATS_URL AGENT --count N   (password in WARDEN_NATS_PASSWORD)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

from shared import credentials, topology
from shared.sdk import connect_agent

FLUSH_EVERY = 500


async def flood(url: str, agent: str, count: int) -> int:
    nc = await connect_agent(
        url, agent, user=credentials.agent_user(agent), password=os.environ[credentials.PASSWORD_ENV]
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    subjects = [topology.agent_subject(agent, verb) for verb in topology.AGENT_VERBS]
    sent = 0
    print(json.dumps({"started": True}), flush=True)
    try:
        while not stop.is_set() and (count <= 0 or sent < count):
            await nc.publish(subjects[sent % len(subjects)], b"flood %d" % sent)
            sent += 1
            if sent % FLUSH_EVERY == 0:
                await nc.flush(timeout=30)  # back-pressure from the server, nothing more
        await nc.flush(timeout=30)
    finally:
        await nc.close()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("agent")
    parser.add_argument("--count", type=int, default=0, help="stop after this many (0: until SIGTERM)")
    args = parser.parse_args()
    sent = asyncio.run(flood(args.url, args.agent, args.count))
    print(json.dumps({"sent": sent}), flush=True)


if __name__ == "__main__":
    main()
