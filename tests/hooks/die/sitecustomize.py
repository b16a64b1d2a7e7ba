"""Test hook, on PYTHONPATH only for test_distributed's killed run: rank 0 dies (os._exit, as a kill -9 would
leave it) when it is about to record epoch LESIONLAB_TEST_DIE_AT_EPOCH, after the resume state of the epoch
before was written."""

import os

if os.environ.get("LESIONLAB_TEST_DIE_AT_EPOCH") and os.environ.get("RANK", "0") == "0":
    from lesionlab.runs import RunFolder

    _die_at = int(os.environ["LESIONLAB_TEST_DIE_AT_EPOCH"])
    _real = RunFolder.write_history

    def _dies(run, rows, fields):
        if len(rows) >= _die_at:
            os._exit(9)
        _real(run, rows, fields)

    RunFolder.write_history = _dies  # type: ignore[method-assign]
