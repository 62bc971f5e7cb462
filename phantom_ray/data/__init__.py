"""Corpora in object storage: layout readers, the synthetic shapes corpus, resumable packing into
parquet shards, and the Ray Data training input pipeline.

- ``phantom_ray.data.synth.synthesize(output, num_samples, layout, seed)``  (``phantom-ray data synth``)
- ``phantom_ray.data.pack.pack(input, layout, output, image_root, shard_size_mb)``  (``phantom-ray data pack``)
- ``phantom_ray.data.pipeline.DataConfig`` / ``build_train_dataset`` / ``iter_train_batches``
- the packed row schema and error reasons: ``phantom_ray.data.schema``

Submodules import Ray lazily; importing this package does not import Ray.
"""
