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
import shutil
from pathlib import Path
from urllib.parse import quote

from duetgen.data.dataset import Dataset, DatasetWriter, atomic_write_bytes
from duetgen.data.record import ImagePart, Record, RecordError, TextPart
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


def is_earlier_output(out: Path) -> bool:
    """Whether ``out`` holds what ``save_output`` wrote (a one-record dataset named "generation ..." beside its
    answer page): only such a folder is replaced on ``overwrite`` (a dataset's manifest alone is not enough)."""
    try:
        m = Dataset(out).manifest  # (the bounded, checked manifest reader)
    except (OSError, RecordError):
        return False
    return str(m.get("name") or "").startswith("generation ") and m.get("num_records") == 1 and (out / HTML_NAME).is_file()


def save_output(record: Record, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """Store ``record`` (in-memory images allowed) as a one-record dataset with HTML and Markdown views."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; choose a new --out or pass overwrite")
        if not is_earlier_output(out):
            raise FileExistsError(f"{out} is not an earlier output of duetgen generate; refusing to replace it")
        shutil.rmtree(out)
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
