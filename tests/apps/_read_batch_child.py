"""Run ``read_batch`` on each file named in ``argv`` in this fresh process and print, per file, a
JSON line: the error's type and message, the seconds taken and how far the peak RSS rose.

A crafted pickle that crashes the reader (a segfault) or hangs it then fails the parent's test
instead of killing the test run."""

from __future__ import annotations

import json
import resource
import sys
import time

from esper_async.apps.cifar import read_batch


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    for path in sys.argv[1:]:
        before, start = _peak_mib(), time.perf_counter()
        try:
            read_batch(path)
            error, message = None, ""
        except Exception as exc:  # reported to the parent, which asserts on it
            error, message = type(exc).__name__, str(exc)
        print(
            json.dumps(
                {
                    "path": path,
                    "error": error,
                    "message": message[:1000],
                    "seconds": time.perf_counter() - start,
                    "rss_rise_mib": _peak_mib() - before,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
