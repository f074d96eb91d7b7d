"""report.html: the whole report on one page that opens from a file:// address, offline.

Made with libraries, not by hand: Jinja2 renders the page (templates/report.html.j2); the runs
table is a DataTables table (sort by any column; SearchPanes filter by configuration and status)
from itables, whose bundle of DataTables and jQuery (MIT) is inlined; the scores plot is a Bokeh
figure (BSD) whose library is inlined, with a point per run naming its seed and folder on hover
and opening the folder on a click. The other plots are the report's PNGs, inlined.

Every table on the page is the same frame of strings the .md files hold (tables.*_display): the
numbers are formatted once, from the same values as the CSVs.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pandas as pd

from blurbtune.report import tables
from blurbtune.report.constants import MISSING, number
from blurbtune.report.identity import HASHED, display_value
from blurbtune.report.stats import GROUP, is_degenerate

if TYPE_CHECKING:
    from blurbtune.report.build import Report

PAGE = "report.html"
# The first sections of build.left_out are runs left out of every statistic: shown at the top.
LEFT_OUT = 3
TEMPLATE = "report.html.j2"
RUNS_TABLE = "runs"
# The runs table's columns, as the page names them (the test reads these).
RUN_COLUMNS = ["configuration", "seed", "status", "dev (x100)", "test (x100)", "best epoch",
               "flag", "folder"]


def folder_links(results: Iterable[str], out_dir: Path) -> dict[str, str]:
    """Each run folder (of its results.json) relative to the report folder, as a URL; the
    report folder resolved once, each run's once (the runs table and the plot share them)."""
    out = out_dir.resolve()
    return {path: quote(Path(os.path.relpath(Path(path).parent.resolve(), out)).as_posix())
            + "/" for path in dict.fromkeys(results)}


def flag(run: pd.Series) -> str:
    """Why a run is not an ordinary one: left out, failed, degenerate, or still running."""
    if run["left_out"]:
        return f"left out: {run['left_out']}"
    if run["status"] == "completed":
        return "degenerate" if run["degenerate"] else ""
    return run["status"]


def sortable(show):
    """`show` (a table's formatting), but "" for a missing value: DataTables sorts a column of
    numbers and blanks as numbers, and one holding "-" as text."""
    return lambda value: "" if pd.isna(value) else show(value)


def runs_frame(report: Report, labels: dict[str, str], links: dict[str, str]) -> pd.DataFrame:
    """One row per run read, with a link to its folder (`links`: folder_links; HTML, escaped
    here)."""
    from markupsafe import escape

    runs = report.runs.assign(degenerate=is_degenerate(report.runs))
    out = pd.DataFrame({
        RUN_COLUMNS[0]: runs[GROUP].map(labels),
        RUN_COLUMNS[1]: runs["seed"].map(number),
        RUN_COLUMNS[2]: runs["status"],
        RUN_COLUMNS[3]: runs["dev_best"].map(sortable(tables.x100)),
        RUN_COLUMNS[4]: runs["test_best"].map(sortable(tables.x100)),
        RUN_COLUMNS[5]: runs["best_epoch"].map(sortable(number)),
        RUN_COLUMNS[6]: runs.apply(flag, axis=1),
        RUN_COLUMNS[7]: [
            f'<a href="{escape(links[p])}">{escape(Path(p).parent.name)}</a>'
            for p in runs["path"]],
    })
    for column in RUN_COLUMNS[:3] + RUN_COLUMNS[6:7]:
        out[column] = out[column].map(lambda v: str(escape(v)))
    return out.reset_index(drop=True)


def runs_table(frame: pd.DataFrame) -> str:
    """The runs table as DataTables HTML: sortable, SearchPanes on configuration and status."""
    from itables.javascript import to_html_datatable

    panes = [RUN_COLUMNS.index("configuration"), RUN_COLUMNS.index("status")]
    return to_html_datatable(
        frame, table_id=RUNS_TABLE, connected=False, allow_html=True,
        maxBytes=0, showIndex=False, classes="display compact", pageLength=25,
        lengthMenu=[10, 25, 100, 500, -1], order=[],
        layout={"top1": "searchPanes", "topStart": "pageLength", "topEnd": "search",
                "bottomStart": "info", "bottomEnd": "paging"},
        searchPanes={"columns": panes, "layout": "columns-2", "cascadePanes": True,
                     "initCollapsed": False, "viewTotal": True},
        columnDefs=[{"searchPanes": {"show": True}, "targets": panes}],
    )


