"""Format: the packed ``.xcz`` file -- bit streams, codecs (each owns its cost and its encode/decode), size
accounting, writer and reader. ``docs/FORMAT.md`` describes the bytes."""
