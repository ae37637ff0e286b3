"""A whole policy in a few lines, written against the strategy document alone (no SpecServe code):
publish a fixed mode every half second until stopped. Usage: minimal_policy.py REDIS_URL MODE K."""

import json
import sys
import time

import redis

url, mode, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = redis.Redis.from_url(url)
version = int(time.time())  # later runs publish higher versions
while True:
    version += 1
    doc = {"mode": mode, "static_k": k, "version": version, "policy": "minimal", "issued_at": time.time(), "ttl_s": 5}
    client.set("specserve:strategy", json.dumps(doc))
    client.publish("specserve:strategy:updates", str(version))
    time.sleep(0.5)
