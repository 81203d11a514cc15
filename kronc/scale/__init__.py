"""Scale-out: compress models larger than memory block by block from their safetensors shards
(`kronc.scale.stream`), and split the work across ``torch.distributed`` ranks
(`kronc.scale.distributed`). See ``docs/scaling.md``.

The shard files themselves (reading a source checkpoint's shards, writing and reading a sharded
kronc save) live in `kronc.serialize.shards`, one layer down from the streaming code that uses them.
"""
