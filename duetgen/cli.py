"""The one `duetgen` command. Sub-commands import their heavy modules lazily so `--help` is fast.

Each area adds its commands here as thin functions that parse options and call library code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer


def out_path(value) -> Path:
    """``--out`` as a Path, refusing an empty value: typer turned ``--out ""`` into ``.``, and the command wrote into
    the current folder."""
    if isinstance(value, Path):
        return value
    if not str(value).strip():
        raise typer.BadParameter("is empty: give a path (. for the current folder)")
    return Path(value)

app = typer.Typer(
    help="DuetGen: interleaved text-and-image generation (an MLLM writes, a video DiT draws).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Build, convert and view interleaved datasets.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate interleaved outputs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
train_app = typer.Typer(help="Train DuetGen: stage 1 (MLLM) and stage 2 (connector + DiT).", no_args_is_help=True)
app.add_typer(train_app, name="train")
model_app = typer.Typer(help="Build, assemble and check DuetGen model directories.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def fail(msg: str) -> None:
    """Print a clear error and exit 2 (bad input), without a traceback."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


# ----------------------------------------------------------------------------- what several commands share

# The nine flags of a generation, declared once: `generate` and `eval generate` take all nine, `train eval-toy` three.
# parameter -> (default, flag, bounds, help); a command words the help its own way where it says more.
_GENERATION_OPTIONS = {
    "seed": (0, "--seed", {"min": 0, "max": 2**63 - 1}, "Seed of token sampling and image noise."),
    "steps": (None, "--steps", {"min": 1}, "Sampler steps per image (default: the model's)."),
    "guidance": (None, "--guidance", {}, "Guidance scale w (1 = none; default: the model's)."),
    "temperature": (0.0, "--temperature", {"min": 0.0}, "0 = greedy."),
    "top_p": (1.0, "--top-p", {}, "Nucleus sampling mass in (0, 1]."),
    "max_new_tokens": (512, "--max-new-tokens", {"min": 1}, "Sampled tokens (text and <BOV>)."),
    "max_images": (None, "--max-images", {"min": 0}, "Generated images at most."),
    "image_size": (None, "--image-size", {}, "HEIGHTxWIDTH of generated images (default: the model's)."),
    "device": ("cpu", "--device", {}, "cpu, cuda, cuda:1 ..."),
}


def _generation_option(name: str, help: Optional[str] = None):
    """The typer option of generation flag ``name`` (a key of ``_GENERATION_OPTIONS``), with ``help`` if given."""
    default, flag, bounds, default_help = _GENERATION_OPTIONS[name]
    return typer.Option(default, flag, **bounds, help=help or default_help)


def _generation_settings(seed: int, steps: Optional[int], guidance: Optional[float], temperature: float, top_p: float,
                         max_new_tokens: int, max_images: Optional[int], image_size: Optional[str]) -> dict:
    """The generation flags (all but --device) as the pipeline's settings, named as in ``GenerationConfig``."""
    return dict(seed=seed, num_steps=steps, guidance_scale=guidance, temperature=temperature, top_p=top_p,
                max_new_tokens=max_new_tokens, max_images=max_images, image_size=_parse_image_size(image_size))


