"""A small document model rendered twice: Markdown (figures linked by file name) and self-contained HTML
(figures embedded as base64 PNG data URIs). Text may use `code` and **bold**, nothing else.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Document:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", items))

    def table(self, frame: pd.DataFrame) -> None:
        """`frame` holds display strings already (see `display`)."""
        self.blocks.append(("table", frame))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("figure", Path(path), caption))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += ["#" * block[1] + " " + block[2], ""]
            elif kind == "paragraph":
                out += [block[1], ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in block[1]] + [""]
            elif kind == "table":
                out += _markdown_table(block[1]) + [""]
            elif kind == "figure":
                out += [f"![{block[2]}]({block[1].name})", "", f"*{block[2]}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{_inline(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                body.append(f"<h{block[1]}>{_inline(block[2])}</h{block[1]}>")
            elif kind == "paragraph":
                body.append(f"<p>{_inline(block[1])}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                body.append(_html_table(block[1]))
            elif kind == "figure":
                data = base64.b64encode(block[1].read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{_inline(block[2])}</figcaption></figure>")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}"
                f"</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1250px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0 1.4em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0 2em; } img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #555; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _inline(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    header = "| " + " | ".join(_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    return [header, rule] + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
