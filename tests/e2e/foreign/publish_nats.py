"""Publishes a Keptn-style sequence trigger to NATS the way a non-Capstan producer would: built with
the CloudEvents Python SDK, sent in structured mode with nats-py. Usage:
publish_nats.py NATS_URL SUBJECT PROJECT EVENT_ID"""
import asyncio
import sys

import nats
from cloudevents.conversion import to_structured
from cloudevents.http import CloudEvent


async def main(url: str, subject: str, project: str, event_id: str) -> None:
    event = CloudEvent(
        {
            "type": "sh.keptn.event.dev.delivery.triggered",
            "source": "python-pipeline",
            "id": event_id,
            "shkeptncontext": "python-context-1",
        },
        {"project": project, "service": "carts", "image": "carts:9.9.9"},
    )
    headers, body = to_structured(event)
    conn = await nats.connect(url)
    await conn.publish(subject, body, headers={k: str(v) for k, v in headers.items()})
    await conn.flush()
    await conn.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
