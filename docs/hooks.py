"""MkDocs hooks (mkdocs.yml `hooks:`) that keep the site in step with the code and the repository.

- The backend capability table of docs/backends.md is built from `sparseball.backends.BACKENDS`
  at build time, in place of the marker `<!-- backend-capability-table -->`: what the table
  says is what `"auto"` and `not_supported_reasons` act on.
- bench/NOTES.md (the tuning history, outside docs/) becomes the unlisted page
  `tuning-notes.md`; links to `../bench/NOTES.md` point to it, and its `../docs/` links are
  made relative to the site, so the same markdown reads right on the site and in the repository.
"""

from __future__ import annotations

import pathlib

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = "<!-- backend-capability-table -->"
TABLE_PAGE = "backends.md"
NOTES = ROOT / "bench" / "NOTES.md"
NOTES_PAGE = "tuning-notes.md"


def capability_table() -> str:
    """A markdown table of `BACKENDS`, in the order `"auto"` tries them."""
    from sparseball.backends import BACKENDS, OPS

    rows = [
        "| backend | devices | dtypes | max head dim | ops | requires | `\"auto\"` tries it |",
        "|---|---|---|---|---|---|---|",
    ]
    auto_rank = 0
    for backend in BACKENDS.values():
        devices = ", ".join(backend.devices)
        if backend.interpreted_devices:
            devices += f" ({', '.join(backend.interpreted_devices)} with `TRITON_INTERPRET=1`)"
        dtypes = ", ".join(str(dtype).removeprefix("torch.") for dtype in backend.dtypes)
        head_dim = "any" if backend.max_head_dim is None else f"<= {backend.max_head_dim}"
        if set(backend.ops) == set(OPS):
            ops = "every op"
        elif not backend.ops:
            ops = "none yet"
        else:
            ops = ", ".join(f"`{op}`" for op in backend.ops)
        requires = ", ".join(f"`{pkg}`" for pkg in backend.requires) or "torch only"
        if backend.in_auto:
            auto_rank += 1
            in_auto = f"yes, {_ordinal(auto_rank)}"
        else:
            in_auto = "no (by name only)"
        rows.append(f"| `{backend.name}` | {devices} | {dtypes} | {head_dim} | {ops} | {requires} "
                    f"| {in_auto} |")
    return "\n".join(rows)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def on_files(files, config):
    files.append(File.generated(config, NOTES_PAGE, content=NOTES.read_text().replace("](../docs/", "](")))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == TABLE_PAGE and MARKER not in markdown:
        raise PluginError(f"docs/{TABLE_PAGE} lost its marker {MARKER}: the capability table has no place")
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, capability_table())
    return markdown.replace("](../bench/NOTES.md", f"]({NOTES_PAGE}")


def on_serve(server, config, builder):
    server.watch(str(NOTES))
    server.watch(str(ROOT / "sparseball" / "backends" / "__init__.py"))
    return server
