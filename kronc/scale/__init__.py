"""Scale-out: compress models larger than memory block by block from their safetensors shards
(`kronc.scale.stream`), and split the work across ``torch.distributed`` ranks
(`kronc.scale.distributed`). See ``docs/scaling.md``.

Nothing is imported here eagerly: `kronc.serialize` reads sharded saves through `kronc.scale.shards`,
which must not pull in the streaming code (that imports `serialize`).
"""
