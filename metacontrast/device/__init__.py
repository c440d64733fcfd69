"""Runs on a lent GPU host without network: what to carry there (:mod:`.packer`) and how its runs come back
into the grid's MLflow store (:mod:`.importer`).  The entry script that runs there is ``scripts/device_entry.py``;
``docs/device.md`` gives the whole round trip."""
