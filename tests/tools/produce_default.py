"""Publishes usage events as a Python gateway would, with confluent-kafka's
default settings (its partitioner is librdkafka's `consistent_random`, a
CRC32 of the key, not Kafka's murmur2).

    produce_default.py BOOTSTRAP TOPIC EVENTS_JSONL

Each line of EVENTS_JSONL is {"key": ..., "value": ..., "times": n}: the
message is published n times (a gateway's retries). Prints "sent N" every
1 000 messages, and "done N" once every message was acknowledged.
"""

import json
import sys

from confluent_kafka import Producer

bootstrap, topic, path = sys.argv[1:4]
producer = Producer({"bootstrap.servers": bootstrap})
failed = []


def delivered(err, msg):
    if err is not None:
        failed.append(str(err))


sent = 0
with open(path) as f:
    for line in f:
        e = json.loads(line)
        for _ in range(e["times"]):
            while True:
                try:
                    producer.produce(
                        topic,
                        key=e["key"].encode(),
                        value=e["value"].encode(),
                        headers=[("content-type", b"application/json")],
                        on_delivery=delivered,
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            sent += 1
            producer.poll(0)
            if sent % 1000 == 0:
                print(f"sent {sent}", flush=True)
left = producer.flush(120)
if left or failed:
    print(f"failed: {left} not delivered, errors {failed[:5]}", flush=True)
    sys.exit(1)
print(f"done {sent}", flush=True)
