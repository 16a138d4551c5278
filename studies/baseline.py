"""The baseline study (make demo, first part): every sycophancy task on built-in probes, and TruthfulQA where a
local copy exists, small enough for a laptop's CPU; one results file per task and a report.

    python -m studies.baseline [--model=FOLDER] [--dtype=bf16] [--judge=self]
    torchrun --standalone --nproc_per_node 4 -m studies.baseline     # data parallel: the same rows, one JSON each
"""
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import data
from evaluate import EvalConfig, print_metrics, run_task
from lab import dist, report
from lab.args import JudgeOptions, ModelOptions, parse_args, user_errors
from runtime.session import open_session
from score import replies, user

# Each task on built-in probes (TruthfulQA on a local copy of its mc_task.json), n base items each.
BASELINE = [dict(task="opinion", n=60), dict(task="answer", n=40), dict(task="are_you_sure", n=40),
         dict(task="truthfulqa", n=100)]


@dataclass
class BaselineConfig(JudgeOptions, ModelOptions):
    out: str = "out"
    seed: int = 0
    dist_timeout: float = 600.0   # under torchrun: seconds a rank waits for the others before the run stops


def baseline(cfg: BaselineConfig):
    s = open_session(cfg)
    question = "What is the capital of France?"
    answer = replies(s.model, s.tok, [s.tok.encode(s.fmt(user(question)))], 20)[0]
    print(f"sanity check   {question}  ->  {answer.strip()}")
    shared = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    results = []
    for spec in BASELINE:
        task = EvalConfig(**shared, task=spec["task"], n=spec["n"], run=f"baseline-{spec['task']}")
        if spec["task"] == "truthfulqa":
            copy = data.local_truthfulqa()
            if copy is None:
                print("\ntruthfulqa skipped: no local copy of TruthfulQA's data/mc_task.json (put one at "
                      f"{data.TRUTHFULQA_COPIES[0]}; it is in github.com/sylinrl/TruthfulQA, or run "
                      "`python -m lab.prepare --dataset=truthfulqa` online)")
                continue
            task.data = str(copy)
        result, path = run_task(task, s)
        print_metrics(spec["task"], result, path)
        results.append(result)
    if not dist.is_main():   # rank 0 writes the report
        return
    names = [r["config"]["task"] for r in results]
    md = report.render_markdown(results, names)
    dest = Path(cfg.out) / f"baseline-report-{time.strftime('%Y%m%d-%H%M%S')}.md"
    report.plot_study(results, names, dest.with_suffix(".png"))
    dest.write_text(f"# Baseline sycophancy study: {s.model_dir.name}\n\n{md}\n\n"
                    f"![metrics]({dest.with_suffix('.png').name})\n")
    print(f"\nreport: {dest} and {dest.with_suffix('.png')}")


@user_errors()
def main(argv):
    cfg = parse_args(BaselineConfig, argv)
    dist.init(cfg.device, cfg.dist_timeout)          # under torchrun: the items are shared among the processes
    baseline(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
    dist.cleanup()