def scores_figures(report: Report, labels: dict[str, str], links: dict[str, str]
                   ) -> tuple[str, list[str]]:
    """(script, divs): one Bokeh figure per (model, task), a point per completed run (hover:
    seed and folder; click: the folder) and a dash at each configuration's mean (summary.csv)."""
    from bokeh.embed import components
    from bokeh.models import ColumnDataSource, HoverTool, OpenURL, TapTool
    from bokeh.plotting import figure
    from bokeh.transform import jitter

    from blurbtune.report.plots import config_label, varying

    done = report.included[report.included["status"] == "completed"].dropna(
        subset=["test_best"])
    done = done.assign(degenerate=is_degenerate(done))
    figures = []
    for (model, task), frame in done.groupby(["model", "task"], sort=True):
        varies = varying(frame, report.configs)
        short = short_labels(frame[GROUP].unique(), report.configs, varies, config_label)
        order = [short[c] for c in report.configs.table.index if c in short]
        fig = figure(x_range=order, width=max(760, 60 * len(order)), height=560,
                     title=f"{task} - {model}: test score per run (hover: seed and run; "
                           "click: its folder)",
                     y_axis_label="test (x100)", tools="pan,wheel_zoom,box_zoom,reset,save")
        fig.xaxis.major_label_orientation = 1.2 if len(order) > 4 else 0
        for bad, colour, name in ((False, "#1f77b4", "ok"), (True, "#d62728", "degenerate")):
            part = frame[frame["degenerate"] == bad]
            if part.empty:
                continue
            source = ColumnDataSource({
                "x": part[GROUP].map(short).tolist(),
                "config": part[GROUP].map(labels).tolist(),
                "score": (100 * part["test_best"]).round(tables.DIGITS).tolist(),
                "seed": part["seed"].map(number).tolist(),
                "run": [Path(p).parent.name for p in part["path"]],
                "href": [links[p] for p in part["path"]],
            })
            fig.scatter(x=jitter("x", 0.3, range=fig.x_range), y="score", source=source,
                        size=8, color=colour, alpha=0.8, legend_label=name,
                        marker="x" if bad else "circle")
        means = report.summary[report.summary[GROUP].isin(frame[GROUP].unique())]
        fig.scatter(x=means[GROUP].map(short).tolist(),
                    y=(100 * means["test_best_mean"]).tolist(), marker="dash", size=40,
                    color="black", legend_label="mean (summary)")
        fig.add_tools(HoverTool(tooltips=[("run", "@run"), ("seed", "@seed"),
                                          ("test", "@score"), ("config", "@config")]),
                      TapTool(callback=OpenURL(url="@href")))
        fig.add_layout(fig.legend[0], "right")
        figures.append(fig)
    if not figures:
        return "", []
    script, divs = components(figures)
    return script, list(divs)


def short_labels(configs_shown, configs, varies: set[str], label) -> dict[str, str]:
    """The stabilizer and the settings that vary on this plot (no knobs), one line each; the
    plot's labels (`label`, knobs included) where two would read the same."""
    def short(config: str) -> str:
        return ", ".join(part for part in label(config, configs, varies).split("\n")
                         if "=" not in part or part.split("=")[0] in {"lr", "bs", *varies})

    names = {c: short(c) for c in configs_shown}
    if len(set(names.values())) < len(names):
        names = {c: label(c, configs, varies).replace("\n", ", ") for c in configs_shown}
    return names


def held_fixed(report: Report) -> list[tuple[str, str]]:
    """Identity keys with one value across every configuration (what the study held fixed)."""
    identities = list(report.configs.identities.values())
    keys = sorted(set.intersection(*(set(i) for i in identities))) if identities else []
    fixed = []
    for key in keys:
        values = {i[key] for i in identities}
        if len(values) == 1:
            fixed.append((key, display_value(key, next(iter(values))) if key in HASHED
                          else next(iter(values))))
    return fixed


def inline_png(path: Path, colours: int = 64) -> str:
    """The PNG as a data: URL, reduced to `colours` colours (Pillow): a third of the bytes for
    line plots on white, which keeps a page with a dozen plots to a few MB."""
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").quantize(colours, method=Image.Quantize.FASTOCTREE).save(
            buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def display_rows(frame: pd.DataFrame) -> dict[str, Any]:
    return {"columns": list(frame.columns), "rows": frame.astype(str).values.tolist()}


def write_page(report: Report, out: Path, pngs: list[Path], left_out: dict[str, list[str]]
               ) -> Path:
    """Render report.html into `out` (the report folder being written); `pngs` are inlined,
    `left_out` is what the console lists too (section title -> lines)."""
    import jinja2
    from bokeh.resources import Resources
    from itables.javascript import generate_init_offline_itables_html
    from itables.options import dt_bundle

    varying = report.configs.varying
    labels = {c: report.configs.label(c) for c in report.configs.table.index}
    links = folder_links(report.runs["path"], report.out_dir)
    script, divs = scores_figures(report, labels, links)
    table = report.configs.table
    context = {
        "title": "Study report: " + ", ".join(
            f"{m} / {t}" for m, t in table[["model", "task"]].drop_duplicates().itertuples(
                index=False)),
        "out_dir": str(report.out_dir),
        "n_runs": len(report.runs),
        "n_configs": len(table),
        "held_fixed": held_fixed(report),
        "varying": ["stabilizer", "knobs", "lr", "batch size", *varying],
        "verdict": display_rows(tables.verdict_display(report.verdicts, varying)),
        "verdict_note": tables.VERDICT_NOTE,
        "stability": display_rows(tables.stability_display(report.summary, varying)),
        "stability_note": tables.STABILITY_NOTE,
        "summary": display_rows(tables.summary_display(report.summary, varying)),
        "summary_note": tables.SUMMARY_NOTE,
        "blurb": (display_rows(tables.blurb_display(report.blurb))
                  if report.blurb is not None and not report.blurb.empty else None),
        "bokeh_js": Resources(mode="inline", components=["bokeh"]).render_js() if script
        else "",
        "bokeh_script": script,
        "score_divs": divs,
        "pngs": [(p.name, inline_png(p)) for p in pngs],
        "left_out": {title: lines for title, lines in list(left_out.items())[:LEFT_OUT]
                     if lines},
        "to_know": {title: lines for title, lines in list(left_out.items())[LEFT_OUT:]
                    if lines},
        "notes": report.notes,
        "itables_init": generate_init_offline_itables_html(dt_bundle),
        "runs_table": runs_table(runs_frame(report, labels, links)),
        "missing": MISSING,
    }
    env = jinja2.Environment(loader=jinja2.PackageLoader("blurbtune.report", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    path = Path(out) / PAGE
    path.write_text(env.get_template(TEMPLATE).render(context), encoding="utf-8")
    return path
