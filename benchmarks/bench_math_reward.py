"""Cost of prepo.rewards.math_reward per item: the worker-process path the trainer uses (cold: no
memoized verdicts; warm: every pair seen before) next to math-verify called in-process with no time
limit (prepo.verify_worker.check), on distinct boxed-integer completions.

    python benchmarks/bench_math_reward.py [--items 2000]
"""
from __future__ import annotations

import argparse
import logging
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=2000)
    args = ap.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from prepo.rewards import MathChecker
    from prepo.verify_worker import check

    rng = random.Random(0)
    comps = [f"{rng.randint(0, 99)}*{rng.randint(0, 9)} gives, so the answer is \\boxed{{{rng.randint(0, 50)}}}"
             for _ in range(args.items)]
    golds = [str(rng.randint(0, 50)) for _ in range(args.items)]
    checker = MathChecker()
    checker(["\\boxed{1}"], ["1"])  # start the worker
    check("\\boxed{1}", "1")       # import math-verify here too
    for name, run in [("math_reward cold (worker process)", lambda: checker(comps, golds)),
                      ("math_reward warm (memoized)", lambda: checker(comps, golds)),
                      ("in-process math-verify, no limit", lambda: [check(c, g) for c, g in zip(comps, golds)])]:
        t = time.perf_counter()
        run()
        print(f"{name:36s} {(time.perf_counter() - t) / args.items * 1e3:.3f} ms/item")
    checker.close()


if __name__ == "__main__":
    main()
