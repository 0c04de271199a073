"""The naive Python outbox poller of issue 16, the reference ferry's drain rate is compared
with (BENCHMARKS.md section 15): SELECT ... FOR UPDATE SKIP LOCKED 500 rows, publish each
with Nats-Msg-Id, await the acks, DELETE, COMMIT; when the outbox is empty, poll every
0.1 s until killed. One connection, no partitions, no leases, no fencing, no CloudEvents
headers. scripts/relay-alone.sh runs it instead of `ferry relay` on the same backlog:

    RELAY_ALONE_NAIVE=1 scripts/relay-alone.sh examples/postgres-nats.toml 200000
"""

import argparse
import asyncio

import nats
import nats.js.errors
import psycopg


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", required=True)
    parser.add_argument("--table", required=True, help="ferry's outbox table, prefix included")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--stream", default="FERRY")
    parser.add_argument("--subject-prefix", default="ferry")
    args = parser.parse_args()
    nc = await nats.connect(args.nats_url)
    js = nc.jetstream()
    try:
        await js.stream_info(args.stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(name=args.stream, subjects=[f"{args.subject_prefix}.>"])
    select = (
        f"SELECT id, aggregate_type, event_type, payload FROM {args.table} "
        "WHERE published_at IS NULL ORDER BY sequence LIMIT 500 FOR UPDATE SKIP LOCKED"
    )
    async with await psycopg.AsyncConnection.connect(args.pg_url) as db:
        while True:  # until killed, as a relay daemon runs
            async with db.transaction():
                rows = await (await db.execute(select)).fetchall()
                await asyncio.gather(*(
                    js.publish(f"{args.subject_prefix}.{kind}.{event.replace('.', '_')}",
                               bytes(payload), headers={"Nats-Msg-Id": str(id_)})
                    for id_, kind, event, payload in rows))
                await db.execute(f"DELETE FROM {args.table} WHERE id = ANY(%s)",
                                 [[row[0] for row in rows]])
            if not rows:
                await asyncio.sleep(0.1)


asyncio.run(main())
