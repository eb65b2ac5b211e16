"""Datasets: rows and validation, medical image I/O, converters, the synthetic corpus, datasets, packing.

Modules: ``rows`` (JSONL rows, skip counting), ``validate`` (row checks), ``stats``, ``medical_io`` (the one
image/mask reader), ``converters`` (public layouts -> rows), ``phantoms``/``documents``/``corpus`` (the
synthetic medical corpus), ``synth`` (the minimal phantoms of the demo), ``dataset`` (map-style),
``streaming`` (iterable over shards), ``packing`` and ``collator`` (model batches), ``commands`` (the CLI).
"""
