"""`make bench`: every benchmark in one run, printed as ratios measured side by side.

python -m bench.run [--seconds 3] [--concurrency 16] [--small 10000] [--large 100000]
Writes bench/results/latest.json and latest.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench import load, redis_queue, relay_memory, rpc_cases, scale, storage

RESULTS = Path(__file__).parent / "results"


def _row(result: load.Result, ratio: float | None, target: str) -> str:
    ratio_text = f"{ratio:6.2f}" if ratio is not None else "     -"
    return (
        f"{result.name:38} {result.per_second:10.0f}/s {result.p50_ms:8.2f} {result.p99_ms:8.2f}"
        f"  {ratio_text}  {target}{'  ERRORS ' + str(result.errors) if result.errors else ''}"
    )


async def main(args: argparse.Namespace) -> dict[str, object]:
    report: dict[str, object] = {"settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="securemsg-bench-") as tmp:
        root = Path(tmp)
        stack = rpc_cases.start_stack(root / "stack")
        try:
            ceiling = await rpc_cases.echo_ceiling(stack, args.concurrency, args.seconds)
            hot = await rpc_cases.hot_paths(stack, args.concurrency, args.seconds)
        finally:
            stack.stop()
        redis_result = await redis_queue.delivery(args.concurrency, args.seconds)
        stored = storage.compare(root / "storage")
        scaled = await scale.compare(root, args.small, args.large, args.concurrency, args.seconds)
    memory = relay_memory.overhead_per_message()

    print(f"\n{'case':38} {'throughput':>12} {'p50 ms':>8} {'p99 ms':>8}  {'ratio':>6}  target")
    print(_row(ceiling, 1.0, "the transport ceiling"))
    unary = []
    for result in hot:
        ratio = result.per_second / ceiling.per_second
        if "delivery" in result.name:
            continue
        unary.append((result.name, ratio))
        print(_row(result, ratio, ">= 0.80 of echo"))
    delivery = next(r for r in hot if "delivery" in r.name)
    relay_vs_redis = delivery.per_second / redis_result.per_second
    print(_row(redis_result, 1.0, "peer"))
    print(_row(delivery, relay_vs_redis, ">= 1.00 of Redis"))
    by_name = {r.name: r for r in stored}
    storage_ratios = {}
    for op in ("write", "read"):
        mine, plain, cipher = (
            by_name[f"{n} {op}"] for n in ("encrypted", "plain SQLite", "SQLCipher")
        )
        storage_ratios[op] = (
            mine.per_second / plain.per_second,
            mine.per_second / cipher.per_second,
        )
        print(_row(plain, 1.0, "peer"))
        print(_row(cipher, cipher.per_second / plain.per_second, "(SQLCipher vs plain)"))
        print(
            _row(
                mine,
                storage_ratios[op][0],
                f">= 0.80 of plain; vs SQLCipher {storage_ratios[op][1]:.2f} (> 1)",
            )
        )
    scale_ratios = {}
    half = len(scaled) // 2
    for small, large in zip(scaled[:half], scaled[half:], strict=True):
        ratio = large.p50_ms / small.p50_ms if small.p50_ms else 0.0
        scale_ratios[small.name.split(" @")[0]] = ratio
        print(_row(small, None, ""))
        print(_row(large, ratio, "p50 within 1.50x of the small population"))
    print(f"{'relay bytes per queued message beyond its body':55} {memory:8.0f}  target <= 512")

    report.update(
        ceiling=asdict(ceiling),
        hot_paths=[asdict(r) | {"ratio_to_echo": r.per_second / ceiling.per_second} for r in hot],
        redis=asdict(redis_result),
        relay_vs_redis=relay_vs_redis,
        storage=[asdict(r) for r in stored],
        storage_ratios={
            k: {"vs_plain": v[0], "vs_sqlcipher": v[1]} for k, v in storage_ratios.items()
        },
        scale=[asdict(r) for r in scaled],
        scale_p50_ratios=scale_ratios,
        relay_overhead_bytes_per_message=memory,
    )
    _chart(unary, relay_vs_redis, storage_ratios, scale_ratios)
    return report


def _chart(
    unary: list[tuple[str, float]],
    relay_vs_redis: float,
    storage_ratios: dict[str, tuple[float, float]],
    scale_ratios: dict[str, float],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{name} / echo", ratio, 0.8) for name, ratio in unary]
    bars.append(("relay delivery / Redis", relay_vs_redis, 1.0))
    for op, (plain, cipher) in storage_ratios.items():
        bars.append((f"encrypted {op} / plain", plain, 0.8))
        bars.append((f"encrypted {op} / SQLCipher", cipher, 1.0))
    bars += [
        (f"{name}: small p50 / large p50", 1 / r if r else 0, 1 / 1.5)
        for name, r in scale_ratios.items()
    ]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(bars) + 1))
    names = [b[0] for b in bars]
    ax.barh(
        names,
        [b[1] for b in bars],
        color=["tab:green" if b[1] >= b[2] else "tab:red" for b in bars],
    )
    for y, (_, _, target) in enumerate(bars):
        ax.plot([target, target], [y - 0.4, y + 0.4], color="black")
    ax.invert_yaxis()
    ax.set_xlabel("ratio (black tick: target; green: met)")
    ax.set_title("SecureMsg benchmarks, measured side by side in one run")
    fig.tight_layout()
    fig.savefig(RESULTS / "latest.png", dpi=100)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    arguments = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    result = asyncio.run(main(arguments))
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {RESULTS / 'latest.json'} and {RESULTS / 'latest.png'}")
