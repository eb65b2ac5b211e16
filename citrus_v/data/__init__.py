"""Datasets: rows and validation, converters, the synthetic corpus, datasets, packing.

Images and masks are read by :mod:`citrus_v.media`. Modules: ``rows`` (JSONL rows, skip counting),
``validate`` (row checks), ``stats``, ``converters`` (public layouts -> rows),
``phantoms``/``documents``/``corpus`` (the synthetic medical corpus), ``synth`` (the minimal phantoms of the
demo), ``dataset`` (map-style), ``streaming`` (iterable over shards), ``packing`` and ``collator`` (model
batches), ``commands`` (the CLI).
"""
