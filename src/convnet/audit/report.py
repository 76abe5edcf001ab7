"""The audit as a page: `out/index.html` plus `out/thumbs/<n>.png`, readable from disk.

No server, no script, no network: one HTML file with its style inline and relative links to
the thumbnails (the decoded S x S images the audit judged, shown at least 64 px wide). Every
file is written atomically (temporary name, then rename), so a page open in a browser while an
audit runs again is never half-written.
"""

from __future__ import annotations

import html
import io
import os
from pathlib import Path

from PIL import Image

from convnet.audit import FINDINGS, Scan
from convnet.modeldir import write_bytes_atomic, write_json_atomic

REPORT_FILE = "index.html"
FINDINGS_FILE = "findings.json"
THUMBS = "thumbs"
MAX_SHOWN = 300  # entries per kind on the page; findings.json holds them all
TITLES = {
    "unreadable": "Unreadable files (training skips them)",
    "tiny": "Tiny images",
    "grayscale": "Greyscale images",
    "odd_size": "Sizes far from the others'",
    "exact_duplicates": "Exact duplicates (same pixels)",
    "near_duplicates": "Near-duplicates (re-encoded, resized or cropped copies)",
    "leakage": "Leakage: test images copied from training images",
    "label_issues": "Likely mislabelled images",
}
STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;max-width:1200px}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.items{display:flex;flex-wrap:wrap;gap:10px}
.item{border:1px solid #ddd;border-radius:4px;padding:6px;max-width:260px;font-size:12px}
.item img{width:64px;height:64px;image-rendering:pixelated;margin-right:2px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
.name{word-break:break-all}"""


def write_report(out: str | os.PathLike, findings: dict, scan: Scan) -> Path:
    """Write the page, its thumbnails and findings.json into `out`; return the page's path."""
    out = Path(out)
    index = {name: i for i, name in enumerate(scan.names)}
    written: set[int] = set()

    def thumb(name: str) -> str:
        i = index.get(name)
        if i is None:
            return ""
        if i not in written:
            buffer = io.BytesIO()
            Image.fromarray(scan.images[i]).save(buffer, format="PNG")
            write_bytes_atomic(out / THUMBS / f"{i}.png", buffer.getvalue())
            written.add(i)
        return f'<img src="{THUMBS}/{i}.png" alt="{html.escape(name)}">'

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Audit of "
             f"{html.escape(findings['dataset'])}</title><style>{STYLE}</style></head><body>",
             f"<h1>Audit of {html.escape(findings['dataset'])}</h1>",
             f"<p>{findings['images']} readable images. " + ", ".join(
                 f"<a href='#{k}'>{k.replace('_', ' ')}: {findings['summary'][k]}</a>"
                 for k in FINDINGS) + "</p>", _class_table(findings["class_counts"])]
    for kind in FINDINGS:
        items = findings[kind]
        parts.append(f"<h2 id='{kind}'>{TITLES[kind]}: {len(items)}</h2>")
        if kind == "label_issues":
            parts.append(f"<p>{html.escape(_check_note(findings['label_check']))}</p>")
        if len(items) > MAX_SHOWN:
            parts.append(f"<p>The first {MAX_SHOWN}; {FINDINGS_FILE} lists all.</p>")
        parts.append("<div class='items'>")
        for item in items[:MAX_SHOWN]:
            names = item.get("files") or [item[k] for k in ("train", "test", "name") if k in item]
            caption = "<br>".join(f"<span class='name'>{html.escape(n)}</span>" for n in names)
            parts.append(f"<div class='item'>{''.join(thumb(n) for n in names)}<br>{caption}"
                         f"<br>{html.escape(_detail(kind, item))}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    write_json_atomic(out / FINDINGS_FILE, findings)
    page = out / REPORT_FILE
    write_bytes_atomic(page, "\n".join(parts).encode())
    return page


def _class_table(class_counts: dict) -> str:
    counts = class_counts["counts"]
    splits = list(counts)
    classes = list(next(iter(counts.values()))) if counts else []
    rows = "".join(f"<tr><th>{html.escape(c)}</th>" + "".join(
        f"<td>{counts[s][c]}</td>" for s in splits) + "</tr>" for c in classes)
    ratio = "".join(f"<td>{r:.2f}</td>" if r else "<td>-</td>"
                    for r in class_counts["ratio"].values())
    return ("<h2 id='class_counts'>Class counts</h2><table><tr><th></th>"
            + "".join(f"<th>{s}</th>" for s in splits) + f"</tr>{rows}"
            f"<tr><th>largest / smallest</th>{ratio}</tr></table>")


def _check_note(check: dict) -> str:
    if check["skipped"]:
        return f"Label check skipped: {check['skipped']}."
    return (f"Out-of-sample probabilities from {check['folds']}-fold logistic regression on "
            f"{check['features']} (accuracy {check['accuracy']:.3f}); flagged by cleanlab, "
            "least likely label first.")


def _detail(kind: str, item: dict) -> str:
    if kind == "unreadable":
        return item["reason"]
    if kind in ("tiny", "grayscale", "odd_size"):
        return f"{item['width']}x{item['height']}"
    if kind == "label_issues":
        return (f"labelled {item['label']} (p={item['label_probability']:.2f}), looks like "
                f"{item['suggested']} (p={item['suggested_probability']:.2f})")
    if kind == "leakage":
        return f"{item['kind']}, {item['bits']} bits apart"
    return " / ".join(item["classes"]) + (f", {item['bits']} bits apart" if "bits" in item
                                          else "")