def _check_device(device: str) -> None:
    """``--device`` checked before a model loads: a device name torch knows, and a device this machine has."""
    import torch

    try:
        where = torch.device(device)
    except RuntimeError:
        fail(f"--device {device!r}: not a device name; expected cpu, cuda, cuda:1 ...")
    if where.type == "cuda":
        if not torch.cuda.is_available():
            built = "with" if torch.backends.cuda.is_built() else "without"
            fail(f"--device {device!r}: torch sees no CUDA GPU here (torch {torch.__version__}, built {built} CUDA); "
                 "use --device cpu")
        count = torch.cuda.device_count()
        if where.index is not None and where.index >= count:
            fail(f"--device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif where.type != "cpu":
        fail(f"--device {device!r}: DuetGen runs on cpu or cuda")


def _check_port_free(host: str, port: int) -> None:
    """``--host`` / ``--port`` can be bound now, probed as uvicorn binds them (IPv6 for a host with a ':', else
    IPv4; the server binds them again once the model has loaded)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as e:  # (socket.gaierror too: a name this machine does not resolve)
            fail(f"--host {host!r} --port {port}: cannot be bound ({e.strerror}); another server may be using it, "
                 "or the host is not an address of this machine")


def _parse_image_size(value: Optional[str]) -> Optional[tuple[int, int]]:
    """``--image-size HxW`` (or one side, for a square) -> (height, width); None when the flag is not given."""
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        fail(f"--image-size {value!r}: expected HEIGHTxWIDTH or one side, e.g. 64x64 or 64")
    if max(parts) > 8192:  # (a model's own max_size is checked later; this bounds what is allocated first)
        fail(f"--image-size {value!r}: a side is at most 8192 pixels")
    return parts[0], parts[1]


def _parse_kinds(kinds: Optional[str]) -> Optional[list[str]]:
    """``--kinds a,b`` -> ShapeWorld task kinds, each checked; None when the flag is not given."""
    if kinds is None:
        return None
    from duetgen.shapeworld.world import KINDS

    kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
    if not kind_list:
        fail("--kinds is empty")
    unknown = [k for k in kind_list if k not in KINDS]
    if unknown:
        fail(f"--kinds: unknown task kind(s) {', '.join(map(repr, unknown))} (expected some of {', '.join(KINDS)})")
    return kind_list


# ----------------------------------------------------------------------------- data


@data_app.command("view")
def data_view(
    dataset_dir: Path = typer.Argument(..., help="Dataset directory (holds manifest.json)."),
    out: Path = typer.Option(..., "--out", parser=out_path, help="Page 1; later pages are written next to it as <stem>-page-NNNN.html."),
    per_page: int = typer.Option(50, "--per-page", min=1, help="Records per page."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Show only the first N records."),
    embed: bool = typer.Option(False, "--embed", help="Inline images as data URIs (a page that stands alone)."),
):
    """Render a dataset as static HTML chat pages (text and images inline, targets marked)."""
    from duetgen.data.record import RecordError
    from duetgen.data.view import render_dataset_html

    try:
        pages = render_dataset_html(dataset_dir, out, per_page=per_page, limit=limit, embed=embed)
    except (RecordError, OSError) as e:  # (a DatasetError naming --out is a RecordError)
        fail(f"cannot render {str(dataset_dir)!r}: {e}")
    for p in pages:
        typer.echo(str(p))


@data_app.command("export-parquet")
def data_export_parquet(
    dataset_dir: Path = typer.Argument(..., help="Dataset directory (holds manifest.json)."),
    out: Path = typer.Argument(..., help="Parquet file to write (images embedded; loads in HF datasets)."),
):
    """Export a dataset to one Parquet file with the images embedded, for the HF `datasets` ecosystem."""
    from duetgen.data.parquet import export_parquet
    from duetgen.data.record import RecordError

    try:
        n = export_parquet(dataset_dir, out)
    except (RecordError, OSError) as e:
        fail(f"cannot export {str(dataset_dir)!r}: {e}")
    typer.echo(f"wrote {n} records to {out}")


@data_app.command("import-parquet")
def data_import_parquet(
    parquet_file: Path = typer.Argument(..., help="Parquet file written by export-parquet (or shaped like it)."),
    dataset_dir: Path = typer.Argument(..., help="New dataset directory (must not exist or be empty)."),
):
    """Import a Parquet file into a new dataset directory, validating every record and image."""
    from duetgen.data.parquet import import_parquet
    from duetgen.data.record import RecordError

    try:
        n = import_parquet(parquet_file, dataset_dir)
    except (RecordError, OSError) as e:
        fail(f"cannot import {str(parquet_file)!r}: {e}")
    typer.echo(f"wrote {n} records to {dataset_dir}")


@data_app.command("toyworld")
def data_toyworld(
    out: Path = typer.Option(..., "--out", parser=out_path, help="New dataset directory to write."),
    n: int = typer.Option(..., "--n", min=0, help="Number of records."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed: the same seed, split and kinds (in the same order) give the same dataset."),
    split: str = typer.Option("train", "--split", help="train | val | test (decided by a hash of every scene; see docs/shapeworld.md)."),
    kinds: Optional[str] = typer.Option(None, "--kinds", help="Comma-separated subset of how-to,continuation,text-to-image,editing,understanding,transition (default: all, in the default mix)."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Records per shard."),
):
    """Generate ShapeWorld records (the procedural toy world of DESIGN section 9) into a dataset."""
    from duetgen.data.record import RecordError
    from duetgen.shapeworld import world

    if split not in world.SPLITS:
        fail(f"--split {split!r}: expected one of {', '.join(world.SPLITS)}")
    kind_list = _parse_kinds(kinds)
    try:
        counts = world.generate(out, n, seed=seed, split=split, kinds=kind_list, shard_size=shard_size)
    except (world.WorldError, RecordError, OSError) as e:
        fail(f"cannot write ShapeWorld to {str(out)!r}: {e}")
    typer.echo(f"wrote {n} {split} records to {out}: " + ", ".join(f"{k} {c}" for k, c in counts.items()))


# ----------------------------------------------------------------------------- data: web engine (issue 6)


@data_app.command("engine")
def data_engine(
    input: Path = typer.Option(..., "--input", help="Pages: a .jsonl file of {url, html[, id, source]} per line, a directory of .html files, or WARC files ('crawl/*.warc.gz', quoted)."),
    out: Path = typer.Option(..., "--out", parser=out_path, help="Dataset directory to write; rerun the same command to resume a killed run."),
    llm: Optional[str] = typer.Option(None, "--llm", help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1); without it: rules and templates only."),
    model: Optional[str] = typer.Option(None, "--model", help="Model id as the endpoint names it (a multimodal model: it captions images)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Local worker processes (1: in this process)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on Ray: a cluster address, or 'local' to start Ray here with --workers CPUs."),
    shard_pages: int = typer.Option(50, "--shard-pages", min=1, help="Pages per shard (the unit of work and of restart)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key (never written to disk)."),
    llm_concurrency: int = typer.Option(16, "--llm-concurrency", min=1, help="LLM requests in flight per worker."),
    llm_timeout: float = typer.Option(120.0, "--llm-timeout", min=1.0, help="Seconds one LLM request may take."),
    llm_max_retries: int = typer.Option(4, "--llm-max-retries", min=0, help="Retries of an LLM request on 429 / 5xx / timeouts (backing off)."),
    allow_network: Optional[list[str]] = typer.Option(None, "--allow-network", help="CIDR whose images may be fetched although not public (repeatable), e.g. 127.0.0.0/8 for a local mirror."),
    languages: str = typer.Option("en", "--languages", help="Comma-separated ISO 639-1 codes of the pages to keep (lingua), or 'any'."),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Remove cross-page near-duplicates (MinHash + LSH, keeps the lowest id)."),
    dedup_threshold: float = typer.Option(0.8, "--dedup-threshold", min=0.0, max=1.0, help="Estimated Jaccard of word 5-grams at or above which two pages are duplicates."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Turn how-to web pages into clean interleaved conversations (paper 3.1), with a funnel report."""
    import ipaddress

    from duetgen.data.engine import EngineConfig, EngineError, LocalExecutor, run_engine
    from duetgen.data.engine.fetch import FetchConfig
    from duetgen.data.engine.language import LanguageConfig, check_languages
    from duetgen.data.engine.neardup import NearDupPageConfig
    from duetgen.data.record import RecordError

    if (llm is None) != (model is None):
        fail("give --llm and --model together (or neither, for the rules-only mode)")
    if llm is not None and not llm.startswith(("http://", "https://")):
        fail(f"--llm {llm!r} must be an http:// or https:// URL")
    for n in allow_network or []:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError:
            fail(f"--allow-network {n!r} is not a CIDR network")
    codes = tuple(c.strip().lower() for c in languages.split(",") if c.strip())
    try:
        check_languages(codes)
    except ValueError as e:
        fail(str(e))
    cfg = EngineConfig(fetch=FetchConfig(allow_networks=tuple(allow_network or ())), shard_pages=shard_pages,
                       language=LanguageConfig(languages=codes),
                       neardup=NearDupPageConfig(enabled=dedup, threshold=dedup_threshold),
                       llm_url=llm, llm_model=model, llm_api_key=os.environ.get(api_key_env),
                       llm_concurrency=llm_concurrency, llm_timeout_s=llm_timeout, llm_max_retries=llm_max_retries)
    try:
        if ray is not None:
            from duetgen.data.engine import RayExecutor

            try:
                executor = RayExecutor(None if ray == "local" else ray, workers)
            except ImportError:
                fail("--ray needs the ray package (pip install 'ray==2.60.0')")
        else:
            executor = LocalExecutor(workers)
        funnel = run_engine(input, out, cfg, executor, progress=progress)
    except (EngineError, RecordError, OSError) as e:
        fail(str(e))
    s = funnel["summary"]
    typer.echo(f"wrote {s['records_out']} records from {s['pages_in']} pages to {out} "
               f"(funnel: {out / 'funnel.html'}; LLM: {funnel['llm'] or 'off'})")
    if s.get("llm_api_errors"):
        typer.secho(f"warning: {s['llm_api_errors']} pages, images or text blocks were dropped because LLM requests "
                    f"to {llm} failed (unreachable, 5xx / 429 or timeouts after {llm_max_retries} retries); rerun the "
                    "same command to try them again (answers already received are cached; --llm may name another "
                    "address of the same model)", fg=typer.colors.YELLOW, err=True)
        if not s["records_out"]:
            raise typer.Exit(2)


# ----------------------------------------------------------------------------- data: synthetic + alignment (issue 7)


@data_app.command("taxonomy")
def data_taxonomy(
    file: Optional[Path] = typer.Option(None, "--file", help="Taxonomy JSON (default: the shipped 8-domain, 151-subcategory pool)."),
):
    """Validate and summarise the query-pool taxonomy (domains, subcategories, seed questions)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from duetgen.data.synthetic.taxonomy import TaxonomyError, load_taxonomy

    try:
        tax = load_taxonomy(file)
    except TaxonomyError as e:
        fail(str(e))
    # names are the file's text, not rich markup ("Home [/] Living" raised a MarkupError)
    table = Table(title=escape(f"{tax.name} v{tax.version}: {len(tax.domains)} domains, {tax.num_subcategories} "
                               f"subcategories, {tax.num_seeds} seeds"))
    for col in ("domain", "name", "subcategories", "seeds"):
        table.add_column(col)
    for row in tax.summary():
        table.add_row(escape(row["domain"]), escape(row["name"]), str(row["subcategories"]), str(row["seeds"]))
    Console().print(table)


@data_app.command("expand")
def data_expand(
    out: Path = typer.Option(..., "--out", parser=out_path, help="Query pool JSONL to write (id, prompt, kind, domain, subcategory, origin)."),
    llm_url: Optional[str] = typer.Option(None, "--llm-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", help="Model id as the endpoint names it."),
    taxonomy: Optional[Path] = typer.Option(None, "--taxonomy", help="Taxonomy JSON (default: the shipped one)."),
    per_subcategory: int = typer.Option(100, "--per-subcategory", min=1, help="Target questions per subcategory, seeds included."),
    batch_size: int = typer.Option(25, "--batch-size", min=1, help="Questions asked for per LLM call."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Rounds of asking the subcategories still short of the target."),
    threshold: float = typer.Option(0.6, "--dedup-threshold", min=0.0, max=1.0, help="Character-shingle Jaccard at which two questions are near-duplicates."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Run seed (per-request LLM seeds derive from it)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="SQLite response cache: a rerun costs nothing."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key."),
    max_concurrency: int = typer.Option(8, "--max-concurrency", min=1, help="LLM requests in flight."),
    seeds_only: bool = typer.Option(False, "--seeds-only", help="Write the seed questions alone (no LLM)."),
):
    """Expand the seed questions into a balanced, near-duplicate-free query pool with an LLM."""

    from duetgen.data.record import RecordError
    from duetgen.data.synthetic.dedup import NearDupConfig
    from duetgen.data.synthetic.expand import ExpandConfig, expand_queries, seed_queries, write_queries
    from duetgen.data.synthetic.runlog import RunReport
    from duetgen.data.synthetic.taxonomy import TaxonomyError, load_taxonomy

    try:
        tax = load_taxonomy(taxonomy)
    except TaxonomyError as e:
        fail(str(e))
    report = RunReport("expand")
    if seeds_only:
        queries = seed_queries(tax)
    else:
        if not llm_url or not llm_model:
            fail("give --llm-url and --llm-model (or --seeds-only)")
        from duetgen.llm.client import LLMClient

        try:
            client = LLMClient(llm_url, llm_model, api_key=os.environ.get(api_key_env), max_concurrency=max_concurrency,
                               cache_path=cache)
        except ValueError as e:
            fail(str(e))
        cfg = ExpandConfig(per_subcategory=per_subcategory, batch_size=batch_size, max_rounds=rounds, seed=seed,
                           dedup=NearDupConfig(threshold=threshold))
        try:
            queries = expand_queries(tax, client, cfg, report)
        finally:
            client.close()
    try:
        write_queries(out, queries)
        path = report.save(out.parent)
    except (OSError, RecordError) as e:
        fail(f"cannot write {str(out)!r}: {e}")
    typer.echo(f"wrote {len(queries)} queries to {out} (report: {path})")
    asked = report.counts.get("llm_requests", 0)
    failed = {reason: n for reason, n in report.skip_reasons.items() if reason.startswith("llm_")}
    short = (report.extra.get("balance") or {}).get("short_of_target") or {}
    if failed:
        typer.secho(f"{sum(failed.values())} of {asked} LLM requests failed ({failed}; details in the report)",
                    fg=typer.colors.YELLOW, err=True)
    if short:
        typer.secho(f"{len(short)} subcategories are short of {per_subcategory} queries (the report's balance)",
                    fg=typer.colors.YELLOW, err=True)
    if asked and sum(failed.values()) == asked:
        fail("every LLM request failed: the pool holds the seed questions only")


@data_app.command("dish-prompts")
def data_dish_prompts(
    photo_dir: Path = typer.Argument(..., help="Folder of dish photos (optional titles.json maps file names to dish names)."),
    out: Path = typer.Option(..., "--out", parser=out_path, help="Requests JSONL to write; image paths are relative to PHOTO_DIR."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed for the question wording."),
    min_side: int = typer.Option(256, "--min-side", min=1, help="Skip photos whose shorter side is smaller."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many requests."),
):
    """Turn dish photos into "how do I cook this?" synthesis requests with the photo as user image."""
    from duetgen.data.images import ImageError
    from duetgen.data.synthetic.dishes import dish_requests
    from duetgen.data.synthetic.expand import write_queries
    from duetgen.data.synthetic.runlog import RunReport

    report = RunReport("dish-prompts")
    try:
        reqs = dish_requests(photo_dir, seed=seed, min_side=min_side, limit=limit, report=report)
        write_queries(out, reqs)
        path = report.save(out.parent)
    except (ImageError, OSError) as e:
        fail(str(e))
    typer.echo(f"wrote {len(reqs)} requests to {out}; skipped {len(report.skipped)} files (report: {path})")
    if not reqs:
        fail(f"no usable photo in {str(photo_dir)!r} (the report says why each file was skipped)")
    typer.echo(f"synthesize them with: duetgen data synthesize {out} --image-root {photo_dir} ...")


@data_app.command("synthesize")
def data_synthesize(
    requests: Path = typer.Argument(..., help="Requests JSONL (from `data expand` or `data dish-prompts`)."),
    out: Path = typer.Option(..., "--out", parser=out_path, help="Dataset directory; rerun the same command to resume."),
    api: str = typer.Option("gemini", "--api", help="gemini (generateContent REST shape) | openai (chat completions with image parts)."),
    url: str = typer.Option("https://generativelanguage.googleapis.com", "--url", help="API base URL (openai: the /v1 root)."),
    model: str = typer.Option("gemini-2.5-flash-image", "--model", help="Model id."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder the requests' image paths are relative to (default: the requests file's folder)."),
    api_key_env: str = typer.Option("GEMINI_API_KEY", "--api-key-env", help="Environment variable holding the API key (never recorded)."),
    max_concurrency: int = typer.Option(4, "--max-concurrency", min=1, help="API requests in flight."),
    max_retries: int = typer.Option(4, "--max-retries", min=0, help="Retries on 429 / 5xx / timeouts."),
    timeout_s: float = typer.Option(300.0, "--timeout", min=1.0, help="Seconds per request."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Process at most this many not-yet-done requests."),
    min_images: int = typer.Option(2, "--min-images", min=1, help="Drop answers with fewer images."),
    max_images: int = typer.Option(12, "--max-images", min=1, help="Drop answers with more images."),
    min_side: int = typer.Option(256, "--min-side", min=1, help="Drop answers with an image whose shorter side is smaller."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Run seed (per-request API seeds derive from it)."),
    retry_dropped: bool = typer.Option(False, "--retry-dropped", help="Ask again for requests an earlier run dropped (refused / filtered)."),
    price_input: Optional[float] = typer.Option(None, "--price-input", help="USD per 1M input tokens (default: the API's list price in image_api.py)."),
    price_text: Optional[float] = typer.Option(None, "--price-text", help="USD per 1M output text tokens."),
    price_image: Optional[float] = typer.Option(None, "--price-image", help="USD per 1M output image tokens."),
):
    """Synthesize interleaved answers with an image-capable API; quality-filter; resumable; cost-accounted."""
    import asyncio

    from duetgen.data.record import RecordError
    from duetgen.data.synthetic.image_api import GEMINI_25_FLASH_IMAGE_PRICING, GeminiImageClient, OpenAIImageClient, Pricing
    from duetgen.data.synthetic.quality import QualityConfig
    from duetgen.data.synthetic.runlog import RunReport
    from duetgen.data.synthetic.synthesize import SynthesisConfig, load_requests, synthesize

    if api not in ("gemini", "openai"):
        fail(f"--api {api!r}: expected gemini or openai")
    base = GEMINI_25_FLASH_IMAGE_PRICING if api == "gemini" else Pricing()
    pricing = Pricing(base.input_per_mtok if price_input is None else price_input,
                      base.output_text_per_mtok if price_text is None else price_text,
                      base.output_image_per_mtok if price_image is None else price_image)
    if not any((pricing.input_per_mtok, pricing.output_text_per_mtok, pricing.output_image_per_mtok)):
        typer.secho(f"no prices for --api {api} (give --price-input / --price-text / --price-image): the cost will "
                    "read $0", fg=typer.colors.YELLOW, err=True)
    if not os.environ.get(api_key_env):
        typer.secho(f"${api_key_env} is not set: requests go without an API key (--api-key-env names the variable)",
                    fg=typer.colors.YELLOW, err=True)
    cls = GeminiImageClient if api == "gemini" else OpenAIImageClient
    try:
        client = cls(url, model, api_key=os.environ.get(api_key_env), max_concurrency=max_concurrency,
                     max_retries=max_retries, timeout_s=timeout_s, pricing=pricing)
    except ValueError as e:
        fail(str(e))
    report = RunReport("synthesize")
    root = image_root if image_root is not None else requests.parent
    try:
        reqs = load_requests(requests, root, report)
        cfg = SynthesisConfig(temperature=temperature, seed=seed, limit=limit, retry_dropped=retry_dropped,
                              quality=QualityConfig(min_images=min_images, max_images=max_images, min_image_side=min_side))
        asyncio.run(synthesize(reqs, client, out, cfg, image_root=root, report=report))
    except (RecordError, OSError) as e:
        fail(str(e))
    c = report.extra.get("cost_usd", {})
    typer.echo(f"wrote {report.counts.get('written', 0)} records to {out}; skipped {len(report.skipped)} "
               f"({dict(report.skip_reasons)}); cost ${c.get('this_run', 0):.4f} this run, ${c.get('all_runs', 0):.4f} in all")
    failed, rejected = report.skip_reasons.get("api_error", 0), report.skip_reasons.get("api_rejected", 0)
    if (failed or rejected) and not report.counts.get("written"):
        fail(f"no record written: {failed} API request(s) failed (a rerun asks again), {rejected} rejected by the API "
             "(dropped: the same request gets the same answer; --retry-dropped asks again); the report's skipped "
             "list says why")


@data_app.command("transitions")
def data_transitions(
    inputs: list[Path] = typer.Argument(..., help="Video files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", parser=out_path, help="Dataset directory; rerun the same command to resume."),
    llm_url: str = typer.Option(..., "--llm-url", help="OpenAI-compatible endpoint of the captioning MLLM (e.g. a local vLLM with Qwen2.5-VL)."),
    llm_model: str = typer.Option(..., "--llm-model", help="Model id as the endpoint names it."),
    window_s: float = typer.Option(5.0, "--window", min=0.1, help="Clip length in seconds."),
    scene_threshold: float = typer.Option(27.0, "--scene-threshold", help="PySceneDetect ContentDetector threshold."),
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="SQLite response cache for the captions: with it, a rerun after a kill pays for no "
                              "caption twice (records are committed 500 at a time)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key."),
    max_concurrency: int = typer.Option(8, "--max-concurrency", min=1, help="Caption requests in flight."),
):
    """Cut videos into 5 s clips inside scenes, drop static/dark ones, caption first->last frame transitions."""

    from duetgen.data.alignment.transitions import TransitionConfig, build_transitions, find_videos
    from duetgen.data.record import RecordError
    from duetgen.llm.client import LLMClient

    outside: list[Path] = []
    try:
        videos = find_videos(inputs, outside)
        client = LLMClient(llm_url, llm_model, api_key=os.environ.get(api_key_env), max_concurrency=max_concurrency,
                           cache_path=cache)
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    for q in outside:
        typer.secho(f"skipped {str(q)!r}: it resolves outside its input folder", fg=typer.colors.YELLOW, err=True)
    if not videos:
        fail(f"no video files ({', '.join(sorted(['.mp4', '.mkv', '.webm', '.mov', '.avi', '.m4v']))}) under {[str(p) for p in inputs]}")
    try:
        report = build_transitions(videos, client, out, TransitionConfig(window_s=window_s, scene_threshold=scene_threshold,
                                                                         caption_batch=max(8, 2 * max_concurrency)))
    except (RecordError, OSError) as e:
        fail(str(e))
    finally:
        client.close()
    typer.echo(f"wrote {report.counts.get('written', 0)} records from {report.counts.get('videos', 0)} videos to {out}; "
               f"skipped {dict(report.skip_reasons)}")
    failed = report.skip_reasons.get("caption_failed", 0)
    if failed and not report.counts.get("written"):
        fail(f"no record written: {failed} caption request(s) failed (the report's skipped list says why); rerun to "
             "retry")


@data_app.command("adapt")
def data_adapt(
    source: Path = typer.Argument(..., help="The dataset's annotation file, or the folder that holds it."),
    fmt: str = typer.Option(..., "--format", help="sharegpt4o | nhr-edit | omnigen | uniworld | echo4o."),
    out: Path = typer.Option(..., "--out", parser=out_path, help="Dataset directory (appended to; rerun skips records already there)."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder the image paths are relative to (default: the annotation file's folder)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Convert at most this many samples."),
):
    """Convert a public image generation / editing dataset into records (text-to-image, edit, multi-reference)."""
    from duetgen.data.alignment.adapters import FORMATS, adapt
    from duetgen.data.record import RecordError

    if fmt not in FORMATS:
        fail(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    try:
        report = adapt(fmt, source, out, image_root=image_root, limit=limit)
    except (RecordError, OSError) as e:
        fail(str(e))
    written = sum(v for k, v in report.counts.items() if k.startswith("written_"))
    typer.echo(f"wrote {written} records to {out}; skipped {dict(report.skip_reasons)}")


@data_app.command("mix")
def data_mix(
    out: Path = typer.Option(..., "--out", parser=out_path, help="Mixture manifest JSON to write (the stage-2 sample list)."),
    config: Optional[Path] = typer.Option(None, "--config", help='JSON: {"seed", "num_samples", "datasets": [{"name", "path", "weight"}]}; paths relative to it.'),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="NAME=PATH:WEIGHT (repeatable), instead of --config."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", min=1, help="Total samples (default: the sum of dataset sizes)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**63 - 1, help="Seed (overrides the config's)."),
):
    """Mix datasets by weight into a deterministic stage-2 training manifest."""
    from duetgen.data.dataset import DatasetError
    from duetgen.data.mixing import build_mixture, parse_mix_config
    from duetgen.data.record import RecordError

    if (config is None) == (not dataset):
        fail("give either --config or one or more --dataset NAME=PATH:WEIGHT")
    if out.is_dir() or not out.name:
        fail(f"--out {str(out)!r} is a folder; give the manifest's file name, e.g. stage2-mix.json")
    if config is not None and not config.is_file():  # (a FIFO hung the read)
        fail(f"--config {str(config)!r}: not a regular file")
    try:
        if config is not None:
            try:
                d = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as e:
                fail(f"--config {str(config)!r}: not readable JSON ({e})")
            sources, n, s = parse_mix_config(d, str(config), base=config.parent)
        else:
            entries = []
            for spec in dataset:
                name, sep, rest = spec.partition("=")
                path, sep2, weight = rest.rpartition(":")
                if not sep or not sep2 or not name or not path:
                    fail(f"--dataset {spec!r}: expected NAME=PATH:WEIGHT")
                try:
                    entries.append({"name": name, "path": path, "weight": float(weight)})
                except ValueError:
                    fail(f"--dataset {spec!r}: weight {weight!r} is not a number")
            sources, n, s = parse_mix_config({"datasets": entries}, "--dataset")
        m = build_mixture(sources, num_samples if num_samples is not None else n, seed if seed is not None else s, out)
    except (DatasetError, RecordError, OSError) as e:
        fail(str(e))
    for src in m["sources"]:
        typer.echo(f"{src['name']:20s} p={src['probability']:.3f} drawn {src['num_drawn']} of {src['num_records']} ({src['epochs']} epochs)")
    typer.echo(f"wrote {m['num_samples']} samples to {out}")


# ----------------------------------------------------------------------------- eval


@eval_app.command("toyworld")
def eval_toyworld(
    pred: Path = typer.Option(..., "--pred", help="Dataset of predictions (records with the truth's ids, assistant turns filled)."),
    truth: Path = typer.Option(..., "--truth", help="ShapeWorld dataset written by `duetgen data toyworld`."),
    out: Optional[Path] = typer.Option(None, "--out", parser=out_path, help="Write the full report (summary + per-record scores) as JSON."),
):
    """Score predictions with the exact ShapeWorld judge: T-Com, I-Com, I-Co, IT-Co, I-Q, U-Acc per task kind."""
    from duetgen.data.record import RecordError
    from duetgen.shapeworld import judge
    from duetgen.shapeworld.world import WorldError

    try:
        report = judge.evaluate(pred, truth)
    except (WorldError, RecordError, OSError) as e:
        fail(f"cannot judge {str(pred)!r} against {str(truth)!r}: {e}")
    judge.print_report(report)
    if out is not None:
        try:
            judge.write_report(report, out)
        except OSError as e:
            fail(f"cannot write --out {str(out)!r}: {e}")
        typer.echo(f"wrote {out}")


@eval_app.command("generate")
def eval_generate(
    benchmark: str = typer.Option(..., "--benchmark", help="Benchmark name (see `duetgen eval benchmarks`) or a benchmark JSON file."),
    model: Path = typer.Option(..., "--model", help="DuetGen model directory (DuetGen.save_pretrained / a training checkpoint)."),
    out: Path = typer.Option(..., "--out", parser=out_path, help="Prediction folder to write (a dataset, plus generation.json); give it to `eval run --pred`. Rerun to resume."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="The inputs: a dataset directory, InterleavedBench's interleaved_bench.json, ImgEdit's basic_edit.json, a GEdit-Bench Parquet/datasets copy, or GenEval's evaluation_metadata.jsonl."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root for an InterleavedBench JSON or ImgEdit's basic_edit.json (default: its folder)."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="shapeworld: the ground-truth dataset; only its user turns are shown to the model."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Answer only the first N items (a later run without it continues)."),
    samples: Optional[int] = typer.Option(None, "--samples", min=1, help="geneval: images per prompt (default 4, GenEval's protocol)."),
    language: Optional[str] = typer.Option(None, "--language", help="gedit: instruction_language of the rows to answer (default en; 'all')."),
    seed: int = _generation_option("seed", "Base seed; each item's seed is derived from it and the item id."),
    steps: Optional[int] = _generation_option("steps"),
    guidance: Optional[float] = _generation_option("guidance"),
    temperature: float = _generation_option("temperature"),
    top_p: float = _generation_option("top_p"),
    max_new_tokens: int = _generation_option("max_new_tokens", "Sampled tokens (text and <BOV>) per answer."),
    max_images: Optional[int] = _generation_option("max_images", "Generated images per answer at most (default: the model's frame budget)."),
    image_size: Optional[str] = _generation_option("image_size"),
    device: str = _generation_option("device"),
    name: Optional[str] = typer.Option(None, "--name", help="The model's name in the records and reports (default: the --model folder name)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Answer a benchmark's inputs with a DuetGen checkpoint (then judge them with `duetgen eval run --pred OUT`)."""
    from duetgen.data.record import RecordError
    from duetgen.eval.adapters import (SINGLE_IMAGE_FORMATS, AdapterError, DuetGenModel, benchmark_inputs,
                                       generate_benchmark)
    from duetgen.eval.benchmarks import BenchmarkError, load_benchmark
    from duetgen.models.duetgen import ModelDirectoryError

    _check_device(device)
    try:  # the cheap checks first: a wrong flag fails before the model loads
        bench = load_benchmark(benchmark)
        benchmark_inputs(bench, prompts, truth, images)
    except (AdapterError, BenchmarkError) as e:
        fail(str(e))
    if samples is not None and bench.prompts_format != "geneval_metadata":
        fail(f"--samples is for geneval; {bench.name!r} has one answer per item")
    if samples is None:
        samples = 4 if bench.prompts_format == "geneval_metadata" else 1  # GenEval's protocol: four a prompt
    structure = "one_image" if bench.prompts_format in SINGLE_IMAGE_FORMATS else "free"
    settings = _generation_settings(seed, steps, guidance, temperature, top_p, max_new_tokens, max_images, image_size)
    try:
        dg = DuetGenModel.from_pretrained(model, name=name, device=device, structure=structure, **settings)
    except (ModelDirectoryError, OSError) as e:
        fail(f"--model {str(model)!r}: {e}")
    except ValueError as e:  # a setting out of range
        fail(str(e))
    try:
        n = generate_benchmark(dg, benchmark, out, prompts=prompts, truth=truth, images=images, limit=limit,
                               progress=progress, samples=samples, language=language)
    except (AdapterError, BenchmarkError, RecordError, ValueError, OSError) as e:
        fail(str(e))
    if bench.prompts_format == "geneval_metadata":
        typer.echo(f"generated {n} image(s) with {dg.name} in GenEval's layout under {out}; score them with GenEval's "
                   f"evaluate_images.py, then `duetgen eval run --benchmark geneval --pred results.jsonl`")
        return
    typer.echo(f"generated {n} answer(s) with {dg.name}; wrote {out} (settings in {out / 'generation.json'})")


@eval_app.command("run")
def eval_run(
    benchmark: str = typer.Option(..., "--benchmark", help="Benchmark name (see `duetgen eval benchmarks`) or a benchmark JSON file."),
    pred: Path = typer.Option(..., "--pred", help="The model's outputs: a dataset directory, a CoMM results folder (<data_id>_taskN/results.json), an ImgEdit or GEdit-Bench edited-images folder, or GenEval's results.jsonl."),
    out: Path = typer.Option(..., "--out", parser=out_path, help="Run directory. Rerun the same command to resume: finished judge calls come from the score cache."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible endpoint of the judge, e.g. http://127.0.0.1:8000/v1 (a local vLLM) or a hosted API."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="Judge model id as the endpoint names it."),
    k: int = typer.Option(1, "--k", min=1, help="Judge samples per scored unit (seeds 0..k-1); each score is their median."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Benchmark inputs: a dataset directory, InterleavedBench's interleaved_bench.json, ImgEdit's basic_edit.json or a GEdit-Bench copy. Defines the item list (missing predictions are counted)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root for an InterleavedBench JSON or ImgEdit's basic_edit.json (default: its folder); geneval: the folder `eval generate` wrote, for the report's gallery."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="shapeworld only: the ground-truth dataset."),
    task: Optional[str] = typer.Option(None, "--task", help="comm: the task judged (default task4, the paper's Table 2; task3 also judged)."),
    language: Optional[str] = typer.Option(None, "--language", help="gedit: instruction_language of the rows judged (default en; 'all')."),
    judge_prompts: Optional[Path] = typer.Option(None, "--judge-prompts", help="imgedit: your copy of ImgEdit's official judge prompts (prompts.json, {edit_type: prompt with <edit_prompt>}) instead of the project's templates."),
    name: Optional[str] = typer.Option(None, "--name", help="The model's name in reports (default: the --pred folder name)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Score cache file to use (default: <out>/score_cache.sqlite); share one between runs."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the judge API key (never recorded)."),
    max_concurrency: int = typer.Option(8, "--max-concurrency", min=1, help="Judge requests in flight."),
    max_retries: int = typer.Option(4, "--max-retries", min=0, help="Retries on 429 / 5xx / timeouts before a request counts as an api_error."),
    timeout_s: float = typer.Option(120.0, "--timeout", min=1.0, help="Seconds per judge request."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Judge a model's outputs on a benchmark and write results.jsonl + summary.json (rerun to resume)."""

    from duetgen.data.record import RecordError
    from duetgen.eval.benchmarks import BenchmarkError
    from duetgen.eval.harness import HarnessError, RunConfig, run_benchmark
    from duetgen.eval.judge import JudgeConfig
    from duetgen.llm.templates import TemplateError

    if (judge_url is None) != (judge_model is None):
        fail("give both --judge-url and --judge-model (or neither, for an exact benchmark)")
    try:
        judge = None if judge_url is None else JudgeConfig(
            base_url=judge_url, model=judge_model, k=k, max_concurrency=max_concurrency,
            timeout_s=timeout_s, max_retries=max_retries)
        cfg = RunConfig(benchmark=benchmark, pred=str(pred), out=str(out), prompts=None if prompts is None else str(prompts),
                        images=None if images is None else str(images), truth=None if truth is None else str(truth),
                        name=name, cache=None if cache is None else str(cache), task=task, language=language,
                        judge_prompts=None if judge_prompts is None else str(judge_prompts))
        summary = run_benchmark(cfg, judge, api_key=os.environ.get(api_key_env), progress=progress)
    except (HarnessError, BenchmarkError, TemplateError, RecordError, ValueError, OSError) as e:
        fail(str(e))
    _print_summary(summary)
    typer.echo(f"wrote {out / 'results.jsonl'} and {out / 'summary.json'}")
    failed = sum(row["states"].get("api_error", 0) for row in summary["metrics"].values())
    if failed:
        typer.echo(f"warning: {failed} score(s) missing because judge requests failed (api_error: unreachable, "
                   "429 / 5xx / timeouts after the retries); rerun the same command to ask those again", err=True)
        if not any(row["n"] for row in summary["metrics"].values()):
            raise typer.Exit(2)  # nothing was scored: a script must not take this run for a result


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['benchmark']['title']}: {summary['name']} ({summary['n_items']} items)")
    table.add_column("metric")
    for col in ("mean", "95% CI", "n", "not scored"):
        table.add_column(col, justify="right")
    for m, row in summary["metrics"].items():
        bad = ", ".join(f"{s} {n}" for s, n in row["states"].items() if s not in ("ok", "not_applicable") and n)
        ci = "-" if row["ci95"] is None else f"[{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]"
        table.add_row(m, "-" if row["mean"] is None else f"{row['mean']:.3f}", ci, str(row["n"]), bad or "-")
    Console().print(table)


@eval_app.command("report")
def eval_report(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run directories of the same benchmark (compared side by side)."),
    out: Path = typer.Option(Path("report.html"), "--out", parser=out_path, help="HTML file to write; the JSON summary goes next to it (.json)."),
    gallery: int = typer.Option(12, "--gallery", min=0, help="Items shown in the side-by-side gallery."),
):
    """Write an HTML report (tables with 95% intervals, bar chart, galleries) and a JSON summary of runs."""
    from duetgen.data.record import RecordError
    from duetgen.eval.benchmarks import BenchmarkError
    from duetgen.eval.report import ReportError, write_report

    try:
        html_path, json_path = write_report(run_dirs, out, gallery_items=gallery)
    except (ReportError, BenchmarkError, RecordError, OSError) as e:
        fail(str(e))
    typer.echo(f"wrote {html_path} and {json_path}")


@eval_app.command("benchmarks")
def eval_benchmarks():
    """List the benchmarks (versioned definitions in duetgen/eval/benchmarks/) and their metrics."""
    from duetgen.eval.benchmarks import list_benchmarks, load_benchmark

    for name in list_benchmarks():
        b = load_benchmark(name)
        typer.echo(f"{b.id:24s} {b.title:24s} {b.kind:6s} {', '.join(b.metric_names())}")


@eval_app.command("import")
def eval_import(
    src: Path = typer.Argument(..., help="Another system's outputs: a dataset, a CoMM results folder, or a folder of *.jsonl records with images relative to it."),
    out: Path = typer.Argument(..., help="New dataset directory to write."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name stored in each record's meta."),
):
    """Validate another system's outputs and store them as a DuetGen dataset (usable as --pred)."""
    from duetgen.data.record import RecordError
    from duetgen.eval.adapters import import_outputs

    try:
        n = import_outputs(src, out, name=name)
    except (RecordError, OSError) as e:
        fail(f"cannot import {str(src)!r}: {e}")
    typer.echo(f"wrote {n} records to {out}")


# ----------------------------------------------------------------------------- train (issue 4)


def _train_config(load, name: str, data: Optional[list[Path]], steps: Optional[int], packs_per_rank: Optional[int] = None):
    """Run config ``name`` from ``load`` with the --data / --steps / --packs-per-rank overrides; every dataset must exist."""
    import dataclasses

    try:
        cfg = load(name)
    except ValueError as e:
        fail(str(e))
    if data:
        cfg = dataclasses.replace(cfg, data=[str(d) for d in data])
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
        if cfg.warmup_steps > steps:  # a short run (a smoke test): warm up over all of it rather than fail
            typer.secho(f"--steps {steps} is under config {name!r}'s warmup_steps {cfg.warmup_steps}: warming up over "
                        f"all {steps} steps", err=True)
            cfg = dataclasses.replace(cfg, warmup_steps=steps)
    if packs_per_rank is not None:
        cfg = dataclasses.replace(cfg, packs_per_rank=packs_per_rank)
    for d in cfg.data:
        if not (Path(d) / "manifest.json").is_file() and not Path(d).is_file():  # (a file: a `data mix` manifest)
            if data:
                fail(f"--data {d!r}: not a dataset directory (no manifest.json) nor a `duetgen data mix` manifest; "
                     "make one with `duetgen data toyworld`")
            fail(f"config {name!r} reads the dataset {d!r}, which is not there (no manifest.json): make it with the "
                 f"`duetgen data toyworld --out {d} ...` line of docs/training.md (the ShapeWorld recipe), or pass --data")
    return cfg


@train_app.command("stage1")
def train_stage1(
    config: str = typer.Option("toy", "--config", help="Run config name (duetgen/train/configs.py, STAGE1_CONFIGS): the ShapeWorld recipe is toy-read-first, then toy, then toy-read-more (docs/training.md); tiny, tiny-lora for tests; others are earlier runs."),
    out: Optional[Path] = typer.Option(None, "--out", parser=out_path, help="Run directory (default runs/<config>/stage1)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's latest checkpoint."),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="Dataset directories or `duetgen data mix` manifests (default: the config's)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Override the config's number of steps."),
    packs_per_rank: Optional[int] = typer.Option(None, "--packs-per-rank", min=1, help="Packs per step on each rank (gradient accumulation; default: the config's)."),
    quiet: bool = typer.Option(False, "--quiet", help="Print JSON lines instead of a progress bar (for log files)."),
):
    """Stage 1: instruction-tune the MLLM (next-token loss on assistant text, <BOV> and end of turn), packed.

    Multi-process: torchrun --nproc-per-node N -m duetgen.cli train stage1 ... (FSDP2; docs/training-infra.md).
    """
    from duetgen.train.configs import stage1_config
    from duetgen.train.stage1 import train

    cfg = _train_config(stage1_config, config, data, steps, packs_per_rank)
    run_dir = out or Path("runs") / cfg.name / "stage1"
    try:
        train(cfg, run_dir, resume_run=resume, progress=not quiet)
    except _train_errors() as e:
        fail(str(e))


@train_app.command("stage2")
def train_stage2(
    config: str = typer.Option("toy", "--config", help="Run config name (duetgen/train/configs.py, STAGE2_CONFIGS): the ShapeWorld recipe is toy-draw, then toy (from toy-draw's model; `duetgen train shapeworld` runs both); toy-text-only (the no-frames ablation), tiny for tests; others are earlier runs (docs/training.md)."),
    stage1: Path = typer.Option(..., "--stage1", help="Stage-1 run directory (holds mllm/) or a transformers MLLM directory."),
    out: Optional[Path] = typer.Option(None, "--out", parser=out_path, help="Run directory (default runs/<config>/stage2)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's latest checkpoint."),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="Dataset directories or `duetgen data mix` manifests (default: the config's)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Override the config's number of steps."),
    packs_per_rank: Optional[int] = typer.Option(None, "--packs-per-rank", min=1, help="Packs per step on each rank (gradient accumulation; default: the config's)."),
    quiet: bool = typer.Option(False, "--quiet", help="Print JSON lines instead of a progress bar (for log files)."),
):
    """Stage 2: MLLM frozen; train connector + DiT with rectified flow on one target image per sequence.

    Multi-process: torchrun --nproc-per-node N -m duetgen.cli train stage2 ... (FSDP2; docs/training-infra.md).
    """
    from duetgen.train.configs import stage2_config
    from duetgen.train.stage2 import train

    cfg = _train_config(stage2_config, config, data, steps, packs_per_rank)
    mllm_dir = _stage1_mllm_dir(stage1)
    run_dir = out or Path("runs") / cfg.name / "stage2"
    try:
        train(cfg, mllm_dir, run_dir, resume_run=resume, progress=not quiet)
    except _train_errors() as e:
        fail(str(e))


def _train_errors() -> tuple[type[BaseException], ...]:
    """What a training command prints as a one-line error: bad data, settings, checkpoints, a diverged run
    (each names its input); anything else is a bug and keeps its traceback."""
    from duetgen.data.packing import PackingError
    from duetgen.data.record import RecordError
    from duetgen.train.checkpoint import CheckpointError
    from duetgen.train.common import TrainDiverged, TrainInputError

    return (FileExistsError, FileNotFoundError, TrainInputError, TrainDiverged, CheckpointError, PackingError,
            RecordError)


def _stage1_mllm_dir(stage1: Path) -> Path:
    """--stage1: a finished stage-1 run's mllm/, or an MLLM directory (config.json beside its weights)."""
    mllm_dir = stage1 / "mllm" if (stage1 / "mllm").is_dir() else stage1
    if (stage1 / "checkpoints").is_dir() and mllm_dir == stage1:
        fail(f"--stage1 {str(stage1)!r}: a stage-1 run that has not finished (no mllm/ yet); resume it to its end")
    if not (mllm_dir / "config.json").is_file() or not any(mllm_dir.glob("*.safetensors")):
        fail(f"--stage1 {str(stage1)!r}: no finished stage-1 MLLM there (expected {mllm_dir}/config.json and its "
             "*.safetensors weights)")
    try:  # (another config.json there built a default-size model for minutes, then raised a traceback)
        config = json.loads((mllm_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        fail(f"--stage1 {str(stage1)!r}: {mllm_dir}/config.json is not readable JSON ({e})")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        fail(f"--stage1 {str(stage1)!r}: {mllm_dir}/config.json is not a transformers model config (no model_type)")
    return mllm_dir


# ----------------------------------------------------------------------------- model (issue 3)


@model_app.command("init")
def model_init(
    out: Path = typer.Argument(..., help="Model directory to write."),
    preset: str = typer.Option("toy", "--preset", help="tiny, tiny-wan or toy (the real preset needs its weights: `model assemble`)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed of the random weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory."),
):
    """Write a randomly initialised DuetGen directory of an offline preset (a starting point, or for trying the tools)."""
    from duetgen.models.builder import build
    from duetgen.models.presets import get_preset

    try:
        if get_preset(preset).tokenizer is None:
            fail(f"--preset {preset!r}: its tokenizer comes with real weights; use `duetgen model assemble`")
        path = build(preset, seed=seed).save_pretrained(out, overwrite=overwrite)
    except (ValueError, OSError) as e:  # FileExistsError; a folder that cannot be written
        fail(str(e))
    typer.echo(f"wrote {path}")


@model_app.command("assemble")
def model_assemble(
    out: Path = typer.Argument(..., help="Model directory to write."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="Local diffusers Cosmos-Predict2.5 pipeline directory (text_encoder/, tokenizer/, transformer/, vae/, scheduler/), instead of --mllm/--dit/--vae."),
    processor: Optional[Path] = typer.Option(None, "--processor", help="With --pipeline: a directory holding the text encoder's preprocessor_config.json when the snapshot has none."),
    mllm: Optional[Path] = typer.Option(None, "--mllm", help="Local Qwen2.5-VL directory (e.g. Qwen2.5-VL-7B-Instruct)."),
    dit: Optional[Path] = typer.Option(None, "--dit", help="Local diffusers CosmosTransformer3DModel directory (a pipeline's transformer/)."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Local diffusers AutoencoderKLWan directory (a pipeline's vae/)."),
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="Store MLLM, connector and DiT in bfloat16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory."),
):
    """Assemble a DuetGen directory from local real weights: adds <BOV>, initialises the connector from the DiT."""
    import torch

    from duetgen.models.builder import assemble, assemble_from_pipeline
    from duetgen.models.duetgen import ModelDirectoryError

    separate = {"--mllm": mllm, "--dit": dit, "--vae": vae}
    if pipeline is not None and any(v is not None for v in separate.values()):
        fail("give either --pipeline or --mllm/--dit/--vae, not both")
    if pipeline is None and any(v is None for v in separate.values()):
        fail(f"missing {', '.join(k for k, v in separate.items() if v is None)} (or give --pipeline DIR)")
    if processor is not None and pipeline is None:
        fail("--processor goes with --pipeline")
    for flag, directory in {"--pipeline": pipeline, "--processor": processor, **separate}.items():
        if directory is not None and not directory.is_dir():
            fail(f"{flag} {str(directory)!r}: not a directory")
    if out.exists() and not overwrite:  # before ~20 GB of real weights load
        fail(f"{str(out)!r} exists; pass --overwrite to replace it")
    dtype = torch.bfloat16 if bf16 else torch.float32
    try:
        if pipeline is not None:
            model = assemble_from_pipeline(pipeline, processor_dir=processor, dtype=dtype)
        else:
            model = assemble(mllm, dit, vae, dtype=dtype)
        path = model.save_pretrained(out, overwrite=overwrite)
    except (ModelDirectoryError, ValueError, OSError) as e:
        fail(str(e))
    typer.echo(f"wrote {path} (preset {model.config.preset!r}, parameters {model.num_parameters()}, connector "
               f"pretrained against {model.provenance.get('connector_pretrained_against')})")


@model_app.command("info")
def model_info(
    path: Path = typer.Argument(..., help="DuetGen model directory."),
):
    """Print a model directory's parts, settings and provenance (from its configs; no weights are read)."""
    from dataclasses import asdict

    from duetgen.models.duetgen import ModelDirectoryError, read_directory

    try:
        parts = read_directory(path)
    except (ModelDirectoryError, ValueError, OSError) as e:
        fail(str(e))
    text, dit, provenance = parts.mllm_config.text_config, parts.dit_config, parts.provenance
    marker = f", step marker over {parts.connector_recency_tokens} tokens" if parts.connector_recency_tokens else ""
    lines = [
        f"{path}",
        f"  preset: {parts.settings.preset}",
        f"  mllm: {text.num_hidden_layers} layers x {text.hidden_size}, {text.vocab_size} embedding rows, "
        f"tokenizer of {len(parts.tokenizer)} tokens",
        f"  connector: {parts.connector_shape[1]} -> {parts.connector_shape[0]}{marker}",
        f"  connector pretrained against: {provenance.get('connector_pretrained_against', 'not recorded')}",
        f"  dit: {dit['num_layers']} layers x {dit['num_attention_heads'] * dit['attention_head_dim']}, "
        f"{dit['out_channels']} latent channels, patch {list(dit['patch_size'])}",
        f"  vae: {parts.vae['_class_name']}",
    ]
    lines += [f"  {name}: {value}" for name, value in asdict(parts.settings).items() if name != "preset"]
    lines += [f"  provenance {name}: {value}" for name, value in provenance.items()
              if name != "connector_pretrained_against"]
    typer.echo("\n".join(lines))


@model_app.command("check")
def model_check(
    path: Path = typer.Argument(..., help="DuetGen model directory."),
    expect: Optional[str] = typer.Option(None, "--expect", help="Preset whose architecture the directory must have."),
):
    """Check a model directory from its configs and safetensors headers (no weights are read)."""
    from duetgen.models.duetgen import ModelDirectoryError, preset_differences, read_directory
    from duetgen.models.presets import get_preset

    try:
        parts = read_directory(path)
        differences = preset_differences(parts, get_preset(expect)) if expect is not None else []
    except (ModelDirectoryError, ValueError, OSError) as e:
        fail(str(e))
    if differences:
        fail(f"{path}: does not match preset {expect!r}: " + "; ".join(differences))
    typer.echo(f"{path}: ok (preset {parts.settings.preset!r}, connector {parts.connector_shape[1]} -> "
               f"{parts.connector_shape[0]}, vae {parts.vae['_class_name']})")


# ----------------------------------------------------------------------------- generate + serve (issue 5)


def _load_pipeline(model: Optional[Path], device: str, progress: bool = True):
    """The model at ``model`` (default: the shipped checkpoint) on ``device``; without ``progress``, no weight-loading
    bar (transformers draws one per load)."""
    from transformers.utils import logging as transformers_logging

    from duetgen.infer.pipeline import DEFAULT_MODEL_DIR, DuetGenPipeline
    from duetgen.models.duetgen import ModelDirectoryError

    _check_device(device)
    if not progress:
        transformers_logging.disable_progress_bar()
    if model is None:
        if not (DEFAULT_MODEL_DIR / "duetgen.json").is_file():
            fail(f"no --model given and no default checkpoint is shipped yet at {DEFAULT_MODEL_DIR} "
                 "(train one: see docs/generation.md); pass --model DIR")
        model = DEFAULT_MODEL_DIR
    try:
        return DuetGenPipeline.from_pretrained(model, device=device)
    except (ModelDirectoryError, OSError) as e:
        fail(f"--model {str(model)!r}: {e}")


def _set_torch_threads(threads: Optional[int]) -> int:
    """torch's CPU threads for a command whose answer streams from a worker thread (generate, serve): ``threads``,
    or every core this process may use but one. torch's own default (every core) left no core for the other
    threads: on 2 cores a ShapeWorld answer took 0.84-0.92 s in `duetgen generate` against 0.47-0.53 s with one
    thread, and `duetgen serve` answered 10 requests in a row in 4.8-5.3 s against 2.6-2.9 s (docs/serving.md)."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # Linux / macOS
    n = threads or max(1, usable - 1)
    torch.set_num_threads(n)
    return n


_THREADS_HELP = ("torch CPU threads for the model (default: every core this process may use but one, which the "
                 "answer's other threads need: streaming, the live view or the server's HTTP and image encoding; "
                 "with --ray: CPUs each replica reserves and its torch threads, default 1).")


@app.command("generate")
def generate(
    prompt: str = typer.Argument(..., help="The user's request, e.g. \"How do I arrange a red circle at the top left and a blue square in the center?\""),
    image: Optional[list[Path]] = typer.Option(None, "--image", help="Input image (repeatable), shown to the model before the prompt text."),
    model: Optional[Path] = typer.Option(None, "--model", help="DuetGen model directory (default: the shipped ShapeWorld checkpoint)."),
    out: Path = typer.Option(..., "--out", parser=out_path, help="Output folder: a one-record dataset, answer.html and answer.md."),
    seed: int = _generation_option("seed"),
    steps: Optional[int] = _generation_option("steps"),
    guidance: Optional[float] = _generation_option("guidance"),
    temperature: float = _generation_option("temperature"),
    top_p: float = _generation_option("top_p"),
    max_new_tokens: int = _generation_option("max_new_tokens"),
    max_images: Optional[int] = _generation_option("max_images"),
    image_size: Optional[str] = _generation_option("image_size"),
    framing: Optional[str] = typer.Option(None, "--framing", help="duetgen (the conversation) or cosmos (the prompt as a Cosmos-Predict2.5 caption: one image, no text; the sanity check of real weights); default: the model's."),
    device: str = _generation_option("device"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier output in --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No live view; print only the output paths."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=1024, help=_THREADS_HELP),
):
    """Generate an interleaved answer (text streams in, a progress bar per image) and save it with an HTML page."""
    from duetgen.infer.render import foreign_files, print_live, save_output

    settings = _generation_settings(seed, steps, guidance, temperature, top_p, max_new_tokens, max_images, image_size)
    if framing is not None and framing not in ("duetgen", "cosmos"):
        fail(f"--framing {framing!r}: expected duetgen or cosmos")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        foreign = foreign_files(out) if out.is_dir() else None
        if foreign is None:
            fail(f"--out {str(out)!r} exists and is not an earlier output of `duetgen generate` (which --overwrite "
                 "replaces); choose a new folder")
        if foreign:
            fail(f"--out {str(out)!r} holds an earlier output and files `duetgen generate` did not write "
                 f"({', '.join(str(p) for p in foreign[:3])}{' ...' if len(foreign) > 3 else ''}); --overwrite "
                 "replaces only its own: move them, or choose a new folder")
        if not overwrite:
            fail(f"--out {str(out)!r} holds an earlier output; pass --overwrite to replace it, or choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)  # before the model loads: an --out that cannot be written fails now
    except OSError as e:
        fail(f"--out {str(out)!r}: cannot be created ({e.strerror})")
    for path in image or []:  # before the model loads (whether it reads as an image, the pipeline says)
        if not path.is_file():
            fail(f"--image {str(path)!r}: no such file")
    _set_torch_threads(threads)
    pipe = _load_pipeline(model, device, progress=not quiet)
    try:
        events = pipe.stream(prompt, images=list(image or []), **settings, framing=framing)
        finished = print_live(events) if not quiet else [e for e in events][-1]
    except ValueError as e:  # empty / over-long prompt, unreadable or oversize image, bad settings
        fail(str(e))
    try:
        paths = save_output(finished.record, out, overwrite=overwrite)
    except OSError as e:  # (the disk filled, the folder went away)
        fail(f"--out {str(out)!r}: the answer could not be saved ({e})")
    stats = finished.stats
    if not quiet:
        typer.secho(f"{stats['images']} image(s), {stats['new_tokens']} tokens, {finished.reason}, "
                    f"{stats['total_s']:.2f} s", err=True)
    typer.echo(f"dataset: {paths['dataset']}")
    typer.echo(f"html:    {paths['html'].resolve()}")


@train_app.command("export-step")
def train_export_step(
    run: Path = typer.Option(..., "--run", help="Stage-2 run directory (holds checkpoints/ and config.json)."),
    step: int = typer.Option(..., "--step", min=1, help="The checkpoint step to export."),
    stage1: Path = typer.Option(..., "--stage1", help="The MLLM the run trained on: a stage-1 run directory (holds mllm/) or an MLLM directory."),
    out: Path = typer.Option(..., "--out", parser=out_path, help="New DuetGen model directory (an existing one only with --overwrite; never the run's own folder)."),
    raw: bool = typer.Option(False, "--raw", help="Export the raw weights instead of the EMA ones."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
):
    """Turn step N of a stage-2 run into a DuetGen model directory (EMA weights), e.g. to compare runs at equal steps."""
    import dataclasses

    from safetensors import SafetensorError

    from duetgen.train.common import read_json_object
    from duetgen.train.configs import Stage2Config
    from duetgen.train.stage2 import export_checkpoint

    ckpt = run / "checkpoints" / f"step-{step:07d}"
    if not (ckpt / "meta.json").is_file():
        fail(f"--run {str(run)!r}: no complete checkpoint for step {step} ({ckpt})")
    if out.exists() and not overwrite:
        fail(f"--out {str(out)!r} exists; pass --overwrite to replace it")
    mllm_dir = _stage1_mllm_dir(stage1)
    try:
        saved = read_json_object(run / "config.json")  # TrainInputError naming the file
        fields = {f.name for f in dataclasses.fields(Stage2Config)}
        if not set(saved) <= fields:
            fail(f"--run {str(run)!r}: its config.json is not a stage-2 run's config")
        typer.echo(export_checkpoint(ckpt, Stage2Config(**saved), mllm_dir, out, use_ema=not raw, overwrite=overwrite))
    except (ValueError, RecursionError, OSError, SafetensorError) as e:  # JSON (nested too deep), TrainInputError
        fail(f"cannot export step {step} of {str(run)!r}: {e}")


@train_app.command("shapeworld")
def train_shapeworld(
    out: Path = typer.Option(..., "--out", parser=out_path, help="Run directory: data/, the stage runs, eval-test/, model/ and phases.json (wall time per phase)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run: finished phases are skipped, the interrupted one resumes from its checkpoint."),
    recipe: str = typer.Option("shapeworld", "--recipe", help="shapeworld (the shipped checkpoint's recipe, about 90 min on 2 CPU cores) or tiny (seconds; tests)."),
    quiet: bool = typer.Option(False, "--quiet", help="JSON lines instead of progress bars (for a log file)."),
):
    """Reproduce the ShapeWorld checkpoint from nothing: data, stage 1 (three phases), stage 2, eval on test, export to OUT/model.

    Run it in the background with a log: `nohup duetgen train shapeworld --out runs/sw --quiet > sw.log 2>&1 &`.
    """
    from duetgen.train.shapeworld import run_recipe

    try:
        run_recipe(out, recipe=recipe, resume=resume, progress=not quiet,
                   log=lambda line: typer.echo(line, err=False))
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        fail(str(e))


@train_app.command("eval-toy")
def train_eval_toy(
    model: Path = typer.Option(..., "--model", help="Trained DuetGen directory (stage-2 output, e.g. checkpoints/shapeworld-toy)."),
    truth: Path = typer.Option(..., "--truth", help="ShapeWorld dataset with the prompts and truth (`duetgen data toyworld --split test`)."),
    out: Path = typer.Option(..., "--out", parser=out_path, help="Folder for pred/ (the answers), pred.html and report.json."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Answer only the first N records (scored on those)."),
    kinds: Optional[str] = typer.Option(None, "--kinds", help="Only these task kinds, comma-separated (e.g. editing,continuation)."),
    steps: Optional[int] = _generation_option("steps", "Sampler steps per image (default: the model's, as `duetgen generate`)."),
    guidance: Optional[float] = _generation_option("guidance", "Guidance scale w (1 = none; default: the model's); the negative drops the final text chunk."),
    seed: int = _generation_option("seed", "Seed of every answer (as `duetgen generate --seed`)."),
):
    """Answer ShapeWorld prompts through the engine of `duetgen generate` (greedy text, the DiT on <BOV>) and score them with the exact judge."""
    from duetgen.shapeworld import judge
    from duetgen.shapeworld.evaluate import evaluate_toy

    if not (model / "duetgen.json").is_file():
        fail(f"--model {str(model)!r}: not a DuetGen model directory (no duetgen.json)")
    if not (truth / "manifest.json").is_file():
        fail(f"--truth {str(truth)!r}: not a dataset directory (no manifest.json)")
    kind_list = _parse_kinds(kinds)
    report = evaluate_toy(model, truth, out, limit=limit, kinds=kind_list, num_steps=steps, guidance_scale=guidance,
                          seed=seed)
    judge.print_report(report)
    typer.echo(f"answered {report['run']['records']} prompts in {report['run']['seconds']:.0f} s; wrote {out / 'report.json'}")


@app.command("serve")
def serve(
    model: Optional[Path] = typer.Option(None, "--model", help="DuetGen model directory (default: the shipped ShapeWorld checkpoint)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 127.0.0.1 keeps the server local."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default cpu; with --ray: cuda, one GPU per replica, when the cluster has GPUs)"),
    queue_size: int = typer.Option(4, "--queue-size", min=0, help="Requests that may wait while one generates; more get 429 (--ray: waiting at the ingress for any replica, one queue for the cluster)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Requests generated together, batched through one model (duetgen.infer.batched); 1 = one at a time."),
    batch_image_wait: int = typer.Option(8, "--batch-image-wait", min=0, help="With --batch: steps an image's first sampler step may wait for other answers still writing, so their images are drawn together."),
    batch_text_wait: int = typer.Option(20, "--batch-text-wait", min=0, help="With --batch: steps an answer's next token may wait for other answers' drawings that end within that many sampler steps, so they decode together (more throughput; that answer's text pauses meanwhile)."),
    timeout: float = typer.Option(300.0, "--timeout", min=1.0, help="Seconds a request may wait + generate."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=1024, help=_THREADS_HELP),
    max_upload_mb: float = typer.Option(16.0, "--max-upload-mb", min=0.1, max=4096.0, help="Request body cap (JSON with base64 images)."),
    max_image_pixels: int = typer.Option(4096 * 4096, "--max-image-pixels", min=1, help="Pixel cap of one uploaded image."),
    max_prompt_chars: int = typer.Option(4000, "--max-prompt-chars", min=1, help="Text cap of one request."),
    allowed_host: Optional[list[str]] = typer.Option(None, "--allowed-host", help="Host header value to answer besides the bound host (repeatable; '*' = any, e.g. behind a proxy). Others get 400: DNS rebinding."),
    on_ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve, one model per replica (docs/serving.md); a local Ray instance unless --ray-address (or RAY_ADDRESS, or a `ray start` on this machine)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --ray: 'auto' joins this machine's Ray cluster, ray://HEAD:10001 a remote one (typer has no option with an optional value, so not --ray ADDRESS)."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="With --ray: model replicas (one model, and one GPU where there are GPUs, each)."),
):
    """Serve a chat page and an HTTP API (JSON + server-sent events, OpenAI-compatible /v1, OpenAPI at /openapi.json).

    One generation at a time per model by default; --batch N generates up to N requests together through one model,
    --ray --replicas K runs K models (replicas) behind Ray Serve.
    """
    from duetgen.serve.common import ServeLimits
    from duetgen.serve.guards import hosts_to_answer
    from duetgen.serve.server import serve as run_server

    if (replicas > 1 or ray_address is not None) and not on_ray:
        fail("--replicas and --ray-address need --ray (one process serves one model; see docs/serving.md)")
    if not host.strip():
        fail("--host is empty; give an interface to bind: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    if not max_upload_mb == max_upload_mb:  # NaN passes typer's range check
        fail("--max-upload-mb must be a number of megabytes")
    _check_port_free(host, port)  # before the model loads (uvicorn found it taken after, and exited 3)
    limits = ServeLimits(max_body_bytes=int(max_upload_mb * (1 << 20)), max_image_pixels=max_image_pixels,
                         max_prompt_chars=max_prompt_chars, queue_size=queue_size, request_timeout_s=timeout,
                         max_batch=batch, batch_image_wait=batch_image_wait, batch_text_wait=batch_text_wait)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: binding {host}: the server has no authentication; it answers only requests whose Host "
                    f"header names {host} (add --allowed-host NAME for the names clients use)", fg=typer.colors.YELLOW, err=True)
    if on_ray:
        from duetgen.infer.pipeline import DEFAULT_MODEL_DIR

        model_dir = (model or DEFAULT_MODEL_DIR).resolve()  # replicas load it by path, on every node
        if not (model_dir / "duetgen.json").is_file():
            fail(f"--model {str(model_dir)!r}: not a DuetGen model directory (no duetgen.json)")
        import ray

        from duetgen.serve.ray_serve import serve_on_ray

        ray.init(address=ray_address)  # None: a new local instance, unless RAY_ADDRESS / `ray start` name one
        if device is None:
            device = "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
        typer.secho(f"Ray Serve: {replicas} replica(s) on {device}; chat page: http://{host}:{port}/   "
                    f"API: http://{host}:{port}/openapi.json", err=True)
        serve_on_ray(str(model_dir), replicas, host=host, port=port, device=device, limits=limits,
                     allowed_hosts=hosts_to_answer(host, allowed_host or ()), num_cpus=threads or 1)
        return
    torch_threads = _set_torch_threads(threads)
    pipe = _load_pipeline(model, device or "cpu")
    typer.secho(f"chat page: http://{host}:{port}/   API: http://{host}:{port}/openapi.json   "
                f"({torch_threads} torch CPU thread(s))", err=True)
    run_server(pipe, host=host, port=port, limits=limits, allowed_hosts=allowed_host)


# ----------------------------------------------------------------------------- demo


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", parser=out_path, help="Folder for everything the demo writes."),
    n: int = typer.Option(60, "--n", min=1, help="ShapeWorld records to generate."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed for the generated ShapeWorld set."),
):
    """The main job on the embedded ShapeWorld default: build a set, view it, judge it, generate.

    1. generate a ShapeWorld test split (all five task kinds plus transitions);
    2. render it as an HTML page (interleaved text and images inline);
    3. score the ground truth with the exact judge (every metric must read 1.0);
    4. answer a how-to, a continuation (with a canvas) and an editing prompt with the shipped
       ShapeWorld checkpoint, written as records and an HTML page.
    """
    from duetgen.shapeworld.evaluate import DEMO_ANSWERS_NAME, remove_demo_dataset

    data_dir = out / "shapeworld-test"
    if out.exists() and not out.is_dir():
        fail(f"--out {str(out)!r} is a file; the demo writes a folder")
    try:
        for folder, name in ((data_dir, "shapeworld-test-"), (out / "generated", DEMO_ANSWERS_NAME)):
            remove_demo_dataset(folder, name)  # the demo's own datasets: a rerun starts clean
        out.mkdir(parents=True, exist_ok=True)
        _demo_steps(out, data_dir, n, seed)
    except OSError as e:  # an --out that cannot be written, a folder of the user's
        fail(f"demo --out {str(out)!r}: {e}")


def _demo_steps(out: Path, data_dir: Path, n: int, seed: int) -> None:
    """The demo's four steps (see ``demo``), writing under ``out``."""
    from transformers.utils import logging as transformers_logging

    from duetgen.data.view import render_dataset_html
    from duetgen.infer.pipeline import DEFAULT_MODEL_DIR, DuetGenPipeline
    from duetgen.shapeworld import judge, world
    from duetgen.shapeworld.evaluate import shapeworld_demo

    typer.secho(f"[1/4] generating {n} ShapeWorld test records (seed {seed})", bold=True)
    counts = world.generate(data_dir, n, seed=seed, split="test")
    typer.echo("      " + ", ".join(f"{k} {c}" for k, c in counts.items()))

    typer.secho("[2/4] rendering the HTML view", bold=True)
    pages = render_dataset_html(data_dir, out / "shapeworld-test.html")

    typer.secho("[3/4] exact judge on the ground truth (a sanity check: all 1.0)", bold=True)
    report = judge.evaluate(data_dir, data_dir)
    judge.print_report(report)
    judge.write_report(report, out / "judge-ground-truth.json")

    generated = None
    if (DEFAULT_MODEL_DIR / "duetgen.json").is_file():
        typer.secho("[4/4] generating answers to ShapeWorld prompts (how-to, continuation, editing)", bold=True)
        transformers_logging.disable_progress_bar()  # the toy checkpoint loads in ~10 ms: a bar is only noise
        generated = shapeworld_demo(DuetGenPipeline.from_pretrained(DEFAULT_MODEL_DIR), out, seed=seed)
    else:
        typer.secho(f"[4/4] skipped generation: no checkpoint shipped yet at {DEFAULT_MODEL_DIR}", fg=typer.colors.YELLOW)

    typer.secho(f"\ndataset:   {data_dir}", fg=typer.colors.GREEN)
    typer.secho(f"judge:     {out / 'judge-ground-truth.json'}", fg=typer.colors.GREEN)
    typer.secho(f"html view: {pages[0].resolve()}", fg=typer.colors.GREEN)
    if generated is not None:
        typer.secho(f"generated: {generated.resolve()}", fg=typer.colors.GREEN)


if __name__ == "__main__":  # pragma: no cover
    app()
