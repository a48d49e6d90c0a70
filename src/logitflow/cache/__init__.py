"""The teacher logit cache: codec, shard files, manifest, writer and reader."""
