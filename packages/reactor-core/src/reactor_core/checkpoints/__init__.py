"""Checkpoints on disk and their remote mirror; nothing here knows about models or loops.

    store.py   the on-disk format of one checkpoint, LocalCheckpointStore (atomic save,
               verify, retention), sharded tensor files
    remote.py  the mirror: gs:// (google-cloud-storage) or a directory; parallel uploads
               with the COMPLETE marker last, verified downloads

What a recipe saves into a checkpoint, and when, is `reactor_core.training.checkpointing`.
"""
