"""report.md: the tables and plots in reading order, each with the note that says how it is made."""

from __future__ import annotations

from agdlm.report.markdown import BORROWED, DAGGER
from agdlm.report.roles import ROLES_NOTE
from agdlm.report.shapes import FLOPS_FORMULA
from agdlm.report.tables import RUNS_NOTE
from agdlm.report.ties import TIES_NOTE
from agdlm.report.timing import CHECK_NOTE

RATIO_NOTE = (
    "Each value: the setting's final val loss divided by the best-tuned AdamW's (lowest final val loss over its "
    "learning rates) of the same cell and seed, averaged over seeds, then each seed's ratio in seed order. Below 1: "
    "better than tuned AdamW. Muon and Schedule-free are at their own best lr per cell and seed (the detail tables "
    "name it); AGD's settings and Prodigy have no lr and appear as run. A cell is width, layers, batch (sequences "
    "per step), tokenizer, block size and planned tokens; finished runs only. A seed whose run diverged or did not "
    "finish says so instead of a ratio. (edge): the best lr is the smallest or largest of 3+ lrs run, so a better "
    "one may lie outside the range. Per seed and run: vs_adamw.csv.")
SUMMARY_NOTE = (
    "Across the grid: mean and worst over every (cell, seed) ratio; within 5%: cells where every seed's ratio is at "
    "most 1.05 (a failed seed is not); beats tuned Muon: cells where every seed's final val loss is below tuned "
    "Muon's of the same seed, out of the cells with a Muon ('-': no Muon ran); beats AGD default: the same against "
    "the faithful AGD. AGD at a gain other than 1 is left out (the sensitivity section below): it is never a "
    "setting to pick.")
SPEED_NOTE = (
    "The target is the tuned AdamW's final val loss in the same cell and seed. Tokens to target: where the eval "
    "curve first reaches it, linear between evals ('not reached' where it never does). Seconds per token: the median "
    "over the run's train records of 1/tokens_per_s (step_time_s / tokens per step where a record has no rate). Time "
    "to target: seconds per token x tokens to target. Medians over the (cell, seed) pairs that reach the target; "
    "below 1: fewer tokens or less time than tuned AdamW.")
DAGGER_NOTE = (
    f"{DAGGER} a timing from a run that shared its machine (timing.json beside its metrics.jsonl says idle: false) "
    "and has no idle run of the same shape and optimiser to take one from; summaries never mix such timings with "
    "idle ones.")
BORROWED_NOTE = (
    f"{BORROWED} the run shared its machine, or was made before machine load was recorded: its seconds per token are "
    "the median of the idle runs of the same shape and optimiser (width, layers, tokenizer, batch, block size, "
    "setting; the lr, seed and length do not change the arithmetic), named in vs_adamw.csv's timing_from. These "
    "count as idle timings.")
GAIN_NOTE = (
    "AGD's gain multiplies the step size it derives (1 is the algorithm). Each value: the final val loss at that "
    "gain divided by tuned AdamW's of the same cell and seed, averaged over seeds (each seed in brackets). It shows "
    "how flat AGD's optimum is; it is never used to pick a setting.")


def section(title: str, *blocks: str | None) -> list[str]:
    lines = ["", f"## {title}"]
    for block in blocks:
        if block:
            lines += ["", block]
    return lines


def image(name: str, title: str) -> str:
    return f"![{title}]({name})"


def report_lines(title: str, intro: str, written: dict, plots: dict[str, str], warnings: list[str],
                 unfinished: list[str]) -> list[str]:
    """`plots`: the drawn PNGs' names -> titles, in PLOTS order."""
    lines = [f"# {title}", "", intro, "", written["table"], "", RUNS_NOTE]
    if unfinished:
        lines += ["", f"\\* not finished (no DONE marker): {', '.join(unfinished)}."]
    if warnings:
        lines += ["", "Skipped or partly read:", ""] + [f"- {w}" for w in warnings]
    if written["downstream"]:
        lines += section("Downstream evaluation (`agdlm eval`)", written["downstream"],
                         "eval loss: held-out loss on that source, cut as training cuts it; acc_norm: multiple-choice "
                         "accuracy by loss per token (HellaSwag format). From each run's eval.json.")
    shown = set()

    def plot(name: str) -> str | None:
        """The image of a drawn plot, once."""
        if name not in plots or name in shown:
            return None
        shown.add(name)
        return image(name, plots[name])

    if written["ratio_table"]:
        lines += section("Every optimiser setting against the best-tuned AdamW (final val loss ratio)",
                         written["ratio_table"], RATIO_NOTE, SUMMARY_NOTE, written["ratio_summary"])
        if written["ties_table"]:
            lines += section("The top two settings per cell (the third-seed rule)", TIES_NOTE, written["ties_table"])
        lines += section("Tokens and time to the tuned AdamW's final val loss", SPEED_NOTE, written["speed_summary"],
                         BORROWED_NOTE if written["borrowed"] else None, DAGGER_NOTE if written["marked"] else None,
                         CHECK_NOTE if written["speed_check"] else None, written["speed_check"])
        for label, detail in written["details"].items():
            lines += ["", f"### {label}", "", detail]
        if written["marked"]:
            lines += ["", DAGGER_NOTE, ""] + [f"- {note}" for note in written["marked"]]
    for name in ("val_loss_vs_tokens.png", "lr_transfer.png"):
        if name in plots:
            lines += section(plots[name], plot(name))
    if written["gain_table"]:
        lines += section("AGD gain sensitivity", plot("gain_sensitivity.png"), written["gain_table"], GAIN_NOTE)
    if written["scaling_table"]:
        lines += section("Compute scaling: final val loss against training compute", plot("compute_scaling.png"),
                         written["scaling_table"], written["scaling_note"], FLOPS_FORMULA)
    if "agd_eta.png" in plots:
        lines += section(plots["agd_eta.png"], plot("agd_eta.png"))
    if "agd_roles.png" in plots:
        lines += section(plots["agd_roles.png"], plot("agd_roles.png"), written["roles_table"],
                         ROLES_NOTE if written["roles_table"] else None)
    for name in plots:  # every other plot under its own title
        if name not in shown:
            lines += section(plots[name], plot(name))
    return lines
