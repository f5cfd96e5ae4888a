"""The markdown page of a GPU check (``gpu_check.md``), rendered from the JSON record alone.

Every section may be missing, skipped or failed; each part renders what exists and says what does not.
"""
from __future__ import annotations

from typing import Any


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        if v != v:
            return "nan"
        if isinstance(v, int) or abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c.replace("|", "/").replace("\n", " ")
                              for c in r) + " |" for r in rows]
    return out + [""]


def _status_line(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "not run"
    return str(rec.get("status", "?")).splitlines()[0]


def render(results: dict[str, Any]) -> str:
    s = results.get("sections", {})
    meta = results.get("meta", {})
    env = (s.get("env") or {}).get("data") or {}
    L: list[str] = ["# robbench GPU check", ""]
    L.append(f"device **{env.get('gpu') or env.get('device', '?')}**, torch {env.get('torch', '?')} (CUDA "
             f"{env.get('torch_cuda')}), Python {env.get('python', '?')}, commit {env.get('git_commit') or 'unknown'}; "
             f"{'QUICK mode: tiny sizes, numbers NOT representative' if env.get('quick') or meta.get('quick') else 'full sizes'}; "
             f"{_f(meta.get('elapsed_s'))} s of a {_f(meta.get('budget_s'))} s budget.")
    if meta.get("ended_by_watchdog"):
        L.append("**The run was ended by the watchdog** (a section overran the overall budget).")
    L.append("")
    L += ["## Sections", ""]
    L += _table(["section", "status", "seconds", "budget s"],
                [[k, _status_line(v), v.get("seconds"), v.get("budget_s")] for k, v in s.items()])
    fails = {k: v["status"] for k, v in s.items() if str(v.get("status", "")).startswith("failed")}
    if fails:
        L += ["Failures (traceback tails in gpu_check.json):", ""]
        L += [f"- **{k}**: {v.splitlines()[0]}" + (f" … `{v.splitlines()[-1]}`" if len(v.splitlines()) > 1 else "")
              for k, v in fails.items()]
        L.append("")
    deps = [d for d in env.get("dependencies", []) if not d.get("importable")]
    if deps:
        L += ["Not importable here: " + ", ".join(f"{d['requirement']} ({d['group']})" for d in deps), ""]

    L += _correctness(s)
    L += _speed(s)
    L += _projection(s)
    return "\n".join(L).rstrip() + "\n"


def _correctness(s: dict[str, Any]) -> list[str]:
    L = ["## Correctness", ""]
    v = (s.get("vmap_equivalence") or {}).get("data") or {}
    if v:
        st = v.get("strict") or {}
        L.append(f"vmap vs loop ({v.get('device')}, {v.get('memory_format')}, n={v.get('n')}; tolerance "
                 f"{_f(v.get('rtol_strict'))} strict fp32, {_f(v.get('rtol_tf32_default'))} default TF32): logits "
                 f"{_f(st.get('logits'))}, input gradient {_f(st.get('input_grad_frozen'))}, weight gradients "
                 f"{_f(st.get('weight_and_input_grad'))}; vmap ran: {_f(v.get('vmap_ran'))}.")
        if v.get("tf32_default"):
            t = v["tf32_default"]
            L.append(f"  With default TF32: logits {_f(t.get('logits'))}, input gradient {_f(t.get('input_grad_frozen'))}.")
        d = v.get("dverge_step")
        if isinstance(d, dict):
            L.append(f"DVERGE step, batched distillation vs per member (layer {d.get('layer')}): losses "
                     f"{_f(d.get('loss_rel_diff'))} (tol {_f(d.get('rtol_loss'))}), weight update "
                     f"{_f(d.get('update_rel_error'))} (tol {_f(d.get('rtol_update'))}).")
        L.append("")
    c = s.get("cuda_vs_cpu") or {}
    if (cd := c.get("data")):
        p = cd.get("pgd") or {}
        L.append(f"CUDA vs CPU (n={cd.get('n')}, tolerance {_f(cd.get('rtol'))}): logits {_f(cd.get('logits_rel_diff'))}, "
                 f"input gradient {_f(cd.get('input_grad_rel_diff'))}; PGD-10: {_f(p.get('agree_frac_1e-5'))} of "
                 f"elements within 1e-5, fooled flags differ on {p.get('flags_differ')} ({p.get('tolerance')}).")
        for name, r in (cd.get("training_step") or {}).items():
            if isinstance(r, dict):
                L.append(f"  training step {name}: weight update rel. error {_f(r.get('update_rel_error'))} "
                         f"(tol {_f(r.get('rtol_update'))}), losses {_f(r.get('loss_rel_diff'))}.")
        L.append("")
    else:
        L += [f"CUDA vs CPU: {_status_line(c)}.", ""]
    t = s.get("torchrun") or {}
    rec = ((t.get("data") or {}).get("record")) or {}
    L.append(f"torchrun --nproc_per_node 1: {_status_line(t)}; backend {rec.get('backend', '–')}, world size "
             f"{rec.get('world_size', '–')}.")
    for name, ph in (rec.get("phases") or {}).items():
        L.append(f"  {name}: {str(ph.get('status', '?')).splitlines()[0]} ({_f(ph.get('seconds'))} s)")
    L.append("")
    m = (s.get("memformat") or {}).get("data") or {}
    if m.get("rows"):
        L += [f"Memory-format check on {m.get('device')} (robbench.memformat, tolerance {_f(m.get('rtol'))}):", ""]
        L += _table(["entry", "model", "chosen", "check s", "worst layer rel. diff", "whole model rel. diff", "reason"],
                    [[r.get("entry"), r.get("model", ""), r.get("chosen", r.get("status")), r.get("check_seconds"),
                      r.get("worst_layer_rel_diff"), r.get("model_rel_diff"), r.get("reason") or ""] for r in m["rows"]])
    return L


def _speed(s: dict[str, Any]) -> list[str]:
    L = ["## Speed", ""]
    t = (s.get("method_throughput") or {}).get("data") or {}
    if t.get("rows"):
        g = t.get("geometry") or {}
        L += [f"Training step, images/s ({t.get('device')}, {g.get('channels')}x{g.get('side')}x{g.get('side')}, batch "
              f"{t.get('batch')}; paper ratio: DVERGE Table 1 on a TITAN XP):", ""]
        L += _table(["method", "entry", "model", "img/s", "ms/step", "x baseline", "paper x baseline", "format",
                     "peak MiB", "status"],
                    [[k, r.get("entry", ""), r.get("model", ""), r.get("img_per_s"),
                      None if r.get("seconds_per_step") is None else 1000 * r["seconds_per_step"],
                      r.get("ratio_to_baseline"), r.get("paper_table1_ratio"), r.get("memory_format", ""),
                      r.get("peak_mem_mb"), str(r.get("status", "")).splitlines()[0]] for k, r in t["rows"].items()])
    c = s.get("compile") or {}
    rec = ((c.get("data") or {}).get("record")) or {}
    if rec:
        L += [f"torch.compile (backend {rec.get('backend')}, batch {rec.get('batch')}): {_status_line(c)}", ""]
        L += _table(["step", "eager img/s", "compiled img/s", "speed-up", "first compiled step s"],
                    [["train (baseline)", (rec.get("train_eager") or {}).get("img_per_s"),
                      (rec.get("train_compiled") or {}).get("img_per_s"), rec.get("train_speedup"),
                      (rec.get("train_compiled") or {}).get("first_step_s")],
                     ["attack (fwd + input grad)", (rec.get("attack_eager") or {}).get("img_per_s"),
                      (rec.get("attack_compiled") or {}).get("img_per_s"), rec.get("attack_speedup"),
                      (rec.get("attack_compiled") or {}).get("first_step_s")]])
    else:
        L += [f"torch.compile: {_status_line(c)}", ""]
    v = (s.get("loop_vs_vmap") or {}).get("data") or {}
    if v.get("rows"):
        L += [f"Members looped vs vmap (robbench default here: {v.get('robbench_default')}):", ""]
        L += _table(["members", "attack step loop img/s", "vmap img/s", "loop/vmap", "forward loop img/s", "vmap img/s",
                     "loop/vmap"],
                    [[r.get("members"), r.get("loop_grad_img_per_s"), r.get("vmap_grad_img_per_s"),
                      r.get("grad_loop_over_vmap"), r.get("loop_fwd_img_per_s"), r.get("vmap_fwd_img_per_s"),
                      r.get("fwd_loop_over_vmap")] for r in v["rows"]])
    mf = (s.get("memory_formats") or {}).get("data") or {}
    if mf:
        if mf.get("status"):
            L += [f"Memory formats: {mf['status']}", ""]
        else:
            L += ["Memory formats (ResNet-20 x3, img/s):", ""]
            L += _table(["step", "channels_last", "contiguous", "channels_last speed-up"],
                        [["train (baseline)", mf.get("train_channels_last_img_per_s"), mf.get("train_contiguous_img_per_s"),
                          mf.get("train_channels_last_speedup")],
                         ["attack", mf.get("attack_channels_last_img_per_s"), mf.get("attack_contiguous_img_per_s"),
                          mf.get("attack_channels_last_speedup")]])
    for key, title in (("pgd_whitebox", "White-box PGD through the engine"), ("transfer_set", "Transfer-set generation")):
        d = (s.get(key) or {}).get("data") or {}
        if d:
            L.append(f"{title}: {d.get('attack')}, n={d.get('n')}, eps {d.get('eps')}: "
                     + (f"{_f(d.get('seconds'))} s" if "seconds" in d else
                        f"generation {_f(d.get('generation_s'))} s (first target {_f(d.get('first_target_s'))} s, "
                        f"second {_f(d.get('second_target_s'))} s)")
                     + f"; {_f(d.get('grad_s_per_member_image'))} s per member-image gradient.")
        else:
            L.append(f"{title}: {_status_line(s.get(key))}")
    L.append("")
    return L


def _projection(s: dict[str, Any]) -> list[str]:
    L = ["## Projected GPU-hours on this device", ""]
    p = (s.get("projection") or {}).get("data") or {}
    c = (s.get("projection_costs") or {}).get("data") or {}
    if not p:
        return L + [f"Not available: {_status_line(s.get('projection'))}.", ""]
    if not p.get("representative"):
        L += ["**Quick mode: costs were measured at tiny sizes and scaled; these hours are NOT a projection.**", ""]
    if c:
        L.append(f"Costs: {c.get('train_measured')} of {c.get('train_keys')} training-step kinds and "
                 f"{c.get('model_measured')} of {c.get('model_keys')} model kinds measured, "
                 f"{(c.get('estimated') or {}).get('train', 0)} + {(c.get('estimated') or {}).get('model', 0)} estimated "
                 f"(scaled from a measured one), {len((c.get('unpriced') or {}).get('train', []))} + "
                 f"{len((c.get('unpriced') or {}).get('model', []))} unpriced (their work is listed as 'unmeasured').")
        L.append("Evaluation counts ignore early stop: they are upper bounds.")
        L.append("")
    L += _table(["paper", "table", "training h", "evaluation h", "transfer sets h", "total h", "work units", "unmeasured"],
                [[g["paper"], g["name"], g["train_h"], g["eval_h"], g["generate_h"], g["total_h"], g["units"],
                  g["unmeasured"]] for g in p.get("groups", [])]
                + [[k, "**paper total**", v["train_h"], v["eval_h"], v["generate_h"], v["total_h"], v["units"],
                    v["unmeasured"]] for k, v in (p.get("papers") or {}).items()])
    notes = [f"- {g['paper']} {g['name']}: {n}" for g in p.get("groups", []) for n in g.get("notes", [])]
    if notes:
        L += notes + [""]
    cmp_ = p.get("comparison") or {}
    if cmp_.get("times"):
        L += ["### Beside the papers' own training times", ""]
        L += _table(["paper", "row", "entry", "paper h", "paper hardware", "projected h (here)", "paper x baseline",
                     "projected x baseline"],
                    [[t["paper"], t["row"], t["entry"], t["hours"], t["hardware"], t.get("projected_h"),
                      t.get("paper_ratio"), t.get("projected_ratio")] for t in cmp_["times"]])
        for r in cmp_.get("ratios", []):
            L.append(f"- {r['what']}: paper {_f(r['ratio'])}, projected {_f(r.get('projected_ratio'))} "
                     f"({r['numerator']} / {r['denominator']}). {r['citation']}")
        for h in cmp_.get("hardware", []):
            L.append(f"- {h['paper']}: {h['text']}")
        cites = sorted({t["citation"] for t in cmp_["times"]})
        L += [""] + [f"- {c}" for c in cites] + [""]
    return L
