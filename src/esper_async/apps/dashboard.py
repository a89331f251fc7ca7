"""The growth dashboard: one self-contained HTML page per run directory.

The page embeds uPlot (MIT, ``assets/uPlot.LICENSE``), its own script (``assets/dashboard.js``)
and the run's data as JSON, and loads nothing: it opens offline from a file. It shows, per run of
the trace, training/validation loss and accuracy over epochs (static and growth runs overlaid),
the parameter count, growth events marked on the curves with their full reasons, one lifecycle
lane per seed slot coloured by state, selector choices with arm values, compiles per worker
process and kernel-store hits and misses. See :mod:`.dashboard_data` for where each figure comes
from.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from importlib import resources
from typing import Final

from ..telemetry import SpanRecord
from .dashboard_data import dashboard_data

__all__ = ("render_dashboard",)

_CSS: Final = """
body{font:13px/1.45 system-ui,sans-serif;margin:1.2em 2em;color:#222;max-width:1200px}
h1{font-size:19px;margin-bottom:.2em}
h2{font-size:16px;margin-top:1.8em;border-bottom:1px solid #ccc}
h3{font-size:13px;margin:1.2em 0 .3em}.meta{color:#666;font-size:12px}
.chart{margin:.6em 0}
.lane{display:flex;align-items:center;height:20px;margin:2px 0}
.lane-label{width:9em;flex:none;font-family:monospace;font-size:12px}
.track{position:relative;flex:1;height:16px;background:#f4f4f4}
.seg{position:absolute;top:0;height:16px}
.chip{display:inline-block;padding:0 6px;margin:0 4px 4px 0;border-radius:2px;font-size:12px}
table{border-collapse:collapse;font-size:12px;margin:.3em 0}
td,th{border-bottom:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
td{white-space:nowrap}td:last-child{white-space:normal}
#esper-errors{color:#b00;white-space:pre-wrap}
"""


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def _script_json(data: object) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>``, no HTML comment openers)."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_dashboard(
    records: Sequence[SpanRecord],
    *,
    title: str = "esper_async run",
    refresh_s: float | None = None,
) -> str:
    """The dashboard page of a run's spans.

    :param records: every span of the run directory.
    :param title: the page title.
    :param refresh_s: when set, the page reloads itself every this many seconds (for a run that
        is still going; ``esper-async trace --watch`` rewrites the file meanwhile).
    :returns: the HTML document.
    """
    esc = html.escape
    runs = dashboard_data(records)
    payload = {"title": title, "runs": [run.to_json() for run in runs]}
    refresh = (
        f"<meta http-equiv='refresh' content='{max(int(refresh_s), 1)}'>"
        if refresh_s is not None
        else ""
    )
    processes = len({r.resource.get("process.pid") for r in records})
    summary = (
        f"{len(records)} spans, {len({r.trace_id for r in records})} trace(s), "
        f"{processes} process(es); runs: {', '.join(esc(r.label) for r in runs) or 'none'}"
    )
    return "\n".join(
        [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            refresh,
            f"<title>{esc(title)}</title>",
            f"<style>{_asset('uPlot.min.css')}</style><style>{_CSS}</style></head>",
            "<body data-status='loading'>",
            f"<h1>{esc(title)}</h1><p class='meta'>{summary}</p>",
            "<pre id='esper-errors' hidden></pre>",
            "<div id='charts'></div>",
            "<h2>Growth events (numbered on the curves)</h2><div id='events'></div>",
            "<h3>Lifecycle states</h3><div id='legend'></div>",
            "<div id='runs'></div>",
            "<pre id='esper-drawn' hidden></pre>",
            f"<script id='esper-data' type='application/json'>{_script_json(payload)}</script>",
            f"<script>{_asset('uPlot.iife.min.js')}</script>",
            f"<script>{_asset('dashboard.js')}</script>",
            "</body></html>",
        ]
    )
