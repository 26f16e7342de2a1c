"""Generated answers on disk: a one-record dataset, an HTML page and a Markdown file.

    paths = save_output(record, "out/answer")   # {"dataset": ..., "html": ..., "markdown": ...}

    out/answer/manifest.json, shards/part-00000.jsonl, images/xx/<sha256>.png   (DatasetWriter)
    out/answer/answer.html                                                       (view.py's chat page)
    out/answer/answer.md                                                         (text + ![image](...))

Design choices:
- The output IS a dataset (DESIGN section 3: one format everywhere), so `duetgen data view`,
  `duetgen eval` and the Parquet export read generated answers like any other records.
- The HTML reuses ``duetgen.data.view`` (same escaping, same look as the dataset viewer), with the
  generation settings shown under the chat; images are linked relative to the page.
- Written atomically: the dataset by ``DatasetWriter`` (a fresh directory; an existing output is
  an error unless ``overwrite``), the pages by ``atomic_write_bytes``.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from duetgen.data.dataset import IMAGE_DIR, MANIFEST, SHARD_DIR, Dataset, DatasetWriter, atomic_write_bytes
from duetgen.data.record import ImagePart, Record, TextPart
from duetgen.data.view import dataset_image_src, page_html, render_record_html

HTML_NAME = "answer.html"
MARKDOWN_NAME = "answer.md"


def record_markdown(record: Record) -> str:
    """The conversation as Markdown: one section per message, images as ``![image k](path)``."""
    lines = [f"# {record.id}", ""]
    k = 0
    for m in record.messages:
        lines += [f"**{m.role}**", ""]
        for p in m.content:
            if isinstance(p, TextPart):
                lines += [p.text, ""]
            elif isinstance(p.image, str):
                k += 1
                lines += [f"![image {k}]({quote(p.image)})", ""]
    return "\n".join(lines)


def _output_files(out: Path) -> set[Path] | None:
    """The files ``save_output`` wrote in ``out`` (a one-record dataset named "generation ..." beside its answer
    page: a dataset's manifest alone is not enough); None when ``out`` is not such a folder."""
    try:
        ds = Dataset(out)  # (the bounded, checked manifest reader)
        m = ds.manifest
        if not (str(m.get("name") or "").startswith("generation ") and m.get("num_records") == 1
                and (out / HTML_NAME).is_file()):
            return None
        (record,) = list(ds)
    except (OSError, ValueError):
        return None
    return ({out / MANIFEST, out / HTML_NAME, out / MARKDOWN_NAME, out / ".writer.lock"}
            | {out / shard for shard in ds.shards}
            | {out / p.path for msg in record.messages for p in msg.content if isinstance(p, ImagePart)})


def foreign_files(out: Path) -> list[Path] | None:
    """What in ``out`` an earlier ``save_output`` did not write (a user's notes, another image, a folder or a link
    of theirs): ``overwrite`` replaces the folder only when this is empty. None when ``out`` holds no earlier
    output at all."""
    mine = _output_files(out)
    return None if mine is None else _not_in(mine, out)


def _not_in(mine: set[Path], out: Path) -> list[Path]:
    """Every file, folder and link under ``out`` that is not one of ``mine`` (nor a folder holding them)."""
    own_dirs = {out / SHARD_DIR, out / IMAGE_DIR} | _folders_of(mine, out)
    found = []
    for d, dirs, files in os.walk(out):  # (a link to a folder is listed in dirs, never followed)
        found += [Path(d) / x for x in dirs if (Path(d) / x).is_symlink() or Path(d) / x not in own_dirs]
        found += [Path(d) / x for x in files if Path(d) / x not in mine]
    return sorted(found)


def _folders_of(files: set[Path], out: Path) -> set[Path]:
    return {q for p in files for q in p.parents if q != out and q.is_relative_to(out)}


def _remove_output(mine: set[Path], out: Path) -> None:
    """Delete exactly ``mine``, what ``save_output`` wrote in ``out`` (so ``--out .`` works and nothing else goes):
    its files, then the folders holding them that this left empty, deepest first."""
    for path in mine:
        path.unlink(missing_ok=True)
    for folder in sorted(_folders_of(mine, out), key=lambda q: -len(q.parts)):
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()


def save_output(record: Record, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """Store ``record`` (in-memory images allowed) as a one-record dataset with HTML and Markdown views."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; choose a new --out or pass overwrite")
        mine = _output_files(out)
        if mine is None:
            raise FileExistsError(f"{out} is not an earlier output of duetgen generate; refusing to replace it")
        foreign = _not_in(mine, out)
        if foreign:
            raise FileExistsError(f"{out} holds files duetgen generate did not write ({foreign[0]}"
                                  f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); refusing to "
                                  "replace it")
        _remove_output(mine, out)
    with DatasetWriter(out, name=f"generation {record.id}") as writer:
        writer.write(record)  # stores PIL images as PNG and replaces them by their paths
    ds = Dataset(out)
    stored = next(iter(ds))
    body = render_record_html(stored, dataset_image_src(ds, out))
    images = sum(isinstance(p, ImagePart) for m in stored.messages if m.role == "assistant" for p in m.content)
    subtitle = f"{stored.meta.get('model', '?')} · {images} image(s) · {stored.meta.get('finish_reason', '?')}"
    html_path, md_path = out / HTML_NAME, out / MARKDOWN_NAME
    atomic_write_bytes(html_path, page_html(f"DuetGen answer {stored.id}", body, subtitle=subtitle).encode())
    atomic_write_bytes(md_path, record_markdown(stored).encode())
    return {"dataset": out, "html": html_path, "markdown": md_path, "record": stored}


# ============================================================================ live terminal view
def print_live(events, console=None):
    """Show an answer as it is generated: the text streams in, each image gets a progress bar.

    ``events``: an iterator of engine events (``DuetGenPipeline.stream``). Returns the final
    ``Finished`` event. Used by ``duetgen generate``; writes to stderr so stdout stays for paths.
    """
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    from duetgen.infer.engine import DenoisingStep, Finished, ImageDone, ImageStarted, TextDelta

    console = console or Console(stderr=True)
    text = Text()
    bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                    TimeElapsedColumn(), console=console)
    tasks: dict[int, int] = {}
    finished = None
    with Live(Group(text, bars), console=console, refresh_per_second=10, transient=False) as live:
        for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, ImageStarted):
                text.append(f"\n[image {event.index + 1}: {event.width}x{event.height}]\n", style="bold magenta")
                tasks[event.index] = bars.add_task(f"image {event.index + 1}", total=None)
            elif isinstance(event, DenoisingStep):
                bars.update(tasks[event.index], completed=event.step, total=event.num_steps)
            elif isinstance(event, ImageDone):
                bars.update(tasks[event.index], description=f"image {event.index + 1} done ({event.seconds:.2f} s)")
            elif isinstance(event, Finished):
                finished = event
            live.update(Group(text, bars))
    return finished
