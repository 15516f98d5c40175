"""Split a py-spy raw profile (`py-spy record --threads [--gil] --native -f raw`) of the writer into the parts
of a chunk's job: ms per chunk at the sampling rate.

    python -m benchmarks.profile_split PROFILE.txt --rate 250 --chunks 245
"""
from __future__ import annotations

import argparse
import collections
import re

# (part, any of these in a frame): a stack counts for the first part, in this order, that any of its frames names
PARTS = [
    ("waiting (idle: queues, locks, epoll)", ("SimpleQueue_get", "acquire_lock", "epoll_wait", "select_epoll",
                                                "Condition.wait", "pthread_cond_wait")),
    ("CRC32C", ("crc32c",)),
    ("Zstd", ("ZSTD_", "zstd_compress", "Zstd.encode", "compress")),
    ("SHA-256", ("sha256", "SHA256", "chunk_records")),
    ("statistics", ("first_view_predictions", "Statistics.add", "half_to_float", "bin_of")),
    ("corpus entries (ids + digests)", ("corpus_entries", "ids_bytes")),
    ("ids codec (VLen UTF-8)", ("vlen", "VLen")),
    ("file writes (open, write, rename, mkdir)", ("_put", "_atomic_write", "os_write", "os_rename", "os_mkdir",
                                                 "Path.mkdir", "os_replace", "write_bytes", "BufferedWriter")),
    ("chunk_io copies and glue", ("encode_chunk", "ChunkWriter")),
    ("progress commits (root zarr.json)", ("StoreWriter._commit",)),
    ("benchmark's synthetic rows", ("Rows.batch",)),
    ("buffering (concat, take)", ("concat_rows", "take_rows", "Rows.concat", "Rows.take")),
    ("zarr: small arrays (codec pipeline, setitem)", ("codec_pipeline", "write_batch", "_set_selection",
                                                      "__setitem__", "set_basic_selection", "zarr")),
    ("event loop, thread hand-offs", ("BaseEventLoop", "run_in_executor", "Future.set_result", "_WorkItem",
                                      "sync", "Queue.put", "sem_post", "Condition.notify")),
    ("start-up (imports, open_writer, rmtree)", ("_load_unlocked", "_find_and_load", "rmtree", "open_writer",
                                                 "torch::", "c10::", "_GLOBAL__sub_I", "dataclass", "__cuda")),
    ("garbage collector", ("gc_collect",)),
]


def split(path: str) -> collections.Counter:
    parts: collections.Counter = collections.Counter()
    for line in open(path):
        stack, n = line.rstrip().rsplit(" ", 1)
        frames = [re.sub(r" \(.*?\)$", "", f) for f in stack.split(";")[1:]]
        part = "other"
        if any(k in f for f in frames[-3:] for k in PARTS[0][1]):
            part = PARTS[0][0]  # a thread asleep on a queue, lock or selector (below: libc frames)
        else:  # the first part, in PARTS' order, named anywhere on the stack
            part = next((p for p, keys in PARTS[1:] if any(k in f for f in frames for k in keys)), "other")
        parts[part] += int(n)
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--rate", type=float, default=250)
    ap.add_argument("--chunks", type=int, required=True)
    args = ap.parse_args()
    parts = split(args.profile)
    busy = sum(v for k, v in parts.items() if not k.startswith("waiting"))
    for k, v in parts.most_common():
        ms = 1e3 * v / args.rate / args.chunks
        share = "" if k.startswith("waiting") else f"{100 * v / busy:5.1f}%"
        print(f"{k:48} {v:7d} {ms:8.2f} ms/chunk {share}")


if __name__ == "__main__":
    main()
