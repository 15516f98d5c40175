"""The teacher side: load a teacher (load.py), settle a dump into a job and run it batch by batch
(job.py), in one process (local.py) or under torchrun (distributed.py), and add a teacher to a
finished store (add.py). Nothing outside this package loads a teacher; the trainer never imports it."""
