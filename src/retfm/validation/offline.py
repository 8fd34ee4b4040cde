"""Great Expectations Data Docs that open offline.

Data Docs pages load Bootstrap, jQuery, Font Awesome, bootstrap-table and Vega from public CDNs;
on a hospital research network without internet they render as unstyled text with every
collapsed section hidden. After each build, every page is rewritten to need nothing from the
network: the remote ``<link>`` and ``<script>`` tags are removed and one small stylesheet,
bundled here, styles what the pages use (cards, tables, badges, navigation) and shows what
Bootstrap's JavaScript would have expanded on a click. Search, sorting and filtering of the
tables, which those scripts provided, are what is lost; every number stays on the page.
"""

from __future__ import annotations

import re
from pathlib import Path

_REMOTE_TAG = re.compile(
    r"<(?:link|script|img)\b[^>]*(?:href|src)\s*=\s*[\"']https?://[^\"']*[\"'][^>]*>"
    r"(?:\s*</script>)?",
    re.IGNORECASE,
)
_LOADS = re.compile(
    r"<(?:link|script|img|iframe)\b[^>]*(?:href|src)\s*=\s*[\"'](https?://[^\"']+)",
    re.IGNORECASE,
)
MARKER = "retfm-offline"
STYLE = f"""<style id="{MARKER}">
body{{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#212529;
background:#fff;line-height:1.4;font-size:14px}}
.container-fluid,.container{{padding:0 1.2em;max-width:1400px}}
nav,.navbar{{background:#f1f3f5;padding:.5em 1em;border-bottom:1px solid #ddd}}
a{{color:#0b5ed7}} h1,h2,h3,h4,h5{{margin:.6em 0 .3em}}
.row{{display:flex;flex-wrap:wrap;gap:1em}} .col,[class*="col-"]{{flex:1 1 300px;min-width:0}}
.card{{border:1px solid #ddd;border-radius:4px;margin:.6em 0;background:#fff}}
.card-header{{background:#f8f9fa;padding:.4em .8em;border-bottom:1px solid #ddd;font-weight:600}}
.card-body{{padding:.6em .8em;overflow-x:auto}}
table{{border-collapse:collapse;margin:.4em 0;max-width:100%;display:block;overflow-x:auto}}
td,th{{border:1px solid #ddd;padding:3px 8px;vertical-align:top;text-align:left}}
th{{background:#f3f3f3}} .table-striped tr:nth-child(even) td{{background:#fafafa}}
.badge{{display:inline-block;padding:1px 6px;border-radius:8px;font-size:85%;background:#e9ecef}}
.badge-success,.text-success{{color:#0f5132}} .badge-success{{background:#d1e7dd}}
.badge-danger,.text-danger{{color:#842029}} .badge-danger{{background:#f8d7da}}
.collapse,.dropdown-menu,.tab-pane{{display:block!important}} .d-none{{display:none}}
.fas,.far,.fa{{display:none}} code,pre{{background:#f6f8fa;padding:1px 4px;white-space:pre-wrap}}
.alert{{padding:.5em 1em;border:1px solid #ddd;background:#fff8e1;margin:.5em 0}}
.retfm-offline-note{{color:#555;font-size:12px;margin:.4em 1.2em}}
</style>"""
NOTE = (
    f'<p class="{MARKER}-note">Offline copy: styles bundled by retfm; search, sorting and '
    "charts of the online version are not available.</p>"
)


def make_offline(html: str) -> str:
    """One Data Docs page without remote assets, with the bundled stylesheet (idempotent)."""
    if MARKER in html:
        return _REMOTE_TAG.sub("", html)
    html = _REMOTE_TAG.sub("", html)
    html = re.sub(r"</head>", STYLE + "</head>", html, count=1, flags=re.IGNORECASE)
    return re.sub(r"(<body[^>]*>)", r"\1" + NOTE, html, count=1, flags=re.IGNORECASE)


def remote_assets(html: str) -> list[str]:
    """The network addresses a page still loads (what an offline browser cannot fetch;
    plain links a reader may follow are not loads)."""
    return _LOADS.findall(html)


def make_site_offline(folder: Path) -> int:
    """Rewrite every page of a Data Docs site in place; returns how many were rewritten."""
    count = 0
    for page in Path(folder).rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        new = make_offline(text)
        if new != text:
            page.write_text(new, encoding="utf-8")
            count += 1
    return count
