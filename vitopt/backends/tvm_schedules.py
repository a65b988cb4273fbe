"""Default GPU schedules for the TVM backend: dlight's rules, one function at a time.

dlight's `ApplyDefaultSchedule` applies its rules to every PrimFunc and gives up on the whole
module when one rule raises. TVM 0.27's `gpu.Matmul` does raise on some functions it accepts:
its tensor-core path fails with a ScheduleError ("not a stage pipeline", in `compute_at` /
`fetch_to_shared`) on DeiT's patch-embedding conv2d with a symbolic batch. So each function is
scheduled on its own, in order of preference:

  1. the rules as given (gpu.Matmul with tensor cores where the shapes allow it),
  2. the same with `dlight.do_not_tensorize` set (Matmul's SIMT schedule),
  3. the rules without Matmul (GEMV / Reduction / GeneralReduction / Fallback),

and the functions that needed 2 or 3 are reported (`ScheduleReport.fallbacks`), so a slow kernel
has a visible reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class ScheduleReport:
    scheduled: int = 0
    fallbacks: Dict[str, str] = field(default_factory=dict)  # function -> what it fell back to


def gpu_rules():
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback()]


def _schedule_one(func, target, rules):
    """The scheduled function, or None when no rule applies (dlight's _apply_rules)."""
    for rule in rules:
        space = rule.apply(func, target, False)
        if space is None:
            continue
        schedule = space if not isinstance(space, list) else space[0]
        return schedule.mod["main"].with_attr("tirx.is_scheduled", True)
    return None


def schedule_gpu_functions(mod, target, report: ScheduleReport):
    """Schedule every unscheduled PrimFunc of `mod` for `target` (a tvm Target); returns mod."""
    from tvm import tirx

    rules = gpu_rules()
    without_matmul = rules[1:]
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or func.attrs and "tirx.is_scheduled" in func.attrs:
            continue
        attempts = [("dlight", func, rules),
                    ("no tensor cores", func.with_attr("dlight.do_not_tensorize", True), rules),
                    ("no matmul rule", func, without_matmul)]
        errors: List[str] = []
        for label, candidate, rule_list in attempts:
            try:
                scheduled = _schedule_one(candidate, target, rule_list)
            except Exception as exc:  # ScheduleError / TVMError raised inside a dlight rule
                errors.append(f"{label}: {str(exc).splitlines()[0][:120]}")
                continue
            if scheduled is not None:
                mod[gvar] = scheduled
                report.scheduled += 1
                if label != "dlight":
                    report.fallbacks[gvar.name_hint] = f"{label} ({'; '.join(errors)})"
            break
    return mod


def robust_dlight_pass(report: ScheduleReport):
    """A module pass (for a relax pipeline) running schedule_gpu_functions under the current target."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="VitoptDlightPerFunction")
    def _pass(mod, _ctx):
        return schedule_gpu_functions(mod, tvm.target.Target.current(allow_none=False), report)

    return _pass
