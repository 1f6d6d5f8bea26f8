"""A sidecar stand-in for the SIGKILL test: an Archive writing numbered records to a real S3 server.

    archive_child.py write ENDPOINT BUCKET PREFIX BUFFER_DIR --count N --tail M \
        --block {before-put,after-put,after-head}
        writes records seq 0..N-1 in batches, calling flush() after each batch and printing `FLUSHED <seq>` (every
        record up to <seq> is durable), then M more records without a flush (`TAIL <last seq>`), then waits to be
        killed. The --block hook holds the uploader inside its second upload (`BLOCKED` once it is there):
        before-put  the object is not in S3 yet;   after-put  it is in S3, not yet confirmed;
        after-head  confirmed, local file not yet deleted.
    archive_child.py drain ENDPOINT BUCKET PREFIX BUFFER_DIR
        a restarted sidecar: opens the same buffer, lets it recover and upload, closes, prints its stats as JSON.
"""

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from otel_cuda.archive import Archive, ArchiveConfig  # noqa: E402
from tests.support.s3_server import ACCESS_KEY, REGION, SECRET_KEY  # noqa: E402

EVENTS = {"before-put": "before-send.s3.PutObject", "after-put": "after-call.s3.PutObject",
          "after-head": "after-call.s3.HeadObject"}


def say(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("write", "drain"))
    for name in ("endpoint", "bucket", "prefix", "buffer_dir"):
        p.add_argument(name)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--tail", type=int, default=50)
    p.add_argument("--block", choices=sorted(EVENTS), default="before-put")
    args = p.parse_args()

    import boto3
    from botocore.config import Config
    client = boto3.client("s3", endpoint_url=args.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY,
                          config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
    config = ArchiveConfig(destination=f"s3://{args.bucket}/{args.prefix}", buffer_dir=args.buffer_dir,
                           rotate_bytes=16384, quota_bytes=64 << 20, flush_seconds=1.0, node="n1", namespace="ns",
                           pod="p1", backoff_initial_seconds=0.05, backoff_max_seconds=0.2, close_timeout_seconds=20)

    if args.mode == "drain":
        archive = Archive(config, s3_client=client)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # recovery runs in the background: wait until nothing is left
            s = archive.stats()
            if s["pending_files"] == 0 and not any(f.endswith(".part") for _, _, fs in os.walk(args.buffer_dir)
                                                   for f in fs):
                break
            time.sleep(0.05)
        archive.close()
        say(json.dumps(archive.stats()))
        return

    uploads = {"n": 0}

    def hold(**kwargs):
        if kwargs.get("event_name", "").startswith(EVENTS[args.block]):
            uploads["n"] += 1
            if uploads["n"] == 2:
                say("BLOCKED")
                threading.Event().wait()  # until SIGKILL

    client.meta.events.register(EVENTS[args.block], hold)
    archive = Archive(config, s3_client=client)
    seq = 0
    while seq < args.count:
        for _ in range(min(50, args.count - seq)):
            # random padding: compressed files fill up and rotate (16 KiB) every few batches
            archive.write({"v": 1, "type": "cuda_api", "ts": time.time_ns(), "mono_ns": time.monotonic_ns(),
                           "pid": os.getpid(), "tid": 1, "func": "cuLaunchKernel", "phase": "entry",
                           "dur_ns": None, "result": None, "args": {"seq": seq, "pad": os.urandom(24).hex()}})
            seq += 1
        archive.flush()
        say(f"FLUSHED {seq - 1}")
    for _ in range(args.tail):
        archive.write({"v": 1, "type": "cuda_api", "ts": time.time_ns(), "pid": os.getpid(), "tid": 1,
                       "func": "cuLaunchKernel", "phase": "entry", "args": {"seq": seq, "pad": os.urandom(24).hex()}})
        seq += 1
    say(f"TAIL {seq - 1}")
    threading.Event().wait()


if __name__ == "__main__":
    main()
