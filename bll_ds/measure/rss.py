"""Peak resident set size of this process."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """ru_maxrss, which Linux reports in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
