"""A consumer in Python: reads ferry's CloudEvents from NATS JetStream and applies each one
exactly once, in order per aggregate, through ferry's inbox in PostgreSQL.

For every message, in one database transaction: `<prefix>inbox_admit` records the message
id and says `apply` (new, and newer than the aggregate's last applied version), `duplicate`
or `stale`; only on `apply` does the consumer write its effect. Commit, then ack. A crash
anywhere redelivers the message and the inbox drops what was already applied.

    pip install nats-py psycopg[binary]
    python examples/consumer.py --pg-url postgresql://postgres@127.0.0.1/app \
        --stream FERRY --consumer billing --table billing_events

`ferry migrate` installs `<prefix>inbox_admit` (and the tables it uses) in the consumer's
database; `--table` is created by this script.
"""

import argparse
import asyncio
import json
import uuid

import nats
import psycopg
from psycopg import sql


def event_of(msg):
    """The CloudEvents attributes and data of a JetStream message, in binary or
    structured content mode."""
    headers = msg.headers or {}
    if headers.get("content-type", "").startswith("application/cloudevents+json"):
        event = json.loads(msg.data)
        return event, event.get("data_base64") or json.dumps(event.get("data"))
    event = {name[3:]: value for name, value in headers.items() if name.startswith("ce-")}
    return event, msg.data.decode("utf-8", "replace")


async def consume(args):
    db = await psycopg.AsyncConnection.connect(args.pg_url)
    async with db.transaction():
        await db.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id uuid PRIMARY KEY, aggregate_id text NOT NULL, "
                "version bigint NOT NULL, body text NOT NULL)"
            ).format(sql.Identifier(args.table))
        )
    admit = sql.SQL("SELECT decision, last_version FROM {}(%s, %s, %s, %s, %s)").format(
        sql.Identifier(args.prefix + "inbox_admit")
    )
    record = sql.SQL("INSERT INTO {} (id, aggregate_id, version, body) VALUES (%s, %s, %s, %s)").format(
        sql.Identifier(args.table)
    )
    broker = await nats.connect(args.nats_url)
    js = broker.jetstream()
    # An ephemeral consumer from the stream's start: every message, once per run.
    sub = await js.pull_subscribe(args.subject, durable=None, stream=args.stream)
    counts = {"apply": 0, "duplicate": 0, "stale": 0}
    while True:
        try:
            batch = await sub.fetch(100, timeout=args.idle_secs)
        except nats.errors.TimeoutError:
            break
        for msg in batch:
            event, body = event_of(msg)
            async with db.transaction():
                cursor = await db.execute(
                    admit,
                    (
                        args.consumer,
                        uuid.UUID(event["id"]),
                        event["aggregatetype"],
                        event["subject"],
                        int(event["aggregateversion"]),
                    ),
                )
                decision, _last_version = await cursor.fetchone()
                if decision == "apply":
                    await db.execute(
                        record,
                        (uuid.UUID(event["id"]), event["subject"], int(event["aggregateversion"]), body),
                    )
            counts[decision] += 1
            await msg.ack()
    await broker.close()
    await db.close()
    print(json.dumps(counts))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", required=True)
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--stream", required=True)
    parser.add_argument("--subject", default=">", help="subjects of the stream to read")
    parser.add_argument("--prefix", default="ferry_", help="ferry's table prefix")
    parser.add_argument("--consumer", required=True, help="the inbox's consumer name")
    parser.add_argument("--table", required=True, help="where the effects go")
    parser.add_argument("--idle-secs", type=float, default=2.0, help="stop after this long without messages")
    asyncio.run(consume(parser.parse_args()))


if __name__ == "__main__":
    main()
