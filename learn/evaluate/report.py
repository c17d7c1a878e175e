"""The test metrics a run prints at its end: the configured history mode, the other in parentheses."""

from __future__ import annotations

from learn.config import EvalConfig


def format_summary(metrics: dict[str, float], eval_cfg: EvalConfig) -> str:
    mode = "history excluded" if eval_cfg.exclude_history else "history not excluded"
    other = "_incl_hist" if eval_cfg.exclude_history else "_excl_hist"
    keys = [f"test_{name}_at_{k}" for k in eval_cfg.ks for name in ("recall", "ndcg")] + ["test_mrr"]
    lines = [f"\n== test metrics ({mode}; other mode in parentheses) =="]
    lines += [f"  {key:<22} {metrics[key]:.4f}   ({metrics.get(key + other, float('nan')):.4f})"
              for key in keys if key in metrics]
    times = ", ".join(f"{k[5:-2]} {v:.1f}s" for k, v in metrics.items() if k.startswith("time_"))
    lines.append(f"  wall time: {times}")
    return "\n".join(lines)
